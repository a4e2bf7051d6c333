"""ONNX export of model parts, and writing a tail into a cloud model repository.

    export_onnx(head, example, "head.onnx", "x", ["y"])
    write_tail(repo, "res_cnn_tail_stage2", tail, activation)   # repo/<name>/1/model.onnx + config.toml
    write_tail(repo, "res_cnn_tail_stage2_int8", tail, activation, codec="int8")   # self-contained:
        # inputs z_q, z_scale, z_zero_point instead of z (split.vision.dequant_tail)

Exports use the TorchScript exporter (no onnxscript needed) at opset 17 with a dynamic batch
dimension, so the same file serves a camera (batch 1) and a batching cloud.
"""
import warnings
from pathlib import Path

import torch
from torch import nn

from split.vision.dequant_tail import input_names, self_contained_tail

OPSET = 17


def export_onnx(module: nn.Module, example, path: Path, input_names, output_names) -> Path:
    """Export `module` called with `example` (a tensor or tuple). Batch is dynamic on every tensor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = [input_names] if isinstance(input_names, str) else list(input_names)
    example = example if isinstance(example, tuple) else (example,)
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, example, str(path), input_names=input_names, output_names=list(output_names),
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return path


def write_tail(repo: Path, name: str, tail: nn.Module, activation: torch.Tensor, input_name: str = "z",
               output_name: str = "logits", max_batch_size: int = 16, threads: int = 1,
               codec: str | None = None) -> Path:
    """The tail as an ordinary cloud model: `repo/name/1/model.onnx` and `repo/name/config.toml`.
    `codec` ("int8" | "int4"): self-contained, the graph starts with that codec's dequantization
    (split.vision.dequant_tail: inputs <input_name>_q, _scale, _zero_point; max_batch_size 0)."""
    model_dir = Path(repo) / name
    path = export_onnx(tail, activation[:1], model_dir / "1" / "model.onnx", input_name, [output_name])
    what = f"input '{input_name}' is the head's activation {list(activation.shape[1:])}"
    if codec is not None:
        self_contained_tail(path, path, codec, input_name)
        q, scale, zero = input_names(input_name)
        what = (f"self-contained {codec}: inputs '{q}' (the encoded activation {list(activation.shape[1:])}), "
                f"'{scale}', '{zero}' (per channel)")
        max_batch_size = 0    # the codec values have no batch dimension
    (model_dir / "config.toml").write_text(
        f"# tail of a split model: {what}\n"
        f"max_batch_size = {max_batch_size}\n[parameters]\nintra_op_thread_count = {threads}\n")
    return model_dir
