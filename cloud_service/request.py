"""Turn a ModelInferRequest into checked numpy inputs, and outputs into a response.

Every check names the tensor and what was expected: clients get INVALID_ARGUMENT with a
message they can act on, and the server never runs a model on malformed input.
"""
import numpy as np
from google.protobuf.message import DecodeError

from cloud_service.compressed import check_wire_type, decompress, is_compressed
from cloud_service.config import TensorSpec
from cloud_service.errors import InvalidArgument
from edgefold_proto import pb
from edgefold_proto.tensors import TensorError, datatype_of, from_contents, from_raw, to_raw


def parse_message(message_type, raw: bytes):
    """A request's raw bytes as `message_type`; a malformed message is INVALID_ARGUMENT (gRPC's own
    deserializer would make it UNKNOWN)."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(f"the request is not a valid {message_type.DESCRIPTOR.name} protobuf message") from None


def _check_shape(spec: TensorSpec, shape: list[int], max_batch_size: int) -> None:
    dims = spec.dims
    if max_batch_size > 0:
        if not shape or not 1 <= shape[0] <= max_batch_size:
            raise InvalidArgument(f"input '{spec.name}': shape {shape} needs a batch dimension "
                                  f"of 1..{max_batch_size} followed by {list(dims)}")
        shape = shape[1:]
    if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
        batch = "[batch] + " if max_batch_size > 0 else ""
        raise InvalidArgument(f"input '{spec.name}': shape {list(shape)} does not match the model's "
                              f"{batch}{list(dims)} (-1 is any size)")


def decode_inputs(request: pb.ModelInferRequest, specs: list[TensorSpec], max_batch_size: int) -> dict[str, np.ndarray]:
    by_name = {spec.name: spec for spec in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                              "send one raw buffer per input, in input order")
    arrays = {}
    for i, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"unexpected input '{tensor.name}'; model '{request.model_name}' "
                                  f"takes {', '.join(by_name)}")
        if tensor.name in arrays:
            raise InvalidArgument(f"input '{tensor.name}' is given twice")
        compressed = is_compressed(tensor)   # a UINT8/INT8/BYTES wire tensor with codec parameters
        if compressed:
            check_wire_type(tensor, spec)
        elif tensor.datatype != spec.datatype:
            raise InvalidArgument(f"input '{tensor.name}': datatype {tensor.datatype or '(empty)'}, expected {spec.datatype}")
        shape = list(tensor.shape)
        if not compressed:
            _check_shape(spec, shape, max_batch_size)
        elif max_batch_size > 0 and (not shape or not 1 <= shape[0] <= max_batch_size):
            raise InvalidArgument(f"input '{tensor.name}': compressed shape {shape} needs a batch dimension "
                                  f"of 1..{max_batch_size}")
        try:
            if raw:
                array = from_raw(tensor.name, tensor.datatype, shape, raw[i])
            else:
                array = from_contents(tensor.name, tensor.datatype, shape, tensor.contents)
        except TensorError as err:
            raise InvalidArgument(str(err)) from None
        if compressed:
            array = decompress(tensor, array, spec)
            _check_shape(spec, list(array.shape), max_batch_size)
        if array.dtype.kind == "f" and not spec.allow_non_finite and not np.isfinite(array).all():
            raise InvalidArgument(f"input '{tensor.name}': contains NaN or Inf, which this model does not accept")
        arrays[tensor.name] = array
    missing = [name for name in by_name if name not in arrays]
    if missing:
        raise InvalidArgument(f"missing input(s) {', '.join(repr(m) for m in missing)} for model '{request.model_name}'")
    if max_batch_size > 0:
        batch_sizes = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(batch_sizes.values())) > 1:
            raise InvalidArgument(f"inputs disagree on the batch dimension: {batch_sizes}")
    return arrays


def requested_outputs(request: pb.ModelInferRequest, specs: list[TensorSpec]) -> list[str]:
    names = [spec.name for spec in specs]
    if not request.outputs:
        return names
    wanted = [out.name for out in request.outputs]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise InvalidArgument(f"requested output(s) {unknown} not produced by model '{request.model_name}'; "
                              f"it has {', '.join(names)}")
    return wanted


def encode_response(request: pb.ModelInferRequest, model_name: str, version: str,
                    outputs: dict[str, np.ndarray], names: list[str]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request.id)
    for name in names:
        array = np.asarray(outputs[name])
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype_of(array)
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(to_raw(array))
    return response
