"""Backends run a model. Each is a small class with one job: `infer(inputs, state) -> outputs`
(the `Backend` interface, backends/base.py).

Add a backend by subclassing `Backend` and naming it in `open_backend` and config.BACKENDS;
the kinds are imported here only when a model needs them (torch only for pytorch, llm_continuation
and llm_stream). `llm_continuation` (backends/llm.py) keeps its per-session KV cache in the
session store; `llm_stream` (backends/llm_stream.py) is decoupled: `open_stream(inputs, parameters)`
gives one response per generated token, its streams batched step by step (step_batcher.py).
"""
from pathlib import Path

from cloud_service.backends.base import Backend
from cloud_service.config import ConfigError, ModelConfig


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
        from cloud_service.backends.llm import LlmContinuationBackend
        return LlmContinuationBackend(version_dir, config)
    if kind == "llm_stream":
        from cloud_service.backends.llm_stream import LlmStreamBackend
        return LlmStreamBackend(version_dir, config)
    from cloud_service.backends.pytorch import TorchBackend
    return TorchBackend(version_dir, config)
