"""`edge-runtime edvit-plan`: an ED-ViT package's partition over its peers, each sub-model's size
and MACs, and the predicted latency per peer device and end to end (issue 16).

    edge-runtime edvit-plan --package deploy/edvit/edvit \\
        --peers raspberry-pi-4,raspberry-pi-4,jetson-nano --link 100mbit,5ms [--requester raspberry-pi-4] [--json]

Each sub-model and the fusion are timed on this machine with ONNX Runtime (median of --repeats warm
runs) and scaled to the device profile as the split planner scales (split.planner.scale: this
machine's fp32 peak over the device's, plus its per-call overhead). A frame goes to every peer at
once, so the end-to-end prediction is the slowest peer (frame up + its sub-model + logits back)
plus the fusion on the requesting device.
"""
import json
import time

import numpy as np


def add_parser(commands) -> None:
    sub = commands.add_parser("edvit-plan", help="an ED-ViT package's partition and predicted latency per peer")
    sub.add_argument("--package", required=True, help="folder with edvit.json (split.vision.edvit_deploy)")
    sub.add_argument("--peers", required=True, help="one device profile per sub-model, comma-separated, in order")
    sub.add_argument("--link", default="100mbit,5ms", help="RATE,RTT between the requester and each peer")
    sub.add_argument("--requester", default="raspberry-pi-4", help="the profile of the device that fuses")
    sub.add_argument("--host-gflops", type=float, help="this machine's fp32 peak (default: devices.probe)")
    sub.add_argument("--repeats", type=int, default=20)
    sub.add_argument("--json", action="store_true")


def _median_s(session, feeds: dict, repeats: int) -> float:
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def predict(package, peers: list, requester, link, host_gflops: float, repeats: int = 20) -> dict:
    """Rows per sub-model and the end-to-end prediction (seconds, bytes), from measurements here."""
    from pathlib import Path

    from edge_runtime.vision.deployment import session
    from edge_runtime.vision.edvit_runtime import EdvitRuntime
    from split.planner import scale
    manifest = json.loads((Path(package) / "edvit.json").read_text())
    subs = manifest["sub_models"]
    if len(peers) != len(subs):
        raise ValueError(f"--peers: {len(subs)} sub-models need {len(subs)} profiles, got {len(peers)}")
    frame = np.random.default_rng(0).random((1, *manifest["input"]["shape"]), dtype=np.float32)
    up = frame.nbytes
    rows = []
    for sub, profile in zip(subs, peers):
        here = _median_s(session(Path(package).parent / sub["name"] / "model.onnx"), {"x": frame}, repeats)
        down = 4 * (len(sub["classes"]) + 1)
        network = link.rtt_ms / 1e3 + 8 * (up + down) / (link.rate_mbit * 1e6)
        compute = scale(here, host_gflops, profile)
        rows.append({"sub_model": sub["name"], "classes": sub["classes"], "params": sub["params"],
                     "macs": sub["macs"], "device": profile.key, "here_ms": here * 1e3,
                     "device_ms": compute * 1e3, "network_ms": network * 1e3, "total_ms": (compute + network) * 1e3})
    widths = sum(len(s["classes"]) + 1 for s in subs)
    fusion = EdvitRuntime(package, ["127.0.0.1:1"] * len(subs)).fusion
    fusion_s = scale(_median_s(fusion, {"answers": np.zeros((1, widths), np.float32),
                                        "present": np.ones((1, len(subs)), np.float32)}, repeats),
                     host_gflops, requester)
    return {"rows": rows, "fusion_ms": fusion_s * 1e3, "bytes_per_frame": len(subs) * up + 4 * widths,
            "end_to_end_ms": max(r["total_ms"] for r in rows) + fusion_s * 1e3}


def run(args) -> int:
    from devices.probe import peak_gflops
    from devices.profiles import load_profile, parse_link
    peers = [load_profile(name.strip()) for name in args.peers.split(",") if name.strip()]
    result = predict(args.package, peers, load_profile(args.requester), parse_link(args.link),
                     args.host_gflops or peak_gflops(), args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'sub-model':<14} {'device':<16} {'classes':<16} {'params':>8} {'MMAC':>6} {'device ms':>10} "
          f"{'network ms':>11} {'total ms':>9}")
    for r in result["rows"]:
        print(f"{r['sub_model']:<14} {r['device']:<16} {','.join(map(str, r['classes'])):<16} {r['params']:>8} "
              f"{r['macs'] / 1e6:>6.2f} {r['device_ms']:>10.2f} {r['network_ms']:>11.2f} {r['total_ms']:>9.2f}")
    print(f"fusion on {args.requester}: {result['fusion_ms']:.2f} ms; bytes per frame {result['bytes_per_frame']}; "
          f"predicted end to end {result['end_to_end_ms']:.2f} ms")
    return 0
