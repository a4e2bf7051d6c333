"""bench_split: split computing, learned bottlenecks, exits, the planner and adaptive switching,
measured in one run on the test split.

    nice -n 10 .venv/bin/python scripts/bench_split.py [--out runs/bench_split] [--frames 40]
    (run it by its path, not with -m: Python then puts scripts/ on sys.path for `import split_services`)

Trains (or loads from .cache/split/weights) the models, then prints one JSON object per
measurement and writes them to OUT/results.jsonl, plots to OUT/*.png and a summary against
the issue's targets to OUT/summary.json. Sections:
  codec      accuracy and bytes per frame: unsplit, every cut (fp32/int8/int4), bottlenecks b8/b4
  exits      exit fraction vs accuracy for fixed and calibrated thresholds (res_cnn)
  latency    end-to-end per frame through scripts/linkemu.py at 5 ms/100 Mbit and 40 ms/5 Mbit:
             local, full offload (PNG frame), every cut, and the planner's choice, on this machine
             and on emulated slower devices (the runtime sleeps to stretch device compute x20, x200)
  profiles   the planner's choice for device profiles on the same two links (predictions only)
  frames     the 4-DoF pose stream: big-only, small-only and six adaptive systems (bench_pose.py)
Baselines are measured in the same run: unsplit accuracy, local latency, big-only compute.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from devices.profiles import DeviceProfile, Link, load_profile
from edge_runtime.client.oip_client import OipClient
from edge_runtime.vision.deployment import Deployment
from edge_runtime.vision.placement_costs import measure_candidates
from edge_runtime.vision.runtime import Runtime
from split.codec import decode, encode
from split.planner import plan
from split.vision import data, zoo
from split.vision.cut import stage_names
from split.vision.deploy import build_deployment
from split.vision.exits import calibrate_threshold, first_exit, max_softmax
from split.vision.flops import macs

import bench_pose  # noqa: E402  (scripts/ is on sys.path: this script runs by its path)
from split_services import CloudService, LinkEmu

ROOT = Path(__file__).resolve().parents[1]

LINKS = [("5ms_100mbit", 5.0, 100.0), ("40ms_5mbit", 40.0, 5.0)]     # one-way delay, rate
# Emulated devices: this machine, and this machine slowed down (Runtime(slowdown=...)) to roughly a
# Raspberry-Pi-4-class CPU (x20) and a microcontroller-class SoC (x200) on this model.
SLOWDOWNS = [1, 20, 200]
BOTTLENECKS = [("stage2", 8), ("stage2", 4)]
ROWS = []


def emit(row: dict, out: Path) -> None:
    ROWS.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(line + "\n")


@torch.no_grad()
def run_batched(module, x, batch=256) -> np.ndarray:
    module.eval()
    return torch.cat([module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))) for i in range(0, len(x), batch)]).numpy()


def through_codec(acts: np.ndarray, codec: str) -> tuple[np.ndarray, float]:
    """Encode and decode each frame's activation alone, as the device does; mean bytes per frame."""
    if codec == "fp32":
        return acts, float(acts[0].nbytes)
    axis = 1 if acts.ndim == 4 else -1
    out, sizes = np.empty_like(acts), []
    for i in range(len(acts)):
        enc = encode(acts[i:i + 1], codec, axis)
        out[i:i + 1] = decode(enc.data, enc.parameters)
        sizes.append(enc.nbytes)
    return out, float(np.mean(sizes))


