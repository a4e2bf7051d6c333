"""ED-ViT across emulated Raspberry Pi 4 peers against the full ViT on one (issue 16).

    .venv/bin/python scripts/bench_edvit.py --out docs/bench_edvit.jsonl [--peers 2,3,5] [--epochs 40] \\
        [--latency-frames 100]

The full model is the project's `vit` (split.vision.zoo, trained on the bundled digits, cached).
For each N: classes partitioned over N equal peers, one sub-model per peer pruned class-wise to
max(1, round(4 / N)) of 4 heads and 128 / N of 128 MLP channels per block, distilled for --epochs
epochs (cached under .cache/split/weights), a fusion head trained with peers dropped at random;
then the packages (split.vision.edvit_deploy) are served for real on loopback: N agents, each a
`local` pipeline stretched to a Raspberry Pi 4's speed (slowdown = "profile"), and a requesting
agent (also a Pi 4) whose `edvit` pipeline asks them all and fuses. The baseline is the full ViT
in one agent on one emulated Pi 4.

One JSON row per system: test accuracy (the whole 720-frame test split, batches of 60),
per-sub-model parameters and MACs (and their share of the full model's), median and p90 latency
per frame (batch 1, --latency-frames frames, through the agent), bytes per frame, and accuracy with
each single peer missing (the fusion without its answer, in one process: what the runtime computes
when that peer is down, tested in tests/test_edvit_peers.py). Targets: accuracy at most 1 point
below the full ViT's; at N = 3 each sub-model at most 1/3 of its MACs and latency at most 0.6x.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from bench_collab_llm import emit  # noqa: E402
from edge_runtime.client.oip_client import OipClient  # noqa: E402
from server_process import AgentProcess  # noqa: E402
from split.vision import data, zoo  # noqa: E402
from split.vision.edvit import (Fusion, class_wise_submodel, distill, fusion_inputs, importance,  # noqa: E402
                                partition_classes, train_fusion)
from split.vision.edvit_deploy import write_edvit  # noqa: E402
from split.vision.export import export_onnx  # noqa: E402
from split.vision.flops import macs  # noqa: E402

RECIPE = "v1"
PROFILE = "raspberry-pi-4"


def build(full, n: int, epochs: int, x, y):
    """Partition, sub-models and fusion for n equal peers (cached)."""
    parts = partition_classes(10, [1.0] * n)
    heads, hidden = max(1, round(4 / n)), 128 // n
    subs = []
    for i, classes in enumerate(parts):
        sub = class_wise_submodel(full, classes, importance(full, classes, x, y), heads, hidden)
        key = zoo.CACHE / f"edvit_{RECIPE}_n{n}_h{heads}_c{hidden}_e{epochs}_sub{i}.safetensors"
        subs.append(zoo.cached(key, sub, lambda: distill(sub, full, classes, x, y, epochs=epochs, desc=f"N={n} sub {i}")))
    fusion = Fusion(parts)
    key = zoo.CACHE / f"edvit_{RECIPE}_n{n}_h{heads}_c{hidden}_e{epochs}_fusion.safetensors"
    fusion = zoo.cached(key, fusion, lambda: fusion.load_state_dict(train_fusion(subs, parts, x, y).state_dict()))
    return parts, subs, fusion, heads, hidden


def agent(folder: Path, name: str, body: str) -> AgentProcess:
    config = folder / f"{name}.toml"
    config.write_text(f'device_id = "{name}"\nprofile = "{PROFILE}"\nstate_dir = "state-{name}"\n'
                      f'[serve]\nhost = "127.0.0.1"\nport = 0\n{body}')
    process = AgentProcess(config)
    with OipClient(process.address) as client:
        deadline = time.monotonic() + 60
        while not client.ready(timeout_s=2.0) and time.monotonic() < deadline:
            time.sleep(0.05)
    return process


def serve_local(folder: Path, name: str, model: str, path: Path) -> AgentProcess:
    return agent(folder, name, f'[[pipeline]]\nname = "{model}"\nkind = "local"\npath = "{path}"\nslowdown = "profile"\n')


def measure(address: str, model: str, xt: np.ndarray, yt: np.ndarray, frames: int) -> dict:
    """Accuracy on the whole test split, and latency per frame at batch 1."""
    with OipClient(address, timeout_s=60) as client:
        logits = [client.infer(model, {"x": xt[i:i + 60]})["logits"] for i in range(0, len(xt), 60)]
        labels = np.concatenate(logits).argmax(1)
        for i in range(5):
            client.infer(model, {"x": xt[i:i + 1]})               # warm: the stretch measures itself
        times = []
        for i in range(frames):
            t0 = time.perf_counter()
            out = client.infer(model, {"x": xt[i:i + 1]})
            times.append(time.perf_counter() - t0)
    row = {"accuracy": round(float((labels == yt).mean()), 4), "p50_ms": round(float(np.median(times)) * 1e3, 2),
           "p90_ms": round(float(np.percentile(times, 90)) * 1e3, 2)}
    if "degraded" in out:
        row["degraded_frames"] = int(out["degraded"].sum())
    return row


@torch.no_grad()
def missing_peer_accuracy(parts, subs, fusion, xt, yt) -> list[float]:
    x = torch.from_numpy(xt)
    outputs = [sub(x) for sub in subs]
    accuracy = []
    for i in range(len(subs)):
        logits = fusion(*fusion_inputs([None if j == i else o for j, o in enumerate(outputs)], parts))
        accuracy.append(round(float((logits.argmax(1).numpy() == yt).mean()), 4))
    return accuracy


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", default="2,3,5")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--latency-frames", type=int, default=100)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    full = zoo.exit_net("vit").backbone.eval()
    x, y = data.digits("train")
    xt, yt = data.digits("test")
    example = torch.rand(1, 1, 64, 64)
    full_macs = macs(full, example)
    common = {"model": "vit", "device": PROFILE, "test_frames": len(xt),
              "machine": "2-vCPU Intel Xeon KVM VM (shared); peers' compute stretched to a Pi 4 (slowdown = profile)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(full, example, tmp / "vit_full" / "model.onnx", "x", ["logits"])
        base = serve_local(tmp, "full", "vit", tmp / "vit_full")
        try:
            baseline = measure(base.address, "vit", xt, yt, args.latency_frames)
        finally:
            base.kill()
        emit({**common, "system": "full ViT on one Pi 4", "peers": 1, "macs": full_macs,
              "params": sum(q.numel() for q in full.parameters()), "bytes_per_frame": 0, **baseline}, args.out)
        for n in [int(v) for v in args.peers.split(",")]:
            parts, subs, fusion, heads, hidden = build(full, n, args.epochs, x, y)
            package = write_edvit(tmp / f"n{n}", parts, subs, fusion)
            peers = [serve_local(tmp, f"n{n}peer{i}", f"edvit_sub{i}", tmp / f"n{n}" / f"edvit_sub{i}") for i in range(n)]
            addresses = ", ".join(f'"{a.address}"' for a in peers)
            requester = agent(tmp, f"n{n}requester", f'[[pipeline]]\nname = "edvit"\nkind = "edvit"\n'
                                                     f'path = "{package}"\npeers = [{addresses}]\ndeadline_s = 5.0\n')
            try:
                row = measure(requester.address, "edvit", xt, yt, args.latency_frames)
            finally:
                for process in [requester, *peers]:
                    process.kill()
            sub_macs = [macs(s, example) for s in subs]
            manifest = json.loads((package / "edvit.json").read_text())
            emit({**common, "system": f"ED-ViT over {n} Pi 4 peers", "peers": n, "heads": heads, "hidden": hidden,
                  "distil_epochs": args.epochs, "partition": parts, "sub_macs": sub_macs,
                  "sub_macs_share": [round(m / full_macs, 3) for m in sub_macs],
                  "sub_params": [s["params"] for s in manifest["sub_models"]],
                  "bytes_per_frame": n * xt[0].nbytes + 4 * sum(len(c) + 1 for c in parts),
                  "accuracy_drop_points": round((baseline["accuracy"] - row["accuracy"]) * 100, 2),
                  "latency_vs_full": round(row["p50_ms"] / baseline["p50_ms"], 3),
                  "accuracy_missing_peer": missing_peer_accuracy(parts, subs, fusion, xt, yt), **row}, args.out)


if __name__ == "__main__":
    main()
