"""Safetensors block files read into memory this process owns, so freeing a block really frees it.

    tensors, buf, nbytes = read_block(block_path("shards/rank1", (0, "attn")), torch.float32)
    entries, data_start = read_header(f, path)     # [(name, dtype, shape, begin, end)], checked
    read_into(f, memoryview(buf)[:n], offset, path)  # exactly n bytes from the file, or PagerError

A block is the attention or MLP half of one layer, one safetensors file each
(`layer{i:03d}.{kind}.safetensors`, written by prepare.py). safetensors' own
`safe_open(...).get_tensor` is zero-copy (0.8: tensors are views of its mmap of the file), so
touched pages count in RSS as file-backed memory and are faulted in lazily by the compute thread
rather than by the loader. Instead the header is parsed here and the data read with `readinto`
into an anonymous mmap owned by the block (with MADV_HUGEPAGE: fresh memory faults in ~6x
faster); tensors are views of it. The page cache is never mapped, so it never counts in RSS.
The pager (pager.py) and rank 0's streamed head (streamed_head.py) read through these functions.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
           "F8_E5M2": getattr(torch, "float8_e5m2", None)}
_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # the C library Python runs on


class PagerError(RuntimeError):
    """A block file could not be read (the message names the file), or the pager was misused."""


def block_path(folder, block) -> Path:
    """The file of block (layer, kind) in a rank's folder."""
    return Path(folder) / f"layer{int(block[0]):03d}.{block[1]}.safetensors"


def malloc_trim() -> None:
    """Give free heap memory back to the OS (glibc only; a no-op elsewhere)."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def new_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory of nbytes (huge pages from 2 MiB), freed when the last reference goes."""
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= (2 << 20) and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buf


def read_header(f, path) -> tuple[list[tuple[str, torch.dtype, list[int], int, int]], int]:
    """Parse the header of safetensors file `f` (opened "rb", positioned at 0), checking every entry
    against the file size: ([(name, dtype, shape, begin, end)], file offset of the data section).
    begin/end are byte offsets into the data section."""
    def corrupt(why):
        return PagerError(f"{path}: corrupt safetensors file: {why}"[:500])
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
    if n > min(size - 8, 100 << 20):
        raise corrupt(f"header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(f.read(n))
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    entries, data_size = [], size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (b, e) = _DTYPES[info["dtype"]], [int(s) for s in info["shape"]], info["data_offsets"]
            ok = dt is not None and type(b) is type(e) is int and 0 <= b <= e <= data_size \
                and min(shape, default=0) >= 0 and e - b == torch.Size(shape).numel() * dt.itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise corrupt(f"bad entry {name!r}: {info!r}")
        entries.append((name, dt, shape, b, e))
    return entries, 8 + n


def read_into(f, buf: memoryview, offset: int, path) -> None:
    """Fill `buf` from file `f` (unbuffered) starting at byte `offset`; a short file is corrupt."""
    f.seek(offset)
    got = 0
    while got < len(buf):
        k = f.readinto(buf[got:])
        if not k:
            raise PagerError(f"{path}: corrupt safetensors file: truncated: {offset + got} of "
                             f"{offset + len(buf)} bytes")
        got += k


ALIGN = 64  # every tensor of a block starts at a multiple of this in its buffer (the int8 kernel needs it)


def _converts(name: str, dt: torch.dtype, dtype: torch.dtype | None) -> bool:
    """Float weights and biases become the compute dtype; quantization scales and zeros keep theirs."""
    return dtype is not None and dt.is_floating_point and dt != dtype and name.rsplit(".", 1)[-1] in ("weight", "bias")


def read_block(path, dtype: torch.dtype | None = None, alloc=new_buffer):
    """Read one safetensors file into owned memory: (tensors, buffer they view or None, bytes read).
    Each tensor is placed at a 64-byte aligned offset of the buffer. Floating-point weights and biases
    become `dtype` (None: as stored); `alloc(n)` gives a buffer of >= n bytes."""
    with open(path, "rb", buffering=0) as f:
        entries, start = read_header(f, path)
        placed, total = [], 0
        for entry in sorted(entries, key=lambda e: e[3]):  # file order: sequential reads
            placed.append((entry, total))
            total += -(-(entry[4] - entry[3]) // ALIGN) * ALIGN
        buf = alloc(total) if total else None
        if buf is not None:
            with memoryview(buf) as mv:
                for (name, dt, shape, b, e), at in placed:
                    read_into(f, mv[at:at + e - b], start + b, path)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=total) if buf is not None else None
    tensors, views, nbytes = {}, False, 0
    for (name, dt, shape, b, e), at in placed:
        t = torch.empty(shape, dtype=dt) if b == e else raw[at:at + e - b].view(dt).view(shape)
        if _converts(name, dt, dtype):
            t = t.to(dtype)
        views = views or (b != e and t.data_ptr() == raw.data_ptr() + at)
        tensors[name] = t
        nbytes += e - b
    return tensors, (buf if views else None), nbytes