def section_codec(out: Path) -> dict:
    """Accuracy and bytes; returns {placement: accuracy} for res_cnn (the deployed model)."""
    x, y = data.digits("test")
    accuracy = {}
    for name in ("res_cnn", "seq_cnn", "vit"):
        net = zoo.exit_net(name)
        backbone = net.backbone
        whole = (run_batched(backbone, x).argmax(1) == y).mean()
        emit({"section": "codec", "model": name, "placement": "local", "accuracy": float(whole),
              "bytes": 0, "macs": macs(backbone, torch.from_numpy(x[:1]))}, out)
        frames_q = np.round(x * 255) / 255
        png = float(np.mean([encode(frames_q[i:i + 1], "png").nbytes for i in range(len(x))]))
        offload_acc = float((run_batched(backbone, frames_q.astype(np.float32)).argmax(1) == y).mean())
        emit({"section": "codec", "model": name, "placement": "offload", "accuracy": offload_acc,
              "bytes": png, "raw_frame_bytes": int(x[0].size)}, out)
        if name == "res_cnn":
            accuracy.update(local=float(whole), offload=offload_acc, frame_png_bytes=png)
        names = stage_names(backbone)
        for k in range(1, len(names)):
            acts = run_batched(backbone[:k], x)
            fp32_bytes = float(acts[0].nbytes)
            for codec in ("fp32", "int8", "int4"):
                z, nbytes = through_codec(acts, codec)
                acc = float((run_batched(backbone[k:], z).argmax(1) == y).mean())
                placement = f"split:{names[k - 1]}:{codec}"
                emit({"section": "codec", "model": name, "placement": placement, "accuracy": acc,
                      "accuracy_loss_pt": 100 * (whole - acc), "bytes": nbytes, "fp32_bytes": fp32_bytes,
                      "reduction": 1 - nbytes / fp32_bytes}, out)
                if name == "res_cnn":
                    accuracy[placement] = acc
        if name != "res_cnn":
            continue
        for stage, channels in BOTTLENECKS:
            bn, tail = zoo.bottleneck(name, stage, channels)
            k = names.index(stage) + 1
            acts = run_batched(backbone[:k], x)
            z = run_batched(bn.encoder, acts)
            for codec in ("int8", "int4"):
                zq, nbytes = through_codec(z, codec)
                acc = float((run_batched(torch.nn.Sequential(bn.decoder, tail), zq).argmax(1) == y).mean())
                placement = f"split:{stage}:b{channels}:{codec}"
                accuracy[placement] = acc
                emit({"section": "codec", "model": name, "placement": placement, "accuracy": acc,
                      "accuracy_loss_pt": 100 * (whole - acc), "bytes": nbytes, "fp32_bytes": float(acts[0].nbytes),
                      "reduction": 1 - nbytes / float(acts[0].nbytes), "bottleneck_shape": list(z.shape[1:])}, out)
    return accuracy


def section_exits(out: Path) -> dict:
    net = zoo.exit_net("res_cnn")
    names = stage_names(net.backbone)
    example = torch.rand(1, 1, 64, 64)
    stage_macs, a = [], example
    with torch.no_grad():
        for name in names:
            stage_macs.append(macs(net.backbone[names.index(name)], a))
            a = net.backbone[names.index(name)](a)
        acts = {n: net.backbone[:names.index(n) + 1](example) for n in net.exit_after}
    exit_macs = [macs(net.exits[n], acts[n]) for n in net.exit_after]
    # cost of a frame that leaves at exit e (or runs everything): stages up to it + exit heads evaluated
    depth = [names.index(n) + 1 for n in net.exit_after]
    cost = [sum(stage_macs[:d]) + sum(exit_macs[:e + 1]) for e, d in enumerate(depth)] + [sum(stage_macs) + sum(exit_macs)]

    def evaluate(split):
        x, y = data.digits(split)
        with torch.no_grad():
            outs = [np.concatenate(o) for o in zip(*[[t.numpy() for t in net(torch.from_numpy(x[i:i + 256]))]
                                                     for i in range(0, len(x), 256)])]
        return outs, y
    val, yv = evaluate("val")
    test, yt = evaluate("test")
    final_val = (val[-1].argmax(1) == yv).mean()
    target = final_val - 0.005
    calibrated = [calibrate_threshold(max_softmax(o), o.argmax(1) == yv, target) for o in val[:-1]]
    results = {}
    for label, thresholds in [(f"{t:g}", [t] * len(net.exit_after)) for t in (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)] + \
            [("calibrated", calibrated)]:
        conf = np.stack([max_softmax(o) for o in test[:-1]])
        where = first_exit(conf, thresholds)
        preds = np.stack([o.argmax(1) for o in test])[where, np.arange(len(yt))]
        acc = float((preds == yt).mean())
        row = {"section": "exits", "model": "res_cnn", "thresholds": [float(t) for t in thresholds], "label": label,
               "accuracy": acc, "exit_fraction": {n: float((where == i).mean()) for i, n in enumerate(net.exit_after)},
               "mean_macs": float(np.mean(np.array(cost)[where])), "full_macs": cost[-1]}
        emit(row, out)
        results[label] = row
    return {"thresholds": dict(zip(net.exit_after, calibrated)), "rows": results}


def measure_latency(dep, placement, address, frames, thresholds, slowdown) -> dict:
    with Runtime(dep, placement, cloud=address, deadline_s=10.0, thresholds=thresholds, slowdown=slowdown) as rt:
        for f in frames[:3]:
            rt.infer(f)                                          # connection set-up, warm caches
        lat, sent, degraded = [], [], 0
        for f in frames:
            r = rt.infer(f)
            lat.append(r.latency_s)
            sent.append(r.bytes_sent)
            degraded += r.degraded
    return {"median_ms": 1e3 * float(np.median(lat)), "mean_ms": 1e3 * float(np.mean(lat)),
            "p90_ms": 1e3 * float(np.percentile(lat, 90)), "bytes_sent": float(np.mean(sent)), "degraded": degraded}


