"""Rank 0's embeddings and LM head, read from its safetensors files instead of kept in memory.

    attach_head(model, "shards/rank0", stream=True)  # what Shard does on rank 0 when paging
    h = model.embed(tokens)   # (B, T) -> (B, T, C): only the rows of `tokens` are read from the file
    logits = model.head(h)    # (B, T, C) -> (B, T, V): the LM head streamed through a ~4 MiB buffer

The model code is untouched: `embed_tokens` and `lm_head` of a split.llama `Llama` built without
them become the modules below; the final norm (C floats) is always resident.

- StreamedEmbedding reads one row per token (C * itemsize bytes at a known file offset) into a
  small buffer of its own: results are bitwise those of nn.Embedding over the converted table.
- StreamedHead computes logits[..., a:b] = h @ W[a:b].T over vocab slices of about 4 MiB, each read
  into the same owned buffer. Every logit is the same dot product as with the whole weight, but a
  BLAS may order its sum differently for other matrix shapes, so the results agree within float32
  rounding (bitwise for one row of h on the machines tested; tests/test_tp_streamed_head.py).

Both read with plain file reads into anonymous memory, never through an mmap of the file: mapped
file pages would count in RSS, and the point is a rank 0 that, like the workers, needs memory for
only its window of blocks. The head costs a pass over its file per forward: 62.5 MiB for a vocab
of 16000 at hidden 1024, fp32, from the page cache; measured 4.4 ms per decode step against 3.2 ms
for the resident head's matmul (1 thread, 2-core VM), as each slice is multiplied while it is
still in cache. With tied embeddings both read the head file's `lm_head.weight` (prepare.py writes
the embeddings there). Files are opened per call, so nothing stays open between tokens; headers
are parsed once, by blockfile.py's reader.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from split.llama import Llama, RMSNorm
from split.llama.quantize import CastLinear, WeightOnlyInt8Linear

from .blockfile import PagerError, new_buffer, read_block, read_header, read_into

CHUNK_BYTES = 4 << 20  # one vocab slice of the LM head


class TensorFile:
    """One tensor of a safetensors file, read whole or by rows (along dim 0) into owned memory."""

    def __init__(self, path, name: str):
        self.path, self.name = Path(path), name
        with open(self.path, "rb", buffering=0) as f:
            entries, start = read_header(f, self.path)
        found = [(dt, shape, b) for n, dt, shape, b, _ in entries if n == name]
        if not found or not found[0][1]:
            raise PagerError(f"{self.path}: no tensor {name!r} with at least one dimension "
                             f"(the file has {[n for n, *_ in entries]})"[:500])
        self.dtype, self.shape, b = found[0]
        self.rows, self.cols = self.shape[0], torch.Size(self.shape[1:]).numel()  # (V, C) for a table
        self.offset = start + b  # file offset of row 0
        self.row_bytes = self.cols * self.dtype.itemsize

    def open(self):
        return open(self.path, "rb", buffering=0)

    def read_rows(self, f, out: memoryview, start: int, count: int) -> None:
        """Rows [start, start + count) into out[:count * row_bytes]; `f` is this file, opened by open()."""
        read_into(f, out[:count * self.row_bytes], self.offset + start * self.row_bytes, self.path)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor, in memory of its own (for small ones: the final norm)."""
        buf = bytearray(self.rows * self.row_bytes)
        with self.open() as f, memoryview(buf) as mv:
            self.read_rows(f, mv, 0, self.rows)
        return torch.frombuffer(buf, dtype=self.dtype).view(self.shape).to(dtype)


def _check_table(source: TensorFile, what: str, shape=None) -> TensorFile:
    if len(source.shape) != 2 or shape is not None and list(shape) != source.shape:
        want = f"shape {list(shape)}" if shape is not None else "2-D"
        raise PagerError(f"{source.path}: {source.name!r} must be {want} for {what}, has shape {source.shape}")
    return source


class StreamedEmbedding(nn.Module):
    """nn.Embedding whose table stays in the file: each call reads the rows of its tokens (and, for an
    int8 table, their scales) and returns them as float32."""

    def __init__(self, source: TensorFile, dtype: torch.dtype = torch.float32, shape=None,
                 scales: TensorFile | None = None):
        super().__init__()
        self.source, self.dtype = _check_table(source, "an embedding", shape), dtype
        self.scales = _check_scales(scales, source)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        src = self.source
        ids = tokens.reshape(-1).tolist()
        if bad := [t for t in ids if not 0 <= t < src.rows]:
            raise IndexError(f"token ids must be in [0, {src.rows}), got {bad[:5]}")
        if not ids:
            return torch.empty(*tokens.shape, src.cols, dtype=self.dtype)
        rows = _gather(src, ids).view(*tokens.shape, src.cols)  # (B, T, C) of the stored dtype
        if self.scales is None:
            return rows.to(self.dtype)
        scales = _gather(self.scales, ids).view(*tokens.shape, 1)  # (B, T, 1)
        return (rows.float() * scales.float()).to(self.dtype)


def _gather(src: TensorFile, ids: list[int]) -> torch.Tensor:
    """Rows `ids` of `src`, (N, cols) in its stored dtype, in memory of their own."""
    buf = bytearray(len(ids) * src.row_bytes)
    with src.open() as f, memoryview(buf) as mv:
        for k, t in enumerate(ids):
            src.read_rows(f, mv[k * src.row_bytes:], t, 1)
    return torch.frombuffer(buf, dtype=src.dtype).view(len(ids), src.cols)


