"""Adaptive small/big switching on the 4-DoF pose stream (issue 18): six systems (two model pairs x
three strategies) beside small-only and big-only, settings chosen on the validation stream only.

    .venv/bin/python scripts/bench_pose.py --out docs/split      # a few minutes once the models are trained
    (scripts/bench_split.py runs it as its frames section)

Per pair (split.vision.pose_models.POSE_PAIRS) the small and the big model run on the validation
and test streams (split.vision.pose.pose_stream: smooth motion, fast manoeuvres, occlusions); each
model's time per frame is measured here through ONNX Runtime (1 thread, batch 1, rounds alternating
between the models, median). A system is a pair, a strategy (edge_runtime.vision.switch) and its
settings; it is simulated frame by frame with a fresh StreamState per sequence, and its expected
cost per frame (`ms`) is the mean over frames of the times of the models that ran. The chosen
systems and both baselines are then also run for real on the test stream (`measured_ms`: the
ONNX Runtime sessions behind the switch, frame by frame, switch overhead included), and the
latency target is judged on that.

Settings are chosen on the validation stream, by three documented rules, then measured once on
the test stream:
  cheapest      the least validation latency whose validation nMAE <= big-only's   (target: >= 28% less
                latency than big-only at equal or lower test nMAE)
  equal-latency the lowest validation nMAE at validation latency <= big-only's      (target: >= 3% lower
                test nMAE than big-only)
  best          the lowest validation nMAE at any latency                           (target: one system
                >= 5% lower test nMAE than big-only)
The fusion weights (one per DoF: fuse * small + (1 - fuse) * big where both ran) are fitted on
the validation stream's outputs; each grid holds every setting with and without fusion.
Latency on a Raspberry Pi 4 (fp32) and a GAP8 (int8) is the planner's prediction from the
measured times and each model's share of the frames (split.planner, Candidate.models).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices.profiles import load_profile, parse_link  # noqa: E402
from edge_runtime.vision.switch import AdaptiveSwitch, DeviceState, StreamState, SwitchConfig  # noqa: E402
from split.planner import Candidate, predict  # noqa: E402
from split.vision import zoo  # noqa: E402
from split.vision.export import export_onnx  # noqa: E402
from split.vision.flops import macs  # noqa: E402
from split.vision.pose import mae, pose_stream  # noqa: E402
from split.vision.pose_models import POSE_PAIRS  # noqa: E402

PROFILES = (("raspberry_pi_4", "raspberry-pi-4", "fp32"), ("gap8", "gap8-nano-drone", "int8"))
JUMPS = (0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12)
HOLDS = (0, 2, 5, 10)
AUX_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
FUSE_GRID = np.linspace(0, 1, 21)


@torch.no_grad()
def run_batched(module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return torch.cat([module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))
                      for i in range(0, len(x), batch)]).numpy()


def sessions_of(models: dict, tmp: Path) -> dict:
    """ONNX Runtime sessions (1 thread) of the models, exported into `tmp`."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    example = torch.rand(1, 1, 96, 96)
    return {name: ort.InferenceSession(str(export_onnx(m, example, tmp / f"{name}.onnx", "x", ["y"])), opts,
                                       providers=["CPUExecutionProvider"]) for name, m in models.items()}


def model_ms(sessions: dict, rounds: int = 5, runs: int = 40) -> dict:
    """Median ms per frame of each model (batch 1), rounds alternating between the models."""
    frame = np.random.default_rng(0).random((1, 1, 96, 96), dtype=np.float32)
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(5):
                s.run(None, {"x": frame})
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, {"x": frame})
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def timed(system: SwitchConfig | str, sessions: dict, pair: tuple[str, str], stream) -> float:
    """Mean ms per frame of a system run for real on the stream, frame by frame: ONNX Runtime
    sessions behind the switch, or "small" / "big" alone."""
    run = {which: (lambda s: lambda x: s.run(None, {"x": x[None]})[0][0])(sessions[name])
           for which, name in zip(("small", "big"), pair)}
    switch = AdaptiveSwitch(run["small"], run["big"], system) if isinstance(system, SwitchConfig) else None
    stream_state, total = None, 0.0
    for i, frame in enumerate(stream.frames):
        if i == 0 or stream.sequence[i] != stream.sequence[i - 1]:
            stream_state = StreamState()
        t = time.perf_counter()
        if switch is None:
            run[system](frame)
        else:
            switch.step(frame, None, stream_state)
        total += time.perf_counter() - t
    return 1e3 * total / len(stream.frames)