def emulated(slowdown: float):
    """A profile that scales this machine's measured device costs by `slowdown` (host_gflops = slowdown)."""
    if slowdown == 1:
        return None
    return DeviceProfile(f"this-x{slowdown:g}", f"this machine slowed x{slowdown:g}", "edge", 1.0, 1.0, 0.0,
                         1, 1, 1, 1.0, 1.0, 1.0, (Link("emulated", 1, 1),))


def section_latency(out: Path, accuracy: dict, exits: dict, n_frames: int) -> dict:
    net = zoo.exit_net("res_cnn")
    bns = {key: zoo.bottleneck("res_cnn", *key) for key in BOTTLENECKS}
    deploy = out / "deploy"
    build_deployment(net, "res_cnn", deploy / "device", deploy / "repository", (1, 64, 64), bottlenecks=bns,
                     cuts=["stage1", "stage2", "stage3"], thresholds=exits["thresholds"],
                     accuracy={k: v for k, v in accuracy.items() if k != "frame_png_bytes"},
                     extra={"frame_png_bytes": accuracy["frame_png_bytes"]})
    dep = Deployment.load(deploy / "device")
    x, _ = data.digits("test")
    frames = x[:n_frames]
    never = {n: 1.0 for n in dep.manifest["exits"]}
    candidates, measured = measure_candidates(dep, repeats=50)
    floor = accuracy["local"] - 0.01
    summary = {}
    with CloudService(deploy / "repository") as cloud:
        with OipClient(cloud.address) as client:        # fixed cost of one call on this machine
            z = np.zeros((1, *dep.stages[3].output_shape), np.float32)
            for _ in range(5):
                client.infer("res_cnn_tail_stage3", {"z": z})
            t = []
            for _ in range(40):
                start = time.perf_counter()
                client.infer("res_cnn_tail_stage3", {"z": z})
                t.append(time.perf_counter() - start)
            rpc_overhead = max(0.0, float(np.median(t)) - sum(measured["stage_s"][4:]))
        emit({"section": "latency", "what": "rpc_overhead_ms", "value": rpc_overhead * 1e3}, out)
        for link_name, delay_ms, rate in LINKS:
            link = Link(link_name, rate, 2 * delay_ms)
            with LinkEmu(cloud.address, delay_ms, rate) as emu:
                for slowdown in SLOWDOWNS:
                    p = plan(candidates, link, emulated(slowdown), None, float(slowdown), accuracy_floor=floor,
                             rpc_overhead_s=rpc_overhead)
                    rows = []
                    for pred in p.rows:
                        placement = pred.candidate.placement
                        m = measure_latency(dep, placement, emu.address, frames, never, slowdown)
                        row = {"section": "latency", "link": link_name, "slowdown": slowdown, "placement": placement,
                               "predicted_ms": pred.total_s * 1e3, **m, "accuracy": pred.candidate.accuracy,
                               "feasible": pred.feasible, "chosen": pred is p.choice}
                        emit(row, out)
                        rows.append(row)
                    feasible = [r for r in rows if r["feasible"]]
                    best = min(feasible, key=lambda r: r["median_ms"])
                    chosen = next(r for r in rows if r["chosen"])
                    local = next(r for r in rows if r["placement"] == "local")
                    key = f"{link_name}_x{slowdown}"
                    summary[key] = {"link": link_name, "slowdown": slowdown, "choice": chosen["placement"],
                                    "choice_measured_ms": chosen["median_ms"], "choice_predicted_ms": chosen["predicted_ms"],
                                    "best": best["placement"], "best_measured_ms": best["median_ms"],
                                    "choice_over_best": chosen["median_ms"] / best["median_ms"] - 1,
                                    "local_ms": local["median_ms"],
                                    "choice_vs_local": 1 - chosen["median_ms"] / local["median_ms"],
                                    "accuracy_floor": floor}
                    emit({"section": "latency", "summary": summary[key]}, out)
        # the deployed runtime with calibrated exits, behind the slow link
        with LinkEmu(cloud.address, 40.0, 5.0) as emu:
            x, y = data.digits("test")
            with Runtime(dep, summary["40ms_5mbit_x1"]["choice"], cloud=emu.address, deadline_s=10.0) as rt:
                results = [rt.infer(f) for f in x[:200]]
            where = {}
            for r in results:
                where[r.where] = where.get(r.where, 0) + 1
            emit({"section": "latency", "link": "40ms_5mbit", "placement": summary["40ms_5mbit_x1"]["choice"],
                  "with_exits": exits["thresholds"], "frames": 200, "where": where,
                  "accuracy": float(np.mean([r.label == t for r, t in zip(results, y[:200])])),
                  "median_ms": 1e3 * float(np.median([r.latency_s for r in results])),
                  "mean_ms": 1e3 * float(np.mean([r.latency_s for r in results]))}, out)
    for device, precision in (("raspberry-pi-4", "fp32"), ("raspberry-pi-5", "fp32"), ("jetson-nano", "fp32"),
                              ("gap8-nano-drone", "int8"), ("gap8-nano-drone", "fp32"), ("phone-midrange", "fp32")):
        for link_name, delay_ms, rate in LINKS:
            from devices.probe import peak_gflops
            host = summary.setdefault("host_gflops", peak_gflops())   # scaling reference for the profiles
            p = plan(candidates, Link(link_name, rate, 2 * delay_ms), load_profile(device), load_profile("cloud-cpu"),
                     host, accuracy_floor=floor, precision=precision)
            local = p.rows[0]
            emit({"section": "profiles", "device": device, "precision": precision, "link": link_name,
                  "choice": p.choice.candidate.placement, "predicted_ms": p.choice.total_s * 1e3,
                  "local_predicted_ms": local.total_s * 1e3,
                  "latency_saving_vs_local": 1 - p.choice.total_s / local.total_s, "host_gflops": host}, out)
    return summary


