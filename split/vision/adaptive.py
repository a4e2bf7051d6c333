"""An adaptive model pair for the device (edge_runtime.vision.switch, the agent's `adaptive` pipeline):
the small and the big frame model as ONNX, and the switch settings, in one folder; optionally the
big model in a cloud repository too, for escalations when the link is good.

    from edge_runtime.vision.switch import SwitchConfig
    build_adaptive(small, big, "deploy/pose/device", (1, 96, 96), regression=4, aux=1,
                   switch={"strategy": "combined", "aux_threshold": 0.05, "hold": 4, "fuse": 0.3},
                   repo_dir="deploy/pose/repository", cloud_model="pose_big",
                   validate=SwitchConfig.from_dict)
    # device folder: small.onnx, big.onnx, adaptive.json

Output layout (both models map (B, *input_shape) -> (B, width)): the big model answers class logits
(any number, or none) then `regression` values; the small model answers the same, then `aux`
auxiliary values, the first of which is its predicted error on the frame. adaptive.json:

    {"input": {"name": "x", "shape": [1, 96, 96]}, "regression": 4, "aux": 1,
     "switch": {"strategy": "combined", ...}, "cloud_model": "pose_big"}

Nothing is written unless the models agree with `regression` and `aux` (checked on one example
frame) and, with `validate`, the switch settings pass it. `validate` is the caller's because split
sits below edge_runtime (pyproject.toml's layers) and cannot import SwitchConfig itself; the agent's
pipeline checks the same settings again when it loads the folder.
"""
import json
from pathlib import Path

import torch
from torch import nn

from split.vision.export import export_onnx

LAYOUT_KEYS = ("regression", "aux")     # the models' layout: top-level in adaptive.json, not switch settings


def _whole(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"build_adaptive: '{name}' must be a whole number >= {low}, got {value!r}")
    return value


def _widths(small: nn.Module, big: nn.Module, example: torch.Tensor, regression: int, aux: int) -> tuple:
    """(small width, big width) on `example`; ValueError when they disagree with regression / aux."""
    with torch.no_grad():
        outs = [m.eval()(example) for m in (small, big)]
    for which, out in zip(("small", "big"), outs):
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"build_adaptive: the {which} model must answer one (B, width) tensor, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    ws, wb = outs[0].shape[1], outs[1].shape[1]
    if ws != wb + aux:
        raise ValueError(f"build_adaptive: aux = {aux} disagrees with the models: the small model answers {ws} "
                         f"values per frame, the big one {wb} (expected small = big + aux = {wb + aux})")
    if regression > wb:
        raise ValueError(f"build_adaptive: regression = {regression} is more than the big model's {wb} outputs")
    return ws, wb


def build_adaptive(small: nn.Module, big: nn.Module, device_dir, input_shape, switch: dict | None = None,
                   repo_dir=None, cloud_model: str | None = None, regression: int = 2, aux: int = 0,
                   validate=None) -> Path:
    """Export the pair into `device_dir` (and the big model as `cloud_model` into `repo_dir`) with
    adaptive.json. `switch`: the switch's settings (strategy, thresholds, hold, fuse...; not regression
    or aux, which are the models' layout). `validate(settings)`: called with the switch settings plus
    regression and aux before anything is written; it raises ValueError on bad ones
    (edge_runtime.vision.switch.SwitchConfig.from_dict)."""
    regression, aux = _whole("regression", regression), _whole("aux", aux)
    shape = list(input_shape) if isinstance(input_shape, (list, tuple)) else None
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"build_adaptive: 'input_shape' must be a list of whole numbers >= 1, got {input_shape!r}")
    settings = dict(switch or {})
    for key in settings:
        if not isinstance(key, str):
            raise ValueError(f"build_adaptive: switch setting names must be strings, got {key!r}")
        if key in LAYOUT_KEYS:
            raise ValueError(f"build_adaptive: switch setting '{key}' is the models' layout: pass {key}= instead")
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"build_adaptive: switch settings must be JSON numbers, strings and lists: {err}") from None
    if validate is not None:
        validate({**settings, "regression": regression, "aux": aux})
    if cloud_model is not None and (not isinstance(cloud_model, str) or not cloud_model):
        raise ValueError(f"build_adaptive: 'cloud_model' must be a model name, got {cloud_model!r}")
    if cloud_model and repo_dir is None:
        raise ValueError("cloud_model needs repo_dir (the cloud repository to write it into)")
    device_dir = Path(device_dir)
    example = torch.rand(1, *shape)
    _widths(small, big, example, regression, aux)
    export_onnx(small.eval(), example, device_dir / "small.onnx", "x", ["y"])
    export_onnx(big.eval(), example, device_dir / "big.onnx", "x", ["y"])
    if cloud_model:
        export_onnx(big.eval(), example, Path(repo_dir) / cloud_model / "1" / "model.onnx", "x", ["y"])
        (Path(repo_dir) / cloud_model / "config.toml").write_text(
            "max_batch_size = 16\n[parameters]\nintra_op_thread_count = 1\n")
    manifest = {"input": {"name": "x", "shape": shape}, "regression": regression, "aux": aux,
                "switch": settings, "cloud_model": cloud_model}
    (device_dir / "adaptive.json").write_text(json.dumps(manifest, indent=1))
    return device_dir