def simulate(config: SwitchConfig, so: np.ndarray, bo: np.ndarray, sequence: np.ndarray,
             state: DeviceState | None = None) -> tuple[np.ndarray, list]:
    """Answers (T, 4) and what ran per frame; a new stream state at each sequence start."""
    switch = AdaptiveSwitch(lambda i: so[i], lambda i: bo[i], config)
    preds, ran, stream = [], [], None
    for i in range(len(so)):
        if i == 0 or sequence[i] != sequence[i - 1]:
            stream = StreamState()
        a = switch.step(i, state, stream)
        preds.append(a.output)
        ran.append(a.ran)
    return np.stack(preds), ran


def fit_fuse(so: np.ndarray, bo: np.ndarray, truth: np.ndarray) -> list[float]:
    """Per DoF, the weight of the small model's output that minimises the validation MAE of the blend."""
    return [float(FUSE_GRID[np.argmin([np.abs(w * so[:, d] + (1 - w) * bo[:, d] - truth[:, d]).mean()
                                       for w in FUSE_GRID])]) for d in range(truth.shape[1])]


def picking(so: np.ndarray, bo: np.ndarray, truth: np.ndarray, share: float = 0.2) -> dict:
    """Validation nMAE when the big model answers `share` of the frames, picked by the small model's
    predicted error, at random (seed 0), or by an oracle that knows the small model's error."""
    n, k = len(so), int(round(share * len(so)))
    error = np.abs(so[:, :4] - truth).mean(1)
    out = {}
    for how, order in (("aux", np.argsort(-so[:, 4])), ("random", np.random.default_rng(0).permutation(n)),
                       ("oracle", np.argsort(-error))):
        pred = so[:, :4].copy()
        pred[order[:k]] = bo[order[:k]]
        out[how] = mae(pred, truth)["nmae"]
    return out


def grid(strategy: str, aux_values: np.ndarray, fuse: list[float]) -> list[SwitchConfig]:
    thresholds = [float(np.quantile(aux_values, q)) for q in AUX_QUANTILES]
    common = dict(strategy=strategy, regression=4, aux=1)
    if strategy == "consistency":
        settings = [dict(max_jump=j, hold=h) for j, h in itertools.product(JUMPS, HOLDS)]
    elif strategy == "auxiliary":
        settings = [dict(aux_threshold=t, hold=h) for t, h in itertools.product(thresholds, HOLDS)]
    else:
        settings = [dict(aux_threshold=t, aux_release=0.8 * t, max_jump=j, hold=h)
                    for t, j, h in itertools.product(thresholds, (0.02, 0.03, 0.05), HOLDS[:3])]
    return [SwitchConfig(**common, **s, fuse=f) for s in settings for f in (0.0, fuse)]


def describe(config: SwitchConfig) -> dict:
    keys = {"consistency": ("max_jump", "hold"), "auxiliary": ("aux_threshold", "hold"),
            "combined": ("aux_threshold", "aux_release", "max_jump", "hold")}[config.strategy]
    out = {k: round(getattr(config, k), 4) if isinstance(getattr(config, k), float) else getattr(config, k)
           for k in keys}
    return {**out, "fuse": config.fuse}


def measure(pred: np.ndarray, ran: list, stream, ms: dict, pair: tuple[str, str], macs_of: dict) -> dict:
    small, big = pair
    errors = mae(pred, stream.pose)
    by_event = {name: mae(pred[stream.event == code], stream.pose[stream.event == code])["nmae"]
                for code, name in enumerate(("smooth", "manoeuvre", "occluded")) if (stream.event == code).any()}
    share = {"small": float(np.mean(["small" in r for r in ran])), "big": float(np.mean(["big" in r for r in ran]))}
    return {**errors, "nmae_by_event": by_event, "ms": share["small"] * ms[small] + share["big"] * ms[big],
            "mmac": (share["small"] * macs_of[small] + share["big"] * macs_of[big]) / 1e6,
            "small_share": share["small"], "big_share": share["big"]}


