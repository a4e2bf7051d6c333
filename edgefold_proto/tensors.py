"""Tensors on the Open Inference Protocol wire: datatype names (and ONNX Runtime's), numpy dtypes, raw bytes.

Raw contents are row-major and little-endian. A BYTES tensor's raw form is, for each
element in row-major order, a 4-byte little-endian length followed by that many bytes.
Shared by both sides: edgefold_proto.serving decodes requests with it, the edge runtime's
clients encode them.
"""
import struct

import numpy as np

# OIP datatype -> numpy dtype (little-endian). BYTES elements are Python bytes objects.
DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_NUMPY = {dt.newbyteorder("=") if dt.kind != "O" else dt: name for name, dt in DTYPES.items()}
# ONNX Runtime type name (NodeArg.type) -> OIP datatype.
ORT_DATATYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Field of InferTensorContents that carries each datatype when a client does not send raw bytes.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class TensorError(ValueError):
    """A tensor whose bytes, shape or datatype do not agree. The message names the tensor."""


def datatype_of(array: np.ndarray) -> str:
    """OIP datatype name for a numpy array (str/bytes/object arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_NUMPY[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TensorError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def element_count(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def to_raw(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes of an array; BYTES as length-prefixed elements."""
    if datatype_of(array) == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def from_raw(name: str, datatype: str, shape, raw: bytes) -> np.ndarray:
    """Decode raw contents of tensor `name`; raises TensorError naming what does not match."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"tensor '{name}': unknown datatype '{datatype}', expected one of {', '.join(DTYPES)}")
    if any(int(d) < 0 for d in shape):
        raise TensorError(f"tensor '{name}': shape {list(shape)} has a negative dimension")
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"tensor '{name}': {len(raw)} raw bytes, expected {expected} "
            f"({count} x {datatype} for shape {list(shape)})"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    items = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"tensor '{name}': BYTES element {len(items)} has a truncated length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"tensor '{name}': BYTES element {len(items)} claims {length} bytes, "
                              f"only {len(raw) - offset} remain")
        items.append(bytes(view[offset:offset + length]))
        offset += length
        if len(items) > count:
            break
    if len(items) != count:
        raise TensorError(f"tensor '{name}': {len(items)} BYTES elements, expected {count}")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def from_contents(name: str, datatype: str, shape, contents) -> np.ndarray:
    """Decode the typed `InferTensorContents` form (used by clients that do not send raw bytes)."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"tensor '{name}': datatype {datatype} must be sent as raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise TensorError(f"tensor '{name}': {len(values)} values in {field}, expected {count} for shape {list(shape)}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    dtype = DTYPES[datatype]
    array = np.asarray(values)
    if dtype.kind in "iu" and len(values) and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise TensorError(f"tensor '{name}': values out of range for {datatype}")
    return array.astype(dtype).reshape(shape)
