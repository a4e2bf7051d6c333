"""bench_mobile_models: the mobile-speed device models (EfficientFormer, MobileCLIP's FastViT; issue 16,
item 4) beside the project's CNNs and ViT on the 64x64 digits, measured in one run.

    nice -n 5 .venv/bin/python scripts/bench_mobile_models.py [--out docs/bench_mobile_models.jsonl] \\
        [--plot docs/mobile_models.png] [--rounds 15] [--frames 20]
    (run it by its path, not with -m: Python then puts scripts/ on sys.path for `import bench_split`)

Every model comes from split.vision.zoo.exit_net (trained with its exits on first use, cached under
.cache/split/weights; FastViT's backbone reparameterized). One JSON row per model:
  accuracy     the backbone's and each exit's on the test split (720 frames)
  params, macs (split.vision.flops, batch 1)
  cpu_ms       ONNX Runtime on this CPU, the whole model as one file, batch 1, one thread: the median of
               --rounds per-round medians of 100 runs
  pi4_ms       the same session on an emulated Raspberry Pi 4 (edge_runtime.vision.stretch, as
               bench_split and bench_edvit do: each frame's compute stretched to this machine's fp32
               peak over the profile's times its fastest time here), --frames frames per round
               The rounds interleave the models so the load of this shared machine falls on all alike;
               *_vs_res_cnn is the median of the per-round ratios to res_cnn.
  plan         the planner's choice (and its best split) for a Raspberry Pi 4 and a cloud CPU on two links,
               from costs measured here (edge_runtime.vision.placement_costs) on a deployment with every
               stage a cut (exits never taken), accuracy per placement measured on the test split
               (fp32 / int8 / int4 activations), accuracy floor 1 point below local
A last row states the target: a new model more accurate than res_cnn at equal or lower Pi 4 latency.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from devices.probe import peak_gflops
from devices.profiles import Link, load_profile
from edge_runtime.vision.deployment import Deployment
from edge_runtime.vision.placement_costs import measure_candidates
from edge_runtime.vision.stretch import Stretch, slowdown_for
from split.codec import encode
from split.planner import plan
from split.vision import data, zoo
from split.vision.cut import stage_names
from split.vision.deploy import build_deployment
from split.vision.export import export_onnx
from split.vision.flops import macs
from split.vision.train import predict

from bench_split import run_batched, through_codec  # noqa: E402  (scripts/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["res_cnn", "seq_cnn", "vit", "efficientformer", "fastvit"]
NEW = ["efficientformer", "fastvit"]
BASELINE = "res_cnn"
LINKS = [("wifi_5ms_100mbit", 100.0, 10.0), ("40ms_5mbit", 5.0, 80.0)]      # name, rate, round trip
DEVICE, CLOUD = "raspberry-pi-4", "cloud-cpu"


def emit(row: dict, rows: list) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(run, n: int) -> float:
    """Median seconds of `run()` over n calls."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def accuracies(net, x, y) -> dict:
    """{placement: test accuracy}: local, offload (the PNG frame), every cut with each activation codec."""
    backbone = net.backbone
    whole = float((run_batched(backbone, x).argmax(1) == y).mean())
    frames_q = (np.round(x * 255) / 255).astype(np.float32)                  # what a PNG frame carries
    out = {"local": whole, "offload": float((run_batched(backbone, frames_q).argmax(1) == y).mean())}
    names = stage_names(backbone)
    for k in range(1, len(names)):
        acts = run_batched(backbone[:k], x)
        for codec in ("fp32", "int8", "int4"):
            z, _ = through_codec(acts, codec)
            out[f"split:{names[k - 1]}:{codec}"] = float((run_batched(backbone[k:], z).argmax(1) == y).mean())
    return out