def on_profiles(row: dict, ms: dict, pair: tuple[str, str], host_gflops: float) -> dict:
    """The planner's expected ms per frame on each profile for this row's model shares."""
    out = {}
    for key, name, precision in PROFILES:
        c = Candidate(row["system"], device_s=ms[pair[1]] / 1e3,
                      models=((row["small_share"], ms[pair[0]] / 1e3), (row["big_share"], ms[pair[1]] / 1e3)))
        out[f"{key}_ms"] = 1e3 * predict(c, parse_link("10mbit,10ms"), load_profile(name), host_gflops=host_gflops,
                                         precision=precision).device_s
    return out


def section(out: Path, emit, host_gflops: float | None = None, pairs=tuple(POSE_PAIRS)) -> dict:
    """Every row through `emit(row, out)`; returns the summary (targets, chosen systems)."""
    if host_gflops is None:
        from devices.probe import peak_gflops
        host_gflops = peak_gflops()
    val, test = pose_stream("val"), pose_stream("test")
    summary = {"systems": {}, "targets": {}, "host_gflops": host_gflops, "pairs": {}}
    plot_points = []
    tmp = tempfile.TemporaryDirectory()
    for pair_name, pair in ((p, POSE_PAIRS[p]) for p in pairs):
        small_m, big_m = zoo.pose_model(pair[0]), zoo.pose_model(pair[1])
        example = torch.rand(1, 1, 96, 96)
        sessions = sessions_of({pair[0]: small_m, pair[1]: big_m}, Path(tmp.name))
        ms = model_ms(sessions)
        cost = {pair[0]: macs(small_m, example), pair[1]: macs(big_m, example)}
        so_v, bo_v = run_batched(small_m, val.frames), run_batched(big_m, val.frames)
        so_t, bo_t = run_batched(small_m, test.frames), run_batched(big_m, test.frames)
        summary["pairs"][pair_name] = {"ms": ms, "macs": cost}
        fuse = fit_fuse(so_v[:, :4], bo_v, val.pose)
        aux_corr = float(np.corrcoef(so_v[:, 4], np.abs(so_v[:, :4] - val.pose).mean(1))[0, 1])
        picked = picking(so_v, bo_v, val.pose)
        base = {}
        for label, (pv, pt), ran in (("small_only", (so_v[:, :4], so_t[:, :4]), ("small",)),
                                     ("big_only", (bo_v, bo_t), ("big",))):
            v = measure(pv, [ran] * len(pv), val, ms, pair, cost)
            row = {"section": "pose", "pair": pair_name, "system": label, **measure(pt, [ran] * len(pt), test, ms, pair, cost),
                   "val_nmae": v["nmae"], "val_ms": v["ms"], "measured_ms": timed(ran[0], sessions, pair, test)}
            row.update(on_profiles(row, ms, pair, host_gflops))
            emit(row, out)
            base[label] = row
        emit({"section": "pose", "pair": pair_name, "system": "models", "ms": ms, "macs": cost, "fuse": fuse,
              "aux_error_correlation_val": aux_corr, "big_on_20pct_val_nmae": picked}, out)
        big_v = base["big_only"]
        for strategy in ("consistency", "auxiliary", "combined"):
            scored = []
            for config in grid(strategy, so_v[:, 4], fuse):
                v = measure(*simulate(config, so_v, bo_v, val.sequence), val, ms, pair, cost)
                scored.append((config, v))
                plot_points.append((pair_name, strategy, v["ms"], v["nmae"]))
            picks = {
                "cheapest": min((s for s in scored if s[1]["nmae"] <= big_v["val_nmae"]), key=lambda s: s[1]["ms"],
                                default=None),
                "equal_latency": min((s for s in scored if s[1]["ms"] <= big_v["val_ms"]), key=lambda s: s[1]["nmae"],
                                     default=None),
                "best": min(scored, key=lambda s: s[1]["nmae"]),
            }
            for rule, pick in picks.items():
                if pick is None:
                    emit({"section": "pose", "pair": pair_name, "system": f"{pair_name}/{strategy}", "rule": rule,
                          "none": "no setting meets the rule on the validation stream"}, out)
                    continue
                config, v = pick
                pred, ran = simulate(config, so_t, bo_t, test.sequence)
                row = {"section": "pose", "pair": pair_name, "system": f"{pair_name}/{strategy}", "rule": rule,
                       "config": describe(config), **measure(pred, ran, test, ms, pair, cost), "val_nmae": v["nmae"],
                       "val_ms": v["ms"], "val_big_share": v["big_share"],
                       "measured_ms": timed(config, sessions, pair, test)}
                row.update(on_profiles(row, ms, pair, host_gflops))
                row["vs_big"] = {"ms": row["ms"] / base["big_only"]["ms"] - 1,
                                 "measured_ms": row["measured_ms"] / base["big_only"]["measured_ms"] - 1,
                                 "nmae": row["nmae"] / base["big_only"]["nmae"] - 1}
                if rule == "cheapest":   # the device-state policy on top: the same system on a low battery
                    fpred, fran = simulate(config, so_t, bo_t, test.sequence, DeviceState(battery=0.1))
                    low = measure(fpred, fran, test, ms, pair, cost)
                    row["low_battery"] = {"nmae": low["nmae"], "ms": low["ms"], "big_share": low["big_share"]}
                emit(row, out)
                summary["systems"].setdefault(f"{pair_name}/{strategy}", {})[rule] = row
        summary["pairs"][pair_name].update(small_only=base["small_only"], big_only=base["big_only"])
    tmp.cleanup()
    summary["targets"] = targets(summary)
    (out / "pose_grid.json").write_text(json.dumps(plot_points))
    return summary


