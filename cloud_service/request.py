"""Check a ModelInferRequest's inputs against the model's config.toml before the model runs.

edgefold_proto.serving decodes the tensors; this adds what the model declares: names,
datatypes, shapes (with the batch dimension), compressed inputs and NaN/Inf. Every check names
the tensor and what was expected, so clients get INVALID_ARGUMENT with a message they can act
on, and the server never runs a model on malformed input.
"""
import numpy as np

from cloud_service.compressed import check_wire_type, decompress, is_compressed
from cloud_service.config import ModelConfig, TensorSpec
from edgefold_proto import pb
from edgefold_proto.serving import InvalidArgument, decode_tensor, input_tensors


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


def model_inputs(request: pb.ModelInferRequest, config: ModelConfig) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays, each checked against `config` before it is decoded."""
    by_name = {spec.name: spec for spec in config.inputs}
    max_batch_size = config.max_batch_size
    arrays = {}
    for tensor, raw in input_tensors(request):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"unexpected input '{tensor.name}'; model '{request.model_name}' "
                                  f"takes {', '.join(by_name)}")
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
        array = decode_tensor(tensor, raw)
        if compressed:
            array = decompress(tensor, array, spec)
            _check_shape(spec, list(array.shape), max_batch_size)
        if array.dtype.kind == "f" and not spec.allow_non_finite and not np.isfinite(array).all():
            raise InvalidArgument(f"input '{tensor.name}': contains NaN or Inf, which this model does not accept")
        arrays[tensor.name] = array
    missing = [name for name, spec in by_name.items() if name not in arrays and not spec.optional]
    if missing:
        raise InvalidArgument(f"missing input(s) {', '.join(repr(m) for m in missing)} for model '{request.model_name}'")
    if max_batch_size > 0:
        batch_sizes = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(batch_sizes.values())) > 1:
            raise InvalidArgument(f"inputs disagree on the batch dimension: {batch_sizes}")
    return arrays
