"""The wire codec for activations and frames (numpy only: the device, the cloud and training use it).

    enc = encode(z, "int8")              # z: float32 (B, C, ...) -> enc.data uint8, enc.parameters
    z2 = decode(enc.data, enc.parameters)  # float32, |z - z2| <= scale/2 per channel

Codecs (the wire tensor's datatype in brackets):
  int8  [UINT8]  asymmetric 8-bit: q = clip(round(x / scale) + zero_point, 0, 255)
        [INT8]   decode also accepts signed values: zero_point in -128..127
  int4  [UINT8]  the same with 4 bits (0..15), two values per byte along the last axis (element
                 2i in the low nibble); the wire shape is [..., ceil(W/2)] and `last_dim` = W
  png   [BYTES]  a frame (B, 1, H, W) in [0, 1] quantized to 8 bits (scale 1/255), one grayscale
                 PNG per batch element (wire shape [B]); decodes to (B, 1, H, W)
  fp16 is not a codec: send the tensor as FP16.

Parameters (the InferInputTensor `parameters` on the Open Inference Protocol wire):
  codec       string: "int8" | "int4" | "png"
  scale       per-channel: a string of comma-separated floats ('%.9g', exact for float32), one
              per index along `axis`; per-tensor: one value (a string, or a double parameter)
  zero_point  the same layout with integers (a string, or an int64 parameter)
  axis        int64, the channel axis (absent: per-tensor); negative counts from the end
  last_dim    int64, int4 only: the unpacked size of the last axis
Dequantization: x = (q - zero_point) * scale, broadcast along `axis`.
"""
from dataclasses import dataclass

import numpy as np

from split.png import PngError, decode_png, encode_png

CODECS = ("int8", "int4", "png")
LEVELS = {"int8": 255, "int4": 15}


class CodecError(ValueError):
    """Codec parameters that do not fit the tensor; the message says which and what was expected."""


@dataclass
class Encoded:
    data: np.ndarray            # the wire tensor: uint8, or an object array of PNG bytes
    parameters: dict            # codec, scale, zero_point[, axis, last_dim]
    scale: np.ndarray | None = None       # int8 / int4: float32 (C,) (or (1,)), what `parameters` spells out
    zero_point: np.ndarray | None = None  # int8 / int4: uint8 (C,), likewise

    @property
    def datatype(self) -> str:
        return "BYTES" if self.data.dtype == object else "UINT8"

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: tensor payload plus the codec parameters' text."""
        payload = sum(len(b) for b in self.data.ravel()) if self.data.dtype == object else self.data.nbytes
        return payload + sum(len(str(k)) + len(str(v)) for k, v in self.parameters.items())


def _floats(values) -> str:
    return ",".join(f"{v:.9g}" for v in np.asarray(values, np.float32).ravel())


def _ints(values) -> str:
    return ",".join(str(int(v)) for v in np.asarray(values).ravel())


def quantize_params(x: np.ndarray, levels: int, axis: int | None):
    """Per-channel (or per-tensor) asymmetric scale and zero point; the range always includes 0."""
    if axis is None:
        lo, hi = np.minimum(x.min(), 0)[None], np.maximum(x.max(), 0)[None]
    else:
        moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)   # (C, rest)
        lo, hi = np.minimum(moved.min(1), 0), np.maximum(moved.max(1), 0)
    scale = ((hi - lo) / levels).astype(np.float32)
    scale[scale <= 0] = 1.0                                          # a constant-zero channel
    zero = np.clip(np.round(-lo / scale), 0, levels).astype(np.int64)
    return scale, zero


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def encode(x: np.ndarray, codec: str = "int8", axis: int | None = 1) -> Encoded:
    x = np.asarray(x, np.float32)
    if codec not in CODECS:
        raise CodecError(f"codec '{codec}' is not one of {', '.join(CODECS)}")
    if codec == "png":
        if x.ndim != 4 or x.shape[1] != 1:
            raise CodecError(f"png takes frames (B, 1, H, W), got shape {list(x.shape)}")
        q = np.clip(np.round(x[:, 0] * 255), 0, 255).astype(np.uint8)
        data = np.empty(x.shape[0], dtype=object)
        data[:] = [encode_png(img) for img in q]
        return Encoded(data, {"codec": "png", "scale": _floats([1 / 255]), "zero_point": "0"})
    if axis is not None:
        axis = axis % x.ndim
    levels = LEVELS[codec]
    scale, zero = quantize_params(x, levels, axis)
    q = np.clip(np.round(x / _broadcast(scale, x.ndim, axis)) + _broadcast(zero, x.ndim, axis), 0, levels)
    q = q.astype(np.uint8)
    params = {"codec": codec, "scale": _floats(scale), "zero_point": _ints(zero)}
    if axis is not None:
        params["axis"] = axis
    if codec == "int4":
        params["last_dim"] = x.shape[-1]
        if x.shape[-1] % 2:
            q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], -1)
        q = q[..., 0::2] | (q[..., 1::2] << 4)                       # (..., ceil(W/2))
    return Encoded(np.ascontiguousarray(q), params, scale, zero.astype(np.uint8))