def targets(summary: dict) -> dict:
    rows = [(name, rule, r) for name, rules in summary["systems"].items() for rule, r in rules.items()]

    def meeting(rule, ok):
        return [(name, r) for name, ru, r in rows if ru == rule and ok(r)]

    faster = meeting("cheapest", lambda r: r["vs_big"]["measured_ms"] <= -0.28 and r["vs_big"]["nmae"] <= 0)
    lower = meeting("equal_latency", lambda r: r["vs_big"]["nmae"] <= -0.03 and r["vs_big"]["measured_ms"] <= 0)
    peak = min(((name, r) for name, _, r in rows), key=lambda x: x[1]["vs_big"]["nmae"], default=(None, None))
    return {
        "28pct_less_latency_at_big_error": {"met": bool(faster), "systems": [n for n, _ in faster],
                                            "figures": {n: r["vs_big"] for n, ru, r in rows if ru == "cheapest"}},
        "3pct_lower_error_at_equal_latency": {"met": bool(lower), "systems": [n for n, _ in lower],
                                              "figures": {n: r["vs_big"] for n, ru, r in rows if ru == "equal_latency"}},
        "5pct_lower_error_peak": {"met": bool(peak[1] and peak[1]["vs_big"]["nmae"] <= -0.05), "system": peak[0],
                                  "figures": peak[1]["vs_big"] if peak[1] else None},
    }


def plot(out: Path, summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = json.loads((out / "pose_grid.json").read_text())
    fig, axes = plt.subplots(1, len(summary["pairs"]), figsize=(6 * len(summary["pairs"]), 4.5))
    for ax, pair_name in zip(np.atleast_1d(axes), summary["pairs"]):
        for strategy, marker in (("consistency", "o"), ("auxiliary", "s"), ("combined", "^")):
            pts = [(p[2], p[3]) for p in points if p[0] == pair_name and p[1] == strategy]
            ax.scatter(*zip(*pts), s=8, alpha=0.35, marker=marker, label=f"{strategy} (val grid)")
        pair = summary["pairs"][pair_name]
        for label in ("small_only", "big_only"):
            ax.scatter(pair[label]["val_ms"], pair[label]["val_nmae"], s=90, marker="*", label=label)
        ax.set(xlabel="ms per frame (this machine)", ylabel="nMAE (validation)", title=f"pose stream, {pair_name} pair")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pose.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_pose")
    parser.add_argument("--pairs", default=",".join(POSE_PAIRS), help=f"model pairs, of {', '.join(POSE_PAIRS)}")
    args = parser.parse_args()
    pairs = args.pairs.split(",")
    if not pairs or any(p not in POSE_PAIRS for p in pairs):
        parser.error(f"--pairs: choose from {', '.join(POSE_PAIRS)}, got {args.pairs!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "bench_pose.jsonl"
    rows_path.write_text("")

    def emit(row: dict, out: Path) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        with open(rows_path, "a") as f:
            f.write(line + "\n")
    torch.set_num_threads(1)
    summary = section(args.out, emit, pairs=pairs)
    plot(args.out, summary)
    print(json.dumps({"section": "pose", "system": "summary", "targets": summary["targets"]}))


if __name__ == "__main__":
    main()
