"""PyTorch backend for models that do not export to ONNX.

A version folder holds `model.py` and, optionally, `model.safetensors` (no pickle):

    # DIR/<model>/1/model.py
    def build_model(config):            # config: cloud_service.config.ModelConfig
        return MyModule()               # any torch.nn.Module

The module is called with the inputs as tensors, in config order, and returns one tensor
or a tuple in config output order. For a stateful model ([sequence_batching] in
config.toml) it is also given `state=`, a dict kept per sequence_id by the session store.
config.toml must declare the inputs and outputs, as Triton's PyTorch backend requires.
"""
import importlib.util
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model

from cloud_service.backends.base import Backend
from cloud_service.config import ConfigError, ModelConfig


def _import_model_file(path: Path, unique_name: str):
    spec = importlib.util.spec_from_file_location(unique_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "build_model"):
        raise ConfigError(f"{path}: defines no build_model(config)")
    return module


class TorchBackend(Backend):
    platform = "pytorch_safetensors"

    def __init__(self, version_dir: Path, config: ModelConfig):
        if not config.inputs or not config.outputs:
            raise ConfigError(f"model '{config.name}': the pytorch backend needs [[input]] and [[output]] in config.toml")
        self.inputs, self.outputs, self.stateful = config.inputs, config.outputs, config.stateful
        module_name = f"edgefold_repository_{config.name}_{version_dir.name}"
        self.module = _import_model_file(version_dir / "model.py", module_name).build_model(config)
        weights = version_dir / "model.safetensors"
        if weights.exists():
            missing, unexpected = load_model(self.module, weights, strict=False)
            if missing or unexpected:
                raise ConfigError(f"{weights}: missing tensors {missing}, unexpected tensors {unexpected}")
        self.module.eval()
        threads = config.parameters.get("intra_op_thread_count")
        if threads:
            torch.set_num_threads(int(threads))

    @torch.inference_mode()
    def infer(self, inputs, state=None):
        tensors = [torch.from_numpy(np.array(inputs[spec.name])) for spec in self.inputs]
        result = self.module(*tensors, state=state) if self.stateful else self.module(*tensors)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != len(self.outputs):
            raise RuntimeError(f"model returned {len(result)} outputs, config declares {len(self.outputs)}")
        return {spec.name: value.detach().cpu().numpy() for spec, value in zip(self.outputs, result)}
