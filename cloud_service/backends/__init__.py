"""Backends run a model. Each is a small class with one job: `infer(inputs, state) -> outputs`.

Add a backend by subclassing `Backend` and naming it in `open_backend` and config.BACKENDS.
`llm_continuation` (backends/llm.py) keeps its per-session KV cache in the session store.
A stateful backend raises InvalidArgument only before it touches `state`, so such an error
leaves the session usable; any other error ends the session.
"""
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from cloud_service.config import ModelConfig, TensorSpec
from cloud_service.errors import ConfigError


class Backend(ABC):
    platform: str = ""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], state: dict | None = None) -> dict[str, np.ndarray]:
        """Run the model. `state` is the session's own dict for stateful models (kept between
        requests of one sequence_id by the session store), None otherwise."""

    def close(self) -> None:
        """Release what the backend holds (sessions, threads)."""


def detect_backend(version_dir: Path, config: ModelConfig) -> str:
    if config.backend:
        return config.backend
    if (version_dir / "model.onnx").exists():
        return "onnxruntime"
    if (version_dir / "model.py").exists():
        return "pytorch"
    raise ConfigError(f"{version_dir}: no model.onnx or model.py")


def open_backend(version_dir: Path, config: ModelConfig) -> Backend:
    kind = detect_backend(version_dir, config)
    if kind == "onnxruntime":
        from cloud_service.backends.onnx import OnnxBackend
        return OnnxBackend(version_dir / "model.onnx", config)
    if kind == "llm_continuation":
        from cloud_service.backends.llm import LlmContinuationBackend  # imports torch only when needed
        return LlmContinuationBackend(version_dir, config)
    from cloud_service.backends.pytorch import TorchBackend  # imports torch only when needed
    return TorchBackend(version_dir, config)