def plots(out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    codec = [r for r in ROWS if r["section"] == "codec" and r["model"] == "res_cnn" and r.get("bytes")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in codec:
        ax.scatter(r["bytes"], 100 * r["accuracy"], s=18)
        ax.annotate(r["placement"].replace("split:", ""), (r["bytes"], 100 * r["accuracy"]), fontsize=6)
    ax.set_xscale("log")
    ax.set(xlabel="bytes per frame on the wire", ylabel="test accuracy (%)", title="res_cnn: cut, bottleneck, codec")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)
    exits = [r for r in ROWS if r["section"] == "exits"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([sum(r["exit_fraction"].values()) for r in exits], [100 * r["accuracy"] for r in exits], "o-")
    for r in exits:
        ax.annotate(r["label"], (sum(r["exit_fraction"].values()), 100 * r["accuracy"]), fontsize=7)
    ax.set(xlabel="fraction of frames leaving at an exit", ylabel="test accuracy (%)", title="res_cnn exits")
    fig.tight_layout()
    fig.savefig(out / "exits.png", dpi=120)
    lat = [r for r in ROWS if r["section"] == "latency" and "predicted_ms" in r and "slowdown" in r]
    fig, axes = plt.subplots(len(SLOWDOWNS), 2, figsize=(12, 4 * len(SLOWDOWNS)))
    for ax, (link, slowdown) in zip(axes.ravel(), [(l[0], s) for s in SLOWDOWNS for l in LINKS]):
        rows = [r for r in lat if r["link"] == link and r["slowdown"] == slowdown]
        idx = np.arange(len(rows))
        ax.barh(idx - 0.2, [r["median_ms"] for r in rows], 0.4, label="measured (median)")
        ax.barh(idx + 0.2, [r["predicted_ms"] for r in rows], 0.4, label="planner prediction")
        ax.set_yticks(idx, [r["placement"] + (" *" if r["chosen"] else "") for r in rows], fontsize=7)
        ax.set(xlabel="ms per frame", title=f"{link}, device x{slowdown} (* = planner's choice)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_split")
    parser.add_argument("--frames", type=int, default=40, help="timed frames per placement and link")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: stop cloud-service and linkemu
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").write_text("")
    torch.set_num_threads(1)
    start = time.time()
    accuracy = section_codec(args.out)
    exits = section_exits(args.out)
    latency = section_latency(args.out, accuracy, exits, args.frames)
    frames = bench_pose.section(args.out, emit)
    plots(args.out)
    bench_pose.plot(args.out, frames)
    by = {r["placement"]: r for r in ROWS if r["section"] == "codec" and r["model"] == "res_cnn"}
    targets = {
        "bottleneck_int8": {p: {"reduction": by[p]["reduction"], "accuracy_loss_pt": by[p]["accuracy_loss_pt"],
                                "met": by[p]["reduction"] >= 0.90 and by[p]["accuracy_loss_pt"] <= 1.0}
                            for p in by if ":b" in p and p.endswith("int8")},
        "planner_within_10pct": {k: {"choice": v["choice"], "best": v["best"],
                                     "choice_over_best": v["choice_over_best"], "met": v["choice_over_best"] <= 0.10}
                                 for k, v in latency.items() if isinstance(v, dict)},
        **frames["targets"],
    }
    summary = {"targets": targets, "latency": latency, "frames": frames, "exits_calibrated": exits["rows"]["calibrated"],
               "seconds": time.time() - start, "machine": f"{os.cpu_count()} cores, shared; client, link emulator "
               "and cloud-service on one machine (loopback)"}
    plain = lambda o: o.item() if hasattr(o, "item") else str(o)          # numpy scalars  # noqa: E731
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=plain))
    print(json.dumps({"section": "summary", "targets": targets}, default=plain))


if __name__ == "__main__":
    main()
