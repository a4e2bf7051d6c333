"""Write a deployment: the device's ONNX stage chain (with exits and bottleneck encoders) and
the cloud's model repository (tails per cut, bottleneck tails, the whole model for full offload).

    build_deployment(net, "res_cnn", out / "device", out / "repository", bottlenecks={("stage2", 8): bn},
                     thresholds=calibrated, validation=x_val)

Device folder (read by edge_runtime.vision.deployment, no torch there):
    deployment.json            stages, exits, cuts, cloud model names, thresholds, measured accuracy,
                               exit_rates (given validation frames: at each exit, the fraction of the
                               frames reaching it that leave there at these thresholds; the planner's)
    stages/<i>_<name>.onnx     input "x" -> output "y" (+ "exit": exit-branch logits when one follows)
    encoders/<stage>_b<c>.onnx input "x" (the stage's output) -> "z" (bottleneck features)
Repository (served by cloud-service, or any Open Inference Protocol server):
    <model>_full          input "image" (the frame) -> "logits"
    <model>_tail_<stage>  input "z" (the activation after <stage>) -> "logits"
    <model>_tail_<stage>_b<c>  input "z" (bottleneck features) -> "logits"
    <model>_tail_<stage>_<codec>  with self_contained=("int8", "int4"): inputs "z_q", "z_scale",
                          "z_zero_point" (split.vision.dequant_tail) -> "logits", for a stock server
deployment.json's "self_contained" {stage: {codec: model}} lists those tails, and "codec_form"
says how the device sends a quantized activation by default: "parameters" (codec parameters on
the tensor, for cloud-service) or "inputs" (the codec values as input tensors, any server).
"""
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from split.vision.bottleneck import Bottleneck
from split.vision.exits import EarlyExitNet, exit_rates, max_softmax
from split.vision.export import export_onnx, write_tail


class StageWithExit(nn.Module):
    def __init__(self, stage: nn.Module, exit_head: nn.Module):
        super().__init__()
        self.stage, self.exit_head = stage, exit_head

    def forward(self, x):
        y = self.stage(x)
        return y, self.exit_head(y)


def stage_chain(net: EarlyExitNet, example: torch.Tensor, out: Path) -> list[dict]:
    """One ONNX file per stage; returns the stages' entries for deployment.json."""
    entries, x = [], example
    for i, (name, stage) in enumerate(net.backbone.named_children()):
        has_exit = name in net.exits
        module = StageWithExit(stage, net.exits[name]) if has_exit else stage
        path = out / "stages" / f"{i}_{name}.onnx"
        export_onnx(module, x, path, "x", ["y", "exit"] if has_exit else ["y"])
        with torch.no_grad():
            x = stage(x)
        entries.append({"name": name, "file": str(path.relative_to(out)), "exit": has_exit,
                        "output_shape": list(x.shape[1:])})
    return entries


@torch.no_grad()
def build_deployment(net: EarlyExitNet, model_name: str, device_dir: Path, repo_dir: Path, input_shape,
                     bottlenecks: dict[tuple[str, int], Bottleneck | tuple] | None = None, cuts: list[str] | None = None,
                     thresholds: dict[str, float] | None = None, accuracy: dict[str, float] | None = None,
                     extra: dict | None = None, validation: np.ndarray | None = None,
                     self_contained: tuple[str, ...] = (), codec_form: str = "parameters") -> Path:
    """`bottlenecks[(stage, channels)]` is a Bottleneck (the backbone's own tail follows its decoder)
    or (Bottleneck, fine-tuned tail) as split.vision.train.train_bottleneck returns. `extra` is
    merged into deployment.json (e.g. frame_png_bytes measured on real frames, for the planner).
    `validation` (N, *input_shape) float32 frames: measure each exit's rate at the thresholds.
    `self_contained` codecs ("int8", "int4"): also write each cut's and each bottleneck's tail
    self-contained for them (deployment.json: "self_contained" per cut, and per bottleneck);
    `codec_form` "inputs" makes the device address those by default (needs `self_contained`)."""
    if codec_form not in ("parameters", "inputs"):
        raise ValueError(f"codec_form '{codec_form}': expected 'parameters' or 'inputs'")
    if codec_form == "inputs" and not self_contained:
        raise ValueError("codec_form 'inputs' needs self-contained tails: pass self_contained=(codecs)")
    device_dir, repo_dir = Path(device_dir), Path(repo_dir)
    net = net.eval()
    example = torch.rand(1, *input_shape)
    stages = stage_chain(net, example, device_dir)
    names = [s["name"] for s in stages]
    cuts = cuts if cuts is not None else names[:-1]
    full = f"{model_name}_full"
    export_onnx(net.backbone, example, repo_dir / full / "1" / "model.onnx", "image", ["logits"])
    (repo_dir / full / "config.toml").write_text("max_batch_size = 16\n[parameters]\nintra_op_thread_count = 1\n")
    tails, contained = {}, {}
    for stage in cuts:
        k = names.index(stage) + 1
        activation = net.backbone[:k](example)
        tails[stage] = f"{model_name}_tail_{stage}"
        write_tail(repo_dir, tails[stage], net.backbone[k:], activation)
        for codec in self_contained:
            name = contained.setdefault(stage, {})[codec] = f"{tails[stage]}_{codec}"
            write_tail(repo_dir, name, net.backbone[k:], activation, codec=codec)
    encoders = {}
    for (stage, channels), item in (bottlenecks or {}).items():
        k = names.index(stage) + 1
        bn, tail = item if isinstance(item, tuple) else (item, net.backbone[k:])
        activation = net.backbone[:k](example)
        key = f"{stage}_b{channels}"
        enc_path = device_dir / "encoders" / f"{key}.onnx"
        export_onnx(bn.encoder.eval(), activation, enc_path, "x", ["z"])
        tail_name = f"{model_name}_tail_{key}"
        features = bn.encoder(activation)
        write_tail(repo_dir, tail_name, nn.Sequential(bn.decoder.eval(), tail.eval()), features)
        encoders[key] = {"stage": stage, "channels": channels, "file": str(enc_path.relative_to(device_dir)),
                         "tail_model": tail_name, "output_shape": list(features.shape[1:])}
        for codec in self_contained:
            name = encoders[key].setdefault("self_contained", {})[codec] = f"{tail_name}_{codec}"
            write_tail(repo_dir, name, nn.Sequential(bn.decoder.eval(), tail.eval()), features, codec=codec)
    thresholds = thresholds or {name: 1.0 for name in net.exit_after}
    manifest = {
        "model": model_name, "input": {"name": "x", "shape": list(input_shape)},
        "stages": stages, "exits": net.exit_after, "cuts": tails, "bottlenecks": encoders,
        "full_model": full, "thresholds": thresholds, "accuracy": accuracy or {},
        "self_contained": contained, "codec_form": codec_form, **(extra or {}),
    }
    if validation is not None and net.exit_after:
        outs = [net(torch.as_tensor(validation[i:i + 256], dtype=torch.float32))[:-1]
                for i in range(0, len(validation), 256)]
        conf = np.stack([max_softmax(torch.cat(o).double().numpy()) for o in zip(*outs)])     # (E, N)
        rates = exit_rates(conf, [thresholds.get(name, 1.0) for name in net.exit_after])
        manifest["exit_rates"] = dict(zip(net.exit_after, rates))
    (device_dir / "deployment.json").write_text(json.dumps(manifest, indent=1))
    return device_dir
