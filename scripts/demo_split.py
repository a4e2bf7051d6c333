"""demo_split: a split deployment with exits behind the link emulator (part of `make demo`).

    .venv/bin/python scripts/demo_split.py [--frames 60] [--delay-ms 40 --rate-mbit 5]
    (run it by its path, not with -m: Python then puts scripts/ on sys.path for `import split_services`)

Loads (or trains, ~3 min on 2 cores, cached in .cache/split/weights) the residual CNN with two
exit branches and an 8-channel bottleneck after stage2, writes the device's ONNX stage chain
and the cloud's model repository, starts cloud-service and scripts/linkemu.py, asks the planner
for this machine and link, then streams test digits through edge_runtime.Runtime: the exit after
stage1 (threshold calibrated on validation data) answers confident frames, the rest go through
the bottleneck (int8) to the cloud. Halfway through it stops the cloud: the remaining frames are
answered by the exit at the cut, on the device, flagged degraded.
"""
import argparse
from pathlib import Path

import numpy as np

from devices.profiles import Link
from edge_runtime.vision.deployment import Deployment
from edge_runtime.vision.placement_costs import measure_candidates
from edge_runtime.vision.runtime import Runtime
from split.planner import format_table, plan

from split_services import CloudService, LinkEmu

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path) -> Path:
    from split.vision import data, zoo
    from split.vision.deploy import build_deployment
    from split.vision.exits import calibrate_threshold, max_softmax
    from split.vision.train import predict
    net = zoo.exit_net("res_cnn")
    bn = zoo.bottleneck("res_cnn", "stage2", 8)
    xv, yv = data.digits("val")
    outs = predict(net, xv)
    target = (outs[-1].argmax(1) == yv).mean() - 0.005
    thresholds = {name: calibrate_threshold(max_softmax(o), o.argmax(1) == yv, target)
                  for name, o in zip(net.exit_after, outs[:-1])}
    return build_deployment(net, "res_cnn", out / "device", out / "repository", (1, 64, 64),
                            bottlenecks={("stage2", 8): bn}, cuts=["stage2"], thresholds=thresholds,
                            validation=xv)   # exit rates at these thresholds, for the planner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--delay-ms", type=float, default=40.0)
    parser.add_argument("--rate-mbit", type=float, default=5.0)
    args = parser.parse_args()
    out = ROOT / ".cache" / "split" / "demo"
    device_dir = build(out)
    from split.vision import data
    x, y = data.digits("test")
    dep = Deployment.load(device_dir)
    print(f"exit thresholds (calibrated on val): {dep.manifest['thresholds']}")
    with CloudService(out / "repository") as cloud, LinkEmu(cloud.address, args.delay_ms, args.rate_mbit) as emu:
        candidates, _ = measure_candidates(dep, repeats=10)
        link = Link("emulated", args.rate_mbit, 2 * args.delay_ms)
        print(f"\nplanner, this machine, link {args.rate_mbit:g} Mbit/s / {2 * args.delay_ms:g} ms RTT:")
        print(format_table(plan(candidates, link)))
        placement = "split:stage2:b8:int8"
        # the exit after stage1 answers confident frames; the one at the cut (stage2) is kept as the
        # fallback for when the cloud is down, so every other frame goes to the cloud
        thresholds = {"stage1": dep.manifest["thresholds"]["stage1"], "stage2": 1.0}
        print(f"\nstreaming {args.frames} test frames with {placement}, exit thresholds {thresholds}; "
              "the cloud stops halfway")
        with Runtime(dep, placement, cloud=emu.address, deadline_s=1.0, retry_after_s=5.0,
                     thresholds=thresholds) as rt:
            results = []
            for i in range(args.frames):
                if i == args.frames // 2:
                    cloud.stop()
                results.append(rt.infer(x[i]))
    print(f"\n{'frame':>5} {'label':>5} {'pred':>4} {'answered at':<14}{'degraded':>9}{'bytes':>7}{'ms':>8}")
    for i, r in enumerate(results):
        print(f"{i:>5} {y[i]:>5} {r.label:>4} {r.where:<14}{str(r.degraded):>9}{r.bytes_sent:>7}{r.latency_s * 1e3:>8.1f}")
    acc = np.mean([r.label == t for r, t in zip(results, y)])
    where = {w: sum(r.where == w for r in results) for w in sorted({r.where for r in results})}
    print(f"\naccuracy {acc:.3f}; answered at {where}; degraded {sum(r.degraded for r in results)}; "
          f"median latency {1e3 * np.median([r.latency_s for r in results]):.1f} ms")


if __name__ == "__main__":
    main()
