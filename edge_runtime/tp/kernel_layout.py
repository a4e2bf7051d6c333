"""A rank's int4 blocks in this CPU's kernel layout, written once beside the portable ones.

    folder = kernel_folder("shards/rank1", block_order(L))   # rank1/kernel-<layout>/ or rank1 itself
    pager = Pager(folder, block_order(L), window, transform=kernel_state)

torch's int4 CPU kernel multiplies weights in a packed layout that depends on the machine
(`_convert_weight_to_int4pack_for_cpu`: 64-row blocks with AVX-512, 32 with AVX2, another nibble
order without either), so `tp prepare` stores the portable form (split.llama.quantize) and each
rank converts its own blocks the first time it starts on a machine: 2-3 s for a 1.1B model, where
converting while paging would cost ~25 ms per 11.5M weights on every token. The folder is named
after a fingerprint of this machine's layout (a fixed matrix packed here), written under a
temporary name and renamed when complete; a rank on another kind of CPU makes its own. Blocks
without int4 weights need no conversion: their rank folder is used as it is.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from split.llama.quantize import kernel_state

from .blockfile import block_path, read_block, read_header


def layout_fingerprint() -> str:
    """A short hash of how this machine's int4 kernel packs a fixed (128, 64) matrix."""
    q = (torch.arange(128 * 64, dtype=torch.int32).reshape(128, 64) * 7 + 3) % 16  # (N, K) values 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return hashlib.sha256(packed.contiguous().numpy().tobytes()).hexdigest()[:12]


def _has_int4(path: Path) -> bool:
    """Does the block hold weights the int4 kernel runs (int4 has zeros; group-wise int8, 2-D scales,
    runs on it too: split.llama.quant_kernels)?"""
    with open(path, "rb", buffering=0) as f:
        entries, _ = read_header(f, path)
    return any(name.endswith(".zeros") or (name.endswith(".scales") and len(shape) == 2)
               for name, _, shape, *_ in entries)


def kernel_folder(rank_dir: str | Path, order: list[tuple[int, str]], progress: bool = False) -> Path:
    """The folder a pager should read `rank_dir`'s blocks from: `rank_dir` itself when no block holds
    int4 weights, else rank_dir/kernel-<fingerprint>, made now if it is not there yet."""
    rank_dir = Path(rank_dir)
    paths = [block_path(rank_dir, b) for b in order]
    if not paths or not _has_int4(paths[0]):
        return rank_dir
    out = rank_dir / f"kernel-{layout_fingerprint()}"
    if out.is_dir():
        return out
    from tqdm import tqdm

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=rank_dir))
    try:
        for block, path in tqdm(list(zip(order, paths)), desc=f"int4 kernel layout {rank_dir.name}",
                                unit="block", disable=not progress):
            tensors = kernel_state(read_block(path)[0])  # stored dtypes; int4 repacked, int8 as it is
            save_file({k: v.contiguous() for k, v in tensors.items()}, block_path(tmp, block))
        try:
            tmp.rename(out)
        except OSError:
            if not out.is_dir():  # not another process of this rank that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