def planned(net, name: str, acc: dict, x: np.ndarray, folder: Path, host_gflops: float) -> dict:
    """The planner's choice per link for a Raspberry Pi 4 and a cloud CPU."""
    names = stage_names(net.backbone)
    png = float(np.mean([encode((np.round(x[i:i + 1] * 255) / 255).astype(np.float32), "png").nbytes
                         for i in range(0, len(x), 10)]))
    build_deployment(net, name, folder / "device", folder / "repository", x.shape[1:], cuts=names[:-1],
                     thresholds={n: 1.0 for n in net.exit_after}, accuracy=acc, extra={"frame_png_bytes": png})
    candidates, _ = measure_candidates(Deployment.load(folder / "device"), repeats=40)
    out = {}
    for link_name, rate, rtt in LINKS:
        p = plan(candidates, Link(link_name, rate, rtt), load_profile(DEVICE), load_profile(CLOUD), host_gflops,
                 accuracy_floor=acc["local"] - 0.01)
        local = next(r for r in p.rows if r.candidate.placement == "local")
        split = min((r for r in p.rows if r.feasible and r.candidate.placement.startswith("split:")),
                    key=lambda r: r.total_s)
        out[link_name] = {"choice": p.choice.candidate.placement, "predicted_ms": round(p.choice.total_s * 1e3, 3),
                          "accuracy": p.choice.candidate.accuracy, "local_predicted_ms": round(local.total_s * 1e3, 3),
                          "best_split": split.candidate.placement, "best_split_ms": round(split.total_s * 1e3, 3)}
    return out


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "cpu_ms", "ONNX Runtime on this CPU"),
                           (axes[1], "pi4_ms", "emulated Raspberry Pi 4")):
        for r, color in zip(rows, plt.cm.tab10.colors):
            ax.scatter(r[key], 100 * r["accuracy"], s=30 + r["macs"] / 2e5, color=color,
                       marker="*" if r["model"] in NEW else "o",
                       label=f"{r['model']}: {100 * r['accuracy']:.2f}%, {r['macs'] / 1e6:.1f} MMAC")
        ax.set(xlabel=f"ms per frame (median, batch 1), {label}", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center")
    fig.suptitle("64x64 digits: device models (stars: EfficientFormer, FastViT; marker area ~ MACs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def latencies(nets: dict, frame: np.ndarray, folder: Path, rounds: int, frames: int, slowdown: float):
    """Per-round medians (s) for each model: on this CPU (100 runs) and on the emulated Pi 4 (`frames`
    frames through its Stretch), the rounds interleaved over the models."""
    runs = {}
    for name, net in nets.items():
        s = session(export_onnx(net.backbone, torch.from_numpy(frame), folder / f"{name}.onnx", "x", ["logits"]))
        with torch.no_grad():
            want = net.backbone(torch.from_numpy(frame)).numpy()
        assert np.allclose(s.run(None, {"x": frame})[0], want, atol=1e-4), f"{name}: ONNX differs from torch"
        runs[name] = lambda s=s: s.run(None, {"x": frame})
    stretches = {name: Stretch(slowdown) for name in runs}
    for name, run in runs.items():
        timed(run, 50)                                                       # warm
        timed(lambda: stretches[name]("model", run), 5)
    cpu, pi4 = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            cpu[name].append(timed(run, 100))
            pi4[name].append(timed(lambda: stretches[name]("model", run), frames))
    return cpu, pi4


def ratio(times: dict, name: str) -> float:
    """The median over rounds of the model's time over res_cnn's in the same round."""
    return round(float(np.median(np.array(times[name]) / np.array(times[BASELINE]))), 3)


def summary(rows: list, host: float, seconds: float, frames: int) -> dict:
    base = next(r for r in rows if r["model"] == BASELINE)
    met = [r["model"] for r in rows if r["model"] in NEW and r["accuracy"] > base["accuracy"]
           and r["pi4_vs_res_cnn"] <= 1.0]
    return {"summary": True, "target": "a new model more accurate than res_cnn at equal or lower emulated Pi 4 latency",
            "met": bool(met), "models_meeting": met,
            "vs_res_cnn": {r["model"]: {"accuracy_pt": round(100 * (r["accuracy"] - base["accuracy"]), 2),
                                        "pi4_latency_ratio": r["pi4_vs_res_cnn"],
                                        "cpu_latency_ratio": r["cpu_vs_res_cnn"]}
                           for r in rows if r["model"] != BASELINE},
            "test_frames": frames, "host_gflops": round(host, 1), "seconds": round(seconds),
            "machine": f"{os.cpu_count()} vCPUs, shared with other jobs; ONNX Runtime {ort.__version__}, one thread"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_mobile_models.jsonl")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "mobile_models.png")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per model")
    parser.add_argument("--frames", type=int, default=20, help="frames per round on the emulated Pi 4")
    args = parser.parse_args()
    start = time.time()
    torch.set_num_threads(1)
    x, y = data.digits("test")
    nets = {name: zoo.exit_net(name) for name in MODELS}                  # trains what is not cached
    host, folder = peak_gflops(), Path(tempfile.mkdtemp(prefix="bench_mobile_"))
    slowdown = slowdown_for("profile", load_profile(DEVICE))
    cpu, pi4 = latencies(nets, x[:1], folder, args.rounds, args.frames, slowdown)
    rows = []
    for name, net in nets.items():
        acc = accuracies(net, x, y)
        emit({"model": name, "accuracy": acc["local"],
              "exit_accuracy": {n: float((o.argmax(1) == y).mean()) for n, o in zip(net.exit_after, predict(net, x))},
              "params": sum(p.numel() for p in net.backbone.parameters()),
              "macs": macs(net.backbone, torch.from_numpy(x[:1])),
              "cpu_ms": round(1e3 * float(np.median(cpu[name])), 4), "cpu_vs_res_cnn": ratio(cpu, name),
              "pi4_ms": round(1e3 * float(np.median(pi4[name])), 3), "pi4_vs_res_cnn": ratio(pi4, name),
              "pi4_slowdown": round(slowdown, 2), "plan": planned(net, name, acc, x, folder / name, host),
              "placement_accuracy": {k: round(v, 4) for k, v in acc.items()}}, rows)
    emit(summary(rows, host, time.time() - start, len(y)), rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot([r for r in rows if "model" in r], args.plot)


if __name__ == "__main__":
    main()
