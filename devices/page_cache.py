"""Evicting files from the OS page cache, so a benchmark or a probe reads them from the disk again.

    drop_page_cache(Path("shards").rglob("*.safetensors"))   # -> bytes dropped

No root needed: each file is synced and then dropped with posix_fadvise(POSIX_FADV_DONTNEED)
(Linux; NotImplementedError where the call does not exist). A virtual disk may still be served
from the host's own cache.
"""
from __future__ import annotations

import os


def drop_page_cache(paths) -> int:
    """Evict `paths` from the page cache (cold-cache benchmarks). Returns their total size in bytes."""
    if not hasattr(os, "posix_fadvise"):
        raise NotImplementedError("dropping the page cache needs os.posix_fadvise (Linux)")
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total
