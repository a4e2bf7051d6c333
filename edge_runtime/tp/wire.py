"""Peer-to-peer wire format: one fixed-size header frame, then the raw buffer frame(s). No pickle.

Header (little-endian, 100 bytes, `HEADER`):
    magic b"EFTP" | version u8 | type u8 | rank u16 | world u16 | code u16 | layer i32 |
    step i64 | seq u64 | dtype u8 | ndim u8 | pad 2 | shape 8 x i64
Types: HELLO / WELCOME / REJECT (joining), PARTIAL / SUM (allreduce), BCAST (broadcast), GATHER
(a worker's bytes for the master), ABORT / BYE (leaving, with a UTF-8 reason). `code` is the
allreduce kind (0 attention, 1 MLP), the broadcast command, or in a HELLO the worker's payload
dtype. `layer` is the allreduce's layer; in a BCAST its `steps_from` (collective.py; -1: none).
Payload frames by dtype:
    F32 / F64 / F16 / BF16 / I64 / I32 / U8 / I8 / BYTES: one frame, row-major, exactly prod(shape) items
    Q8: int8 values, then fp32 scales, one per row (last dim): x ~= q * scale, scale = absmax / 127
    NONE: no payload frame
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

MAGIC, VERSION, MAX_NDIM = b"EFTP", 3, 8  # version 2: GATHER; 3: F64 partials, a BCAST's steps_from
HEADER = struct.Struct("<4sBBHHHiqQBB2x8q")


class WireError(ValueError):
    """A frame that is not a valid message (the text says which field and what was expected)."""


class Msg(IntEnum):
    HELLO, WELCOME, REJECT, PARTIAL, SUM, BCAST, ABORT, BYE, GATHER = range(1, 10)


class DType(IntEnum):
    NONE, BYTES, F32, F16, BF16, I64, I32, U8, I8, Q8, F64 = range(11)


# numpy item type of each raw dtype (bf16 travels as its 16 raw bits)
NUMPY = {DType.BYTES: np.uint8, DType.F32: np.float32, DType.F16: np.float16, DType.BF16: np.uint16,
       DType.I64: np.int64, DType.I32: np.int32, DType.U8: np.uint8, DType.I8: np.int8, DType.F64: np.float64}
_TORCH = {torch.float32: DType.F32, torch.float64: DType.F64, torch.float16: DType.F16, torch.bfloat16: DType.BF16,
          torch.int64: DType.I64, torch.int32: DType.I32, torch.uint8: DType.U8, torch.int8: DType.I8}
PAYLOAD_DTYPE = {"fp32": DType.F32, "fp16": DType.F16, "int8": DType.Q8}


@dataclass(frozen=True)
class Header:
    type: Msg
    rank: int = 0
    world: int = 0
    code: int = 0
    layer: int = -1
    step: int = 0
    seq: int = 0
    dtype: DType = DType.NONE
    shape: tuple[int, ...] = ()

    def pack(self) -> bytes:
        if len(self.shape) > MAX_NDIM:
            raise WireError(f"shape: at most {MAX_NDIM} dimensions, got {len(self.shape)}")
        shape = tuple(self.shape) + (0,) * (MAX_NDIM - len(self.shape))
        try:
            return HEADER.pack(MAGIC, VERSION, self.type, self.rank, self.world, self.code, self.layer,
                               self.step, self.seq, self.dtype, len(self.shape), *shape)
        except struct.error as e:  # a field out of its range (e.g. a negative command)
            raise WireError(f"header field out of range in {self}: {e}") from None


def unpack(frame) -> Header:
    """Parse and validate a header frame (bytes or any buffer)."""
    buf = memoryview(frame)
    if buf.nbytes != HEADER.size:
        raise WireError(f"header: expected {HEADER.size} bytes, got {buf.nbytes}")
    magic, version, typ, rank, world, code, layer, step, seq, dtype, ndim, *shape = HEADER.unpack(buf)
    if magic != MAGIC:
        raise WireError(f"header magic: expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise WireError(f"header version: expected {VERSION}, got {version}")
    if typ not in Msg._value2member_map_:
        raise WireError(f"header type: expected one of {[int(m) for m in Msg]}, got {typ}")
    if dtype not in DType._value2member_map_:
        raise WireError(f"header dtype: expected one of {[int(d) for d in DType]}, got {dtype}")
    if ndim > MAX_NDIM or any(d < 0 for d in shape[:ndim]) or any(shape[ndim:]):
        raise WireError(f"header shape: ndim {ndim} (max {MAX_NDIM}) with dims {shape}")
    return Header(Msg(typ), rank, world, code, layer, step, seq, DType(dtype), tuple(shape[:ndim]))


def encode(array: np.ndarray, dtype: DType) -> list:
    """Payload frames for a C-contiguous array (zero-copy where the dtype already matches)."""
    if dtype == DType.Q8:
        x = np.asarray(array, dtype=np.float32)
        rows = x.reshape(_rows(x.shape), x.shape[-1] if x.ndim else 1)  # (R, last dim)
        scale = (np.abs(rows).max(axis=1, initial=0.0) / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
        return [q, scale]
    if dtype == DType.F16:
        x = np.asarray(array, dtype=np.float32)
        with np.errstate(over="ignore"):
            out = x.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(x).all():
            raise WireError(f"fp16 payload overflows: max |x| = {np.abs(x).max():g} > 65504; use fp32 or int8")
        return [out]
    return [np.ascontiguousarray(array, dtype=NUMPY[dtype])]


def decode(header: Header, frames: list) -> np.ndarray | None:
    """The array a message carries (read-only views into the frames where possible; Q8 comes back
    dequantized as float32). Checks every buffer length against dtype x shape."""
    dtype, shape = header.dtype, header.shape
    want = 0 if dtype == DType.NONE else (2 if dtype == DType.Q8 else 1)
    if len(frames) != want:
        raise WireError(f"dtype {dtype.name}: expected {want} payload frame(s), got {len(frames)}")
    if dtype == DType.NONE:
        return None
    count = math.prod(shape)
    item = np.dtype(np.int8 if dtype == DType.Q8 else NUMPY[dtype])
    data = _buffer(frames[0])
    if data.nbytes != count * item.itemsize:
        raise WireError(f"payload: shape {shape} of {dtype.name} needs {count * item.itemsize} bytes, got {data.nbytes}")
    arr = np.frombuffer(data, dtype=item).reshape(shape)
    if dtype != DType.Q8:
        return arr
    rows = _rows(shape)
    scales = _buffer(frames[1])
    if scales.nbytes != rows * 4:
        raise WireError(f"payload: int8 shape {shape} needs {rows} fp32 row scales ({rows * 4} bytes), got {scales.nbytes}")
    scale = np.frombuffer(scales, dtype=np.float32)
    return (arr.reshape(rows, -1).astype(np.float32) * scale[:, None]).reshape(shape)


def _rows(shape) -> int:
    return math.prod(shape[:-1]) if shape else 1


def _buffer(frame) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def tensor_to_array(tensor: torch.Tensor) -> tuple[DType, np.ndarray]:
    """(wire dtype, numpy view sharing the tensor's memory) for any dtype in _TORCH."""
    if tensor.dtype not in _TORCH:
        raise WireError(f"tensor dtype: expected one of {[str(d) for d in _TORCH]}, got {tensor.dtype}")
    t = tensor.detach().contiguous()
    code = _TORCH[t.dtype]
    return code, (t.view(torch.int16).numpy().view(np.uint16) if code == DType.BF16 else t.numpy())


def array_to_tensor(dtype: DType, array: np.ndarray) -> torch.Tensor:
    """An owned, writable tensor (one copy out of the receive buffer)."""
    t = torch.from_numpy(np.array(array, copy=True))
    if dtype == DType.BF16:
        return t.view(torch.int16).view(torch.bfloat16)
    return t
