"""`edge-runtime plan`: profile a deployment's candidate placements on this machine and predict
them on a device profile and a link; print the table and the choice.

    edge-runtime plan --deployment .cache/split/deploy/res_cnn/device --device raspberry-pi-4 \
        --link 10mbit,40ms [--cloud-profile cloud-cpu] [--objective latency|energy] \
        [--accuracy-floor 0.98] [--precision fp32|int8] [--json]

`--device this` (and `--cloud-profile this`) plans for this machine itself, with no scaling: that
prediction is what scripts/bench_split.py checks against measured runs. What is measured, and how
exits enter the prediction: placement_costs.py; the prediction and the choice: split/planner.py.
"""
import json

from devices.probe import peak_gflops
from devices.profiles import load_profile, parse_link
from edge_runtime.vision.placement_costs import measure_candidates
from split.planner import format_table, plan


def add_parser(commands) -> None:
    sub = commands.add_parser("plan", help="choose local, offload or a cut for a device and a link")
    sub.add_argument("--deployment", required=True, help="folder with deployment.json (split.vision.deploy)")
    sub.add_argument("--device", required=True, help="profile name (devices/profiles), a .toml path, or 'this'")
    sub.add_argument("--link", required=True, help="RATE,RTT, e.g. 10mbit,40ms")
    sub.add_argument("--cloud-profile", default="cloud-cpu", help="profile of the cloud node, or 'this'")
    sub.add_argument("--objective", choices=("latency", "energy"), default="latency")
    sub.add_argument("--accuracy-floor", type=float, help="drop placements measured below this accuracy")
    sub.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                     help="which device rate to scale by (int8 for a GAP8-class SoC)")
    sub.add_argument("--rpc-overhead-ms", type=float, default=0.5, help="fixed cost of one cloud call")
    sub.add_argument("--host-gflops", type=float,
                     help="this machine's fp32 peak (default: devices.probe.peak_gflops, from the CPU's spec)")
    sub.add_argument("--repeats", type=int, default=20)
    sub.add_argument("--json", action="store_true")


def run(args) -> int:
    from edge_runtime.vision.deployment import Deployment   # onnxruntime: loaded only when planning
    link = parse_link(args.link)
    device = None if args.device == "this" else load_profile(args.device)
    cloud = None if args.cloud_profile == "this" else load_profile(args.cloud_profile)
    candidates, measured = measure_candidates(Deployment.load(args.deployment), args.repeats)
    host = args.host_gflops or (peak_gflops() if (device or cloud) else 1.0)
    result = plan(candidates, link, device, cloud, host, args.objective, args.accuracy_floor, args.precision,
                  args.rpc_overhead_ms / 1e3)
    result.notes = sorted(result.notes + measured["notes"])
    if args.json:
        print(json.dumps({"device": args.device, "link": args.link, "objective": args.objective,
                          "host_gflops": round(host, 2), "exit_rates": measured["exit_rates"],
                          "notes": result.notes,
                          "choice": result.choice.candidate.placement if result.choice else None,
                          "rows": [{"placement": r.candidate.placement, "device_ms": r.device_s * 1e3,
                                    "network_ms": r.network_s * 1e3, "cloud_ms": r.cloud_s * 1e3,
                                    "total_ms": r.total_s * 1e3, "energy_mj": r.energy_j * 1e3,
                                    "up_bytes": r.candidate.up_bytes, "offload": r.offload,
                                    "accuracy": r.candidate.accuracy,
                                    "feasible": r.feasible} for r in result.rows]}))
    else:
        where = "this machine" if device is None else device.name
        print(f"device: {where}; link: {link.rate_mbit:g} Mbit/s, {link.rtt_ms:g} ms RTT; "
              f"cloud: {'this machine' if cloud is None else cloud.name}; this machine's fp32 peak {host:.0f} GFLOP/s")
        print(format_table(result))
    return 0 if result.choice else 3
