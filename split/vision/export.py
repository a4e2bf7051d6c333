"""ONNX export of model parts, and writing a tail into a cloud model repository.

    export_onnx(head, example, "head.onnx", "x", ["y"])
    write_tail(repo, "res_cnn_tail_stage2", tail, activation)   # repo/<name>/1/model.onnx + config.toml

Exports use the TorchScript exporter (no onnxscript needed) at opset 17 with a dynamic batch
dimension, so the same file serves a camera (batch 1) and a batching cloud.
"""
import warnings
from pathlib import Path

import torch
from torch import nn

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
               output_name: str = "logits", max_batch_size: int = 16, threads: int = 1) -> Path:
    """The tail as an ordinary cloud model: `repo/name/1/model.onnx` and `repo/name/config.toml`."""
    model_dir = Path(repo) / name
    export_onnx(tail, activation[:1], model_dir / "1" / "model.onnx", input_name, [output_name])
    (model_dir / "config.toml").write_text(
        f"# tail of a split model: input '{input_name}' is the head's activation {list(activation.shape[1:])}\n"
        f"max_batch_size = {max_batch_size}\n[parameters]\nintra_op_thread_count = {threads}\n")
    return model_dir