def _check_scales(scales: TensorFile | None, source: TensorFile) -> TensorFile | None:
    """An int8 table's per-row scales: (rows,) beside an int8 weight; None beside a float one."""
    if scales is None and source.dtype == torch.int8:
        raise PagerError(f"{source.path}: {source.name!r} is int8 but the file has no scales for it")
    if scales is not None and (source.dtype != torch.int8 or scales.shape != [source.rows]):
        raise PagerError(f"{scales.path}: {scales.name!r} must be ({source.rows},) scales of an int8 "
                         f"{source.name!r}, got {scales.shape} beside {source.dtype}")
    return scales


class StreamedHead(nn.Module):
    """A bias-free nn.Linear(C, V) whose weight is read in vocab slices on every call: float rows
    multiplied in `dtype`, or int8 rows (with their scales) on the int8 kernel with bf16 activations.
    Logits are float32."""

    def __init__(self, source: TensorFile, dtype: torch.dtype = torch.float32, chunk_bytes: int | None = None,
                 shape=None, scales: TensorFile | None = None):
        super().__init__()
        self.source, self.dtype = _check_table(source, "an LM head", shape), dtype
        self.scales = _check_scales(scales, source)
        rows = (chunk_bytes or CHUNK_BYTES) // source.row_bytes // 16 * 16  # whole SIMD tiles of rows
        self.chunk_rows = min(source.rows, max(16, rows))
        self._buf = new_buffer(self.chunk_rows * source.row_bytes)  # anonymous memory, reused every call
        self._raw = torch.frombuffer(self._buf, dtype=torch.uint8)
        self._converted = None if source.dtype in (dtype, torch.int8) else \
            torch.empty(self.chunk_rows, source.cols, dtype=dtype)
        self._scales = None if scales is None else torch.empty(self.chunk_rows, dtype=scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., V)
        src = self.source
        x2 = x.reshape(-1, src.cols)  # (N, C)
        xq = None if self.scales is None else x2.to(self._scales.dtype).contiguous()  # the int8 kernel's input
        out = torch.empty(x2.shape[0], src.rows, dtype=torch.float32)  # (N, V)
        scales = self.scales.open() if self.scales is not None else nullcontext()
        with src.open() as f, memoryview(self._buf) as mv, scales as fs:
            for a in range(0, src.rows, self.chunk_rows):
                n = min(self.chunk_rows, src.rows - a)
                src.read_rows(f, mv, a, n)
                w = self._raw[:n * src.row_bytes].view(src.dtype).view(n, src.cols)  # (n, C) rows a..a+n
                if xq is not None:
                    s = self._scales[:n]  # (n,) the rows' scales
                    with memoryview(s.view(torch.uint8).numpy()) as ms:
                        self.scales.read_rows(fs, ms, a, n)
                    out[:, a:a + n] = torch.ops.aten._weight_int8pack_mm(xq, w, s)  # (N, n)
                    continue
                if self._converted is not None:
                    w = self._converted[:n].copy_(w)
                out[:, a:a + n] = F.linear(x2.to(w.dtype), w)  # (N, n)
        return out.view(*x.shape[:-1], src.rows)


def _tensor_files(path: Path, name: str, shape) -> tuple[TensorFile, TensorFile | None]:
    """`name` of a head or embedding file (`<name>.weight`, with `<name>.scales` when int8)."""
    weight = TensorFile(path, f"{name}.weight")
    scales = TensorFile(path, f"{name}.scales") if weight.dtype == torch.int8 else None
    _check_table(weight, name, shape)
    return weight, scales


def attach_head(model: Llama, rank0_dir, stream: bool = False, dtype: torch.dtype = torch.float32) -> None:
    """Rank 0: give a model built on meta without them the embeddings, the final norm and the LM head.

    The embeddings are always read row by row from their file (a StreamedEmbedding costs no memory
    either way; tied ones from the head's file). stream=False (every block resident): the LM head is
    loaded, float in `dtype` or int8 on the int8 kernel; stream=True (paging): it is a StreamedHead
    too, and only the norm is in memory. Modules are made from loaded tensors: initialising an
    nn.Embedding on meta would pull in torch._dynamo (~75 MiB of RSS)."""
    rank0_dir, cfg = Path(rank0_dir), model.config
    shape = (cfg.vocab_size, cfg.hidden_size)
    head_file = rank0_dir / "head.safetensors"
    model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    head_src, head_scales = _tensor_files(head_file, "lm_head", shape)
    if stream:
        norm = TensorFile(head_file, "norm.weight").read(torch.float32)  # (C,)
        model.lm_head = StreamedHead(head_src, dtype, shape=shape, scales=head_scales)
    else:
        tensors = read_block(head_file, dtype)[0]
        norm = tensors["norm.weight"].float()  # (C,)
        if head_scales is not None:  # int8 rows and their scales, on the int8 kernel
            model.lm_head = WeightOnlyInt8Linear(tensors["lm_head.weight"], tensors["lm_head.scales"].to(torch.bfloat16))
        else:
            model.lm_head = CastLinear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
            model.lm_head.weight = nn.Parameter(tensors["lm_head.weight"], requires_grad=False)  # (V, C)
    model.norm.weight = nn.Parameter(norm, requires_grad=False)
    if cfg.tie_word_embeddings:
        model.embed_tokens = StreamedEmbedding(head_src, torch.float32, shape, head_scales)
    else:
        embed_src, embed_scales = _tensor_files(rank0_dir / "embed.safetensors", "embed_tokens", shape)
        model.embed_tokens = StreamedEmbedding(embed_src, torch.float32, shape, embed_scales)