def _parse_list(name: str, value, kind):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return np.array([value], dtype=kind)
    try:
        return np.array([kind(v) for v in str(value).split(",")], dtype=kind)
    except ValueError:
        raise CodecError(f"parameter '{name}' must be a number or comma-separated numbers, got {str(value)[:40]!r}") from None


def _int_param(params: dict, name: str):
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"parameter '{name}' must be an integer, got {value!r}")
    return value


def decode(data: np.ndarray, params: dict) -> np.ndarray:
    """Dequantize a wire tensor to float32; raises CodecError naming the parameter at fault."""
    codec = params.get("codec")
    if codec not in CODECS:
        raise CodecError(f"parameter 'codec' is {codec!r}, expected one of {', '.join(CODECS)}")
    for name in ("scale", "zero_point"):
        if name not in params:
            raise CodecError(f"codec '{codec}' needs parameter '{name}'")
    scale = _parse_list("scale", params["scale"], float).astype(np.float32)
    zero = _parse_list("zero_point", params["zero_point"], int)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise CodecError("parameter 'scale' must hold finite values > 0")
    if codec == "png":
        if data.dtype != object or data.ndim != 1:
            raise CodecError(f"codec 'png' travels as a BYTES tensor of shape [batch], got {data.dtype} {list(data.shape)}")
        try:
            images = [decode_png(bytes(item)) for item in data]
        except PngError as err:
            raise CodecError(f"png: {err}") from None
        if len({im.shape for im in images}) > 1:
            raise CodecError("png: the batch's images differ in size")
        q, axis = np.stack(images)[:, None].astype(np.int64), None    # (B, 1, H, W)
        levels, low = 255, 0
    else:
        if data.dtype not in (np.uint8, np.int8):
            raise CodecError(f"codec '{codec}' travels as UINT8 (or INT8 for int8), got {data.dtype}")
        if codec == "int4" and data.dtype != np.uint8:
            raise CodecError("codec 'int4' travels as UINT8 (two values per byte)")
        q = data.astype(np.int64)
        if codec == "int4":
            last = _int_param(params, "last_dim")
            if last is None or last < 1 or (last + 1) // 2 != data.shape[-1]:
                raise CodecError(f"codec 'int4' needs parameter 'last_dim' with ceil(last_dim / 2) = "
                                 f"{data.shape[-1]} (the packed last axis), got {params.get('last_dim')!r}")
            q = np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:-1], -1)[..., :last]
        levels, low = (15, 0) if codec == "int4" else (255, 0) if data.dtype == np.uint8 else (127, -128)
        axis = _int_param(params, "axis")
    if axis is not None:
        if not -q.ndim <= axis < q.ndim:
            raise CodecError(f"parameter 'axis' is {axis}, the tensor has {q.ndim} dimensions")
        axis %= q.ndim
        count = q.shape[axis]
    else:
        count = 1
    for name, values in (("scale", scale), ("zero_point", zero)):
        if len(values) != count:
            where = f"one per index of axis {axis} ({count})" if axis is not None else "one (no 'axis' parameter)"
            raise CodecError(f"parameter '{name}' has {len(values)} values, expected {where}")
    if np.any(zero < low) or np.any(zero > levels):
        raise CodecError(f"parameter 'zero_point' must lie in {low}..{levels} for codec '{codec}' on {data.dtype}")
    return ((q - _broadcast(zero, q.ndim, axis)) * _broadcast(scale, q.ndim, axis)).astype(np.float32)
