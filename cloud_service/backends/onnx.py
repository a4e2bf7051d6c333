"""ONNX Runtime backend: `DIR/<model>/<version>/model.onnx`."""
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cloud_service.backends.base import Backend
from cloud_service.config import ConfigError, ModelConfig, TensorSpec
from edgefold_proto.serving import InvalidArgument
from edgefold_proto.tensors import ORT_DATATYPES
# Accelerators first, then the CPU; only those this onnxruntime build has are used.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested=None) -> list[str]:
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ConfigError(f"parameters.providers: {missing} not available; this machine has {available}")
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available]


def _model_specs(nodes, config: ModelConfig, declared: list[TensorSpec], kind: str) -> list[TensorSpec]:
    """The model's own tensors, checked against what config.toml declares (if it does)."""
    found = {}
    for node in nodes:
        datatype = ORT_DATATYPES.get(node.type)
        if datatype is None:
            raise ConfigError(f"model '{config.name}': {kind} '{node.name}' has unsupported type {node.type}")
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in node.shape)
        if config.max_batch_size > 0:
            if not dims or dims[0] != -1:
                raise ConfigError(f"model '{config.name}': max_batch_size > 0 needs a variable first "
                                  f"dimension on {kind} '{node.name}', the model has {list(node.shape)}")
            dims = dims[1:]
        found[node.name] = TensorSpec(node.name, datatype, dims)
    if not declared:
        return list(found.values())
    for spec in declared:
        model_spec = found.get(spec.name)
        if model_spec is None:
            raise ConfigError(f"model '{config.name}': config {kind} '{spec.name}' is not in the model "
                              f"(it has {', '.join(found)})")
        if model_spec.datatype != spec.datatype:
            raise ConfigError(f"model '{config.name}': {kind} '{spec.name}' is {model_spec.datatype} "
                              f"in the model, config says {spec.datatype}")
    return declared


def _utf8(name: str, array: np.ndarray) -> np.ndarray:
    text = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        try:
            text[index] = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{name}': element {list(index)} is not UTF-8; "
                                  "ONNX string tensors hold text") from None
    return text


class OnnxBackend(Backend):
    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, config: ModelConfig):
        options = ort.SessionOptions()
        params = config.parameters
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", 0))
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", 0))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=choose_providers(params.get("providers")))
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise ConfigError(f"{path}: onnxruntime cannot load it: {err}") from None
        self.inputs = _model_specs(self.session.get_inputs(), config, config.inputs, "input")
        self.outputs = _model_specs(self.session.get_outputs(), config, config.outputs, "output")
        self._output_names = [spec.name for spec in self.outputs]
        self._string_inputs = {spec.name for spec in self.inputs if spec.datatype == "BYTES"}

    def infer(self, inputs, state=None):
        feeds = inputs
        if self._string_inputs:  # onnxruntime wants str elements for tensor(string)
            feeds = dict(inputs)
            for name in self._string_inputs:
                feeds[name] = _utf8(name, inputs[name])
        values = self.session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values))
