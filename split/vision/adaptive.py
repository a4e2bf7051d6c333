"""An adaptive model pair for the device (edge_runtime.vision.switch, the agent's `adaptive` pipeline):
the small and the big frame model as ONNX, and the switch settings, in one folder; optionally the
big model in a cloud repository too, for escalations when the link is good.

    build_adaptive(small, big, "deploy/frames/device", (1, 96, 96),
                   switch={"confidence": 0.9, "max_jump": 0.015, "hold": 2},
                   repo_dir="deploy/frames/repository", cloud_model="frame_big")
    # device folder: small.onnx, big.onnx, adaptive.json
"""
import json
from pathlib import Path

import torch
from torch import nn

from split.vision.export import export_onnx


def build_adaptive(small: nn.Module, big: nn.Module, device_dir, input_shape, switch: dict | None = None,
                   repo_dir=None, cloud_model: str | None = None, regression: int = 2) -> Path:
    """Models map (B, *input_shape) -> (B, classes + regression): class logits, then `regression`
    trailing values (the frame stream's x, y)."""
    device_dir = Path(device_dir)
    example = torch.rand(1, *input_shape)
    export_onnx(small.eval(), example, device_dir / "small.onnx", "x", ["y"])
    export_onnx(big.eval(), example, device_dir / "big.onnx", "x", ["y"])
    if cloud_model:
        if repo_dir is None:
            raise ValueError("cloud_model needs repo_dir (the cloud repository to write it into)")
        export_onnx(big.eval(), example, Path(repo_dir) / cloud_model / "1" / "model.onnx", "x", ["y"])
        (Path(repo_dir) / cloud_model / "config.toml").write_text(
            "max_batch_size = 16\n[parameters]\nintra_op_thread_count = 1\n")
    manifest = {"input": {"name": "x", "shape": list(input_shape)}, "regression": regression,
                "switch": dict(switch or {}), "cloud_model": cloud_model}
    (device_dir / "adaptive.json").write_text(json.dumps(manifest, indent=1))
    return device_dir
