"""Write an ED-ViT deployment (issue 16): one ordinary model package per sub-model, for the peers
(an agent serves each with a `local` pipeline), and the requesting device's package: the fusion and
the partition (read by edge_runtime.vision.edvit_runtime, no torch there).

    write_edvit(out, parts, subs, fusion, input_shape=(1, 64, 64))

    out/edvit_sub<i>/model.onnx     input "x" (B, 1, 64, 64) -> "logits" (B, len(parts[i]) + 1)
    out/edvit/edvit.json            parts, sub-model names, input shape, each sub-model's MACs/params
    out/edvit/fusion.onnx           inputs "answers" (B, sum of widths), "present" (B, peers) -> "logits"
"""
import json
from pathlib import Path

import torch
from torch import nn

from split.vision.edvit import Fusion, fusion_inputs
from split.vision.export import export_onnx
from split.vision.flops import macs

MANIFEST = "edvit.json"


def write_edvit(out: Path, parts: list[list[int]], subs: list[nn.Sequential], fusion: Fusion,
                input_shape: tuple = (1, 64, 64), prefix: str = "edvit") -> Path:
    """Export every sub-model and the fusion; returns the requesting device's package folder."""
    out = Path(out)
    example = torch.rand(1, *input_shape)
    models = []
    for i, (classes, sub) in enumerate(zip(parts, subs)):
        name = f"{prefix}_sub{i}"
        export_onnx(sub, example, out / name / "model.onnx", "x", ["logits"])
        models.append({"name": name, "classes": classes, "macs": macs(sub, example),
                       "params": sum(p.numel() for p in sub.parameters())})
    package = out / prefix
    with torch.no_grad():
        answers, present = fusion_inputs([sub.eval()(example) for sub in subs], parts)
    export_onnx(fusion, (answers, present), package / "fusion.onnx", ["answers", "present"], ["logits"])
    manifest = {"kind": "edvit", "input": {"name": "x", "shape": list(input_shape)}, "sub_models": models,
                "classes": sum(len(p) for p in parts)}
    (package / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return package
