"""Compressed input tensors: a UINT8/INT8 (or BYTES, for png) tensor whose `parameters` carry
`codec`, `scale`, `zero_point` (and `axis`, `last_dim`) is dequantized here, before the model
runs, to the float tensor the model declares. The codec itself is `split.codec` (numpy only),
shared with the device that encoded it; its docstring is the parameter contract.
"""
import numpy as np

from cloud_service.config import TensorSpec
from edgefold_proto import pb
from edgefold_proto.serving import InvalidArgument, parameters
from edgefold_proto.tensors import DTYPES
from split.codec import CodecError, decode

WIRE_TYPES = {"int8": ("UINT8", "INT8"), "int4": ("UINT8",), "png": ("BYTES",)}
FLOAT_TYPES = ("FP32", "FP16", "FP64")  # what a compressed tensor may decode to (numpy dtype: DTYPES)


def is_compressed(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return "codec" in tensor.parameters


def check_wire_type(tensor, spec: TensorSpec) -> None:
    codec = tensor.parameters["codec"].string_param
    allowed = WIRE_TYPES.get(codec)
    if allowed is None:
        raise InvalidArgument(f"input '{tensor.name}': parameter 'codec' is {codec!r}, expected one of "
                              f"{', '.join(WIRE_TYPES)}")
    if tensor.datatype not in allowed:
        raise InvalidArgument(f"input '{tensor.name}': codec '{codec}' travels as {' or '.join(allowed)}, "
                              f"got datatype {tensor.datatype or '(empty)'}")
    if spec.datatype not in FLOAT_TYPES:
        raise InvalidArgument(f"input '{tensor.name}': a compressed tensor decodes to floats, but the model "
                              f"takes {spec.datatype}")


def decompress(tensor, wire: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The dequantized input, in the model's float type; INVALID_ARGUMENT names the tensor."""
    try:
        array = decode(wire, parameters(tensor.parameters))
    except CodecError as err:
        raise InvalidArgument(f"input '{tensor.name}': {err}") from None
    return array.astype(DTYPES[spec.datatype], copy=False)
