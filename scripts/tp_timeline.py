"""Where a decode step's time goes, per rank: runs `edge-runtime tp generate` with
EDGEFOLD_TP_TIMELINE set (edge_runtime/tp/timeline.py) and prints the median of each part.

    .venv/bin/python scripts/tp_timeline.py --model .cache/bench_tp/46M --world-size 1,2
    .venv/bin/python scripts/tp_timeline.py --read /tmp/tl.jsonl        # files an earlier run wrote

Per rank (ms, median over decode steps; the prefill step is left out):
    step      a step's wall time on this rank (master: forward; worker: STEP to the end of its layers)
    idle      between steps (master: sampling, the caller; worker: waiting for STEP)
    embed     master: embeddings + STEP broadcast;   head: master: final norm + LM head
    compute   layers minus allreduce (the rank's matmuls, attention, norms, paging hooks)
    wait      inside allreduce, waiting for the partials (master) / the sum (worker)
    ar_other  inside allreduce, the rest (encode, send, add, decode, copies)
and across ranks (world >= 2, ms per step, medians): `late` = how long the master waited after
it entered an allreduce before the last partial came (the slower rank's compute skew plus the
partial's trip), `sum_trip` = the master leaving the allreduce -> the worker getting the sum.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ",".join(str(i) for i in range(11, 27))
PARTS = ("step", "idle", "embed", "compute", "wait", "ar_other", "head")


def run(model: str, world: int, n_new: int, cache_dir: str | None, path: str) -> dict:
    cmd = [sys.executable, "-m", "edge_runtime.cli", "tp", "generate", "--model", model, "--world-size", str(world),
           "--prompt-ids", PROMPT, "--max-new-tokens", str(n_new), "--ignore-eos", "--window", "0", "--json"]
    cmd += ["--cache-dir", cache_dir] if cache_dir else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, EDGEFOLD_TP_TIMELINE=path))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load(path: str) -> dict[int, list[dict]]:
    ranks = {}
    for f in sorted(glob.glob(path + ".rank*")):
        rows = [json.loads(line) for line in open(f)]
        ranks[rows[0]["rank"]] = rows[1:]  # decode steps only
    return ranks


def breakdown(ranks: dict[int, list[dict]]) -> dict:
    med = lambda xs: round(statistics.median(xs) / 1000, 3)  # us -> ms
    out = {}
    for r, rows in sorted(ranks.items()):
        out[f"rank{r}"] = {
            "step": med([x["total"] for x in rows]), "idle": med([x["idle"] for x in rows]),
            "embed": med([x.get("embed", 0) for x in rows]), "head": med([x.get("head", 0) for x in rows]),
            "compute": med([x["layers"] - x["allreduce"] for x in rows]), "wait": med([x["wait"] for x in rows]),
            "ar_other": med([x["allreduce"] - x["wait"] for x in rows]),
            "allreduces": len(rows[0]["ar"]) if rows else 0}
    if 0 in ranks and 1 in ranks:
        late, trip = [], []
        for m in ranks[0]:
            w = min(ranks[1], key=lambda x: abs(x["t0"] - m["t0"]))  # the worker's same step
            if abs(w["t0"] - m["t0"]) > 0.5 * m["total"]:
                continue
            late.append(sum(a[2] - a[0] for a in m["ar"]))
            trip.append(sum((w["t0"] + b[2]) - (m["t0"] + a[3]) for a, b in zip(m["ar"], w["ar"])))
        out["across"] = {"late": med(late), "sum_trip": med(trip)} if late else {}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF folder (as `tp generate --model`)")
    ap.add_argument("--world-size", default="1,2", help="comma-separated world sizes to run, one after another")
    ap.add_argument("--n-new", type=int, default=32)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--read", help="print the breakdown of files an earlier run wrote (PATH.rank0, ...)")
    args = ap.parse_args()
    if args.read:
        print(json.dumps(breakdown(load(args.read))))
        return 0
    if not args.model:
        ap.error("give --model or --read")
    tmp = tempfile.mkdtemp(prefix="tp-timeline-")
    for w in (int(x) for x in args.world_size.split(",")):
        path = f"{tmp}/w{w}.jsonl"
        result = run(args.model, w, args.n_new, args.cache_dir, path)
        lat = sorted(result["token_latencies_s"])
        print(json.dumps(dict(world_size=w, median_token_ms=round(1e3 * lat[len(lat) // 2], 2),
                              threads=result["torch_threads"], files=path, **breakdown(load(path)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
