"""Benchmark the collaborative LLM: quality vs edge fraction, cloud work, bytes and latency per token.

    .venv/bin/python scripts/bench_collab_llm.py --model runs/ee_lm --out runs/bench_collab_llm.jsonl \\
        [--eval-text FILE] [--thresholds 0.3,0.5,0.7,0.9] [--plot runs/bench_collab_llm.png]

Without --eval-text the held-out split (the last 5% of ../shared/data/shakespeare.txt, never trained
on) is used. Prints one JSON object per measurement (and appends them to --out):
- kind "quality": teacher-forced on the eval text, per threshold and catch-up mode (exact /
  propagated), and the full model: perplexity, its increase over the full model, top-1 agreement
  with the full model, fraction of tokens decided at the edge.
- kind "generation": a real cloud-service (llm_continuation backend) behind scripts/linkemu.py for
  each --links profile (default 5 ms / 100 Mbit and 40 ms / 10 Mbit, one-way delay), greedy
  generation from --prompts prompts taken from the eval text, for standalone, cloud-only (the
  baseline, measured in the same run) and collaborative at each threshold in both catch-up modes:
  edge fraction, bytes sent per generated and per offloaded token (tensor payloads + codec
  parameters; request_bytes_* is the whole serialized protobuf request), cloud layer-token evaluations per
  token and the cloud-compute reduction against cloud-only (K/V-projection-only evaluations weighted
  by their share of a layer's multiply-adds), ms per token end to end, and top-1 agreement of the
  generated tokens with cloud-only's.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from edge_runtime.collab.device import CollabLlm
from split.llama import LlamaConfig, load_llama
from split.llama.calibrate import sweep, teacher_forced
from split.llama.exits import load_exit_heads, read_exits_json

ROOT = Path(__file__).resolve().parents[1]


def start(cmd, pattern, timeout_s=90):
    """Start a subprocess and wait for the line with its port."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    found, lines = [], []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(pattern, line)
            if m and not found:
                found.append(int(m.group(1)))
    threading.Thread(target=read, daemon=True).start()
    t0 = time.monotonic()
    while not found:
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            proc.kill()
            raise RuntimeError(f"{cmd[2:4]} did not start:\n" + "".join(lines))
        time.sleep(0.05)
    return proc, found[0]


def write_repository(root: Path, model: Path, k: int):
    for name, first, mode in (("llm", k, "exact"), ("llm_prop", k, "propagated"), ("llm_full", 0, "exact")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.toml").write_text(
            f'backend = "llm_continuation"\n[sequence_batching]\nmax_sequence_idle_microseconds = 600000000\n'
            f'max_state_bytes = 1073741824\n[parameters]\ncheckpoint = "{model.resolve()}"\nfirst_layer = {first}\n'
            f'catch_up = "{mode}"\ntop_k = 5\nintra_op_thread_count = 1\n')


def kv_share(cfg: LlamaConfig) -> float:
    """Multiply-adds of one layer's K+V projections over the whole layer's (attention scores aside)."""
    C, hd = cfg.hidden_size, cfg.head_dim
    q = o = C * cfg.num_attention_heads * hd
    kv = 2 * C * cfg.num_key_value_heads * hd
    return kv / (q + o + kv + 3 * C * cfg.intermediate_size)


def emit(row, out):
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--eval-text")
    p.add_argument("--exit-layer", type=int)
    p.add_argument("--thresholds", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--metric", choices=("max_prob", "entropy"), default="max_prob")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--links", default="5:100,40:10", help="DELAY_MS:RATE_MBIT,... one-way delay")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--wire", choices=("int8", "fp16", "fp32"), default="int8")
    p.add_argument("--out")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model_dir = Path(args.model)
    meta = read_exits_json(model_dir)
    k = args.exit_layer or max(meta["exit_layers"])
    cfg = LlamaConfig.from_dir(model_dir)
    L, share = cfg.num_hidden_layers, kv_share(cfg)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if args.eval_text:
        text = Path(args.eval_text).read_text(encoding="utf-8")
    else:
        full = (ROOT.parent / "shared" / "data" / "shakespeare.txt").read_text(encoding="utf-8")
        text = full[int(len(full) * 0.95):]
    ids = tok.encode(text).ids[: args.eval_tokens]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    calibrated = meta.get("threshold", {}).get(args.metric)
    if calibrated is not None and calibrated.get("exit_layer", k) != k:
        calibrated = None
    if calibrated is not None:  # the one `edge-runtime calibrate` wrote is always measured too
        thresholds = sorted(set(thresholds) | {round(calibrated["value"], 4)})
    common = {"model": str(model_dir), "exit_layer": k, "layers": L, "metric": args.metric,
              "calibrated_threshold": calibrated["value"] if calibrated else None,
              "eval_tokens": len(ids), "kv_share_of_layer": round(share, 4)}

    # --- quality, teacher-forced --------------------------------------------------------------
    model, heads = load_llama(model_dir), load_exit_heads(model_dir, [k])
    t0 = time.perf_counter()
    stats = teacher_forced(model_dir, ids, k, metric=args.metric, model=model, heads=heads)
    full_row = sweep(stats, [math.inf], args.metric)[0]
    emit({"kind": "quality", "config": "full_model", **common, "ppl": full_row["ppl"], "edge_fraction": 0.0,
          "ppl_increase": 0.0, "top1_agreement": 1.0}, args.out)
    emit({"kind": "quality", "config": "standalone", **common, **sweep(stats, [-1.0], args.metric)[0]}, args.out)
    quality = {}
    for t in thresholds:
        exact = sweep(stats, [t], args.metric)[0]
        prop_stats = teacher_forced(model_dir, ids, k, propagated_threshold=t, metric=args.metric, model=model, heads=heads)
        prop = sweep(prop_stats, [t], args.metric, reference=stats)[0]
        quality[t] = {"exact": exact, "propagated": prop}
        for mode, row in quality[t].items():
            emit({"kind": "quality", "config": "collaborative", "catch_up": mode, **common, **row}, args.out)
    print(f"# quality done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    # --- generation through the real cloud behind the link emulator ---------------------------
    prompts = [ids[i: i + args.prompt_tokens] for i in
               np.linspace(0, max(len(ids) - args.prompt_tokens - 1, 0), args.prompts).astype(int)]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(repo, model_dir, k)
        cloud, cloud_port = start([sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(repo),
                                   "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                                  r"serving grpcs?://[^:]+:(\d+)")
        try:
            for link in args.links.split(","):
                delay, rate = (float(x) for x in link.split(":"))
                emu, port = start([sys.executable, str(ROOT / "scripts" / "linkemu.py"), "--listen", "127.0.0.1:0",
                                   "--target", f"127.0.0.1:{cloud_port}", "--delay-ms", str(delay),
                                   "--rate-mbit", str(rate)], r"listening on [^:]+:(\d+)")
                try:
                    run_link(args, model_dir, k, L, share, prompts, thresholds, f"127.0.0.1:{port}",
                             {**common, "link": {"delay_ms": delay, "rate_mbit": rate}}, quality, full_row,
                             cfg.hidden_size)
                finally:
                    emu.terminate()
                    emu.wait(10)
        finally:
            cloud.terminate()
            cloud.wait(30)
    if args.plot and args.out:
        plot(args.out, args.plot)


def run_link(args, model_dir, k, L, share, prompts, thresholds, address, common, quality, full_row, hidden):
    configs = [("cloud-only", None, "exact"), ("standalone", None, "exact")]
    configs += [("collaborative", t, mode) for t in thresholds for mode in ("exact", "propagated")]
    baseline = None
    for mode, t, catch_up in configs:
        edge = CollabLlm(model_dir, mode=mode, cloud=address, threshold=t if t is not None else 0.5,
                         metric=args.metric, exit_layer=k, cloud_model="llm" if catch_up == "exact" else "llm_prop",
                         wire=args.wire, timeout_s=30.0)
        edge.generate(prompts[0][:4], 2)  # warm-up: connection, first-call costs
        tot = dict(tokens=0, edge=0, cloud=0, degraded=0, bytes=0, wire=0, layer=0, kv=0, seconds=0.0, states=0)
        outs = []
        for prompt in prompts:
            t0 = time.perf_counter()
            r = edge.generate(prompt, args.new_tokens)
            tot["seconds"] += time.perf_counter() - t0
            c = r.counters
            tot["tokens"] += len(r.tokens)
            tot["edge"] += c.edge_tokens
            tot["cloud"] += c.cloud_tokens
            tot["degraded"] += c.degraded_tokens
            tot["bytes"] += c.bytes_sent
            tot["wire"] += c.request_bytes
            tot["layer"] += c.cloud_layer_evals
            tot["kv"] += c.cloud_kv_evals
            tot["states"] += c.states_sent
            outs.append(r.tokens)
        edge.close()
        n = max(tot["tokens"], 1)
        cloud_cost = (tot["layer"] + share * tot["kv"]) / n  # layer-equivalents per generated token
        row = {"kind": "generation", "config": mode, "catch_up": catch_up if mode == "collaborative" else None,
               "threshold": t, **common, "wire": args.wire, "prompts": len(prompts), "new_tokens": args.new_tokens,
               "edge_fraction": tot["edge"] / n, "degraded_tokens": tot["degraded"],
               "bytes_per_token": tot["bytes"] / n,
               "bytes_per_offloaded_token": tot["bytes"] / tot["cloud"] if tot["cloud"] else None,
               "bytes_per_state": tot["bytes"] / tot["states"] if tot["states"] else None,
               "request_bytes_per_offloaded_token": tot["wire"] / tot["cloud"] if tot["cloud"] else None,
               "hidden_size": hidden,
               "cloud_layer_evals_per_token": tot["layer"] / n, "cloud_kv_evals_per_token": tot["kv"] / n,
               "cloud_cost_layer_equiv_per_token": cloud_cost, "ms_per_token": 1e3 * tot["seconds"] / n}
        if mode == "cloud-only":
            baseline = {"cost": cloud_cost, "ms": row["ms_per_token"], "tokens": outs}
        else:
            row["cloud_compute_reduction_vs_cloud_only"] = 1 - cloud_cost / baseline["cost"]
            row["latency_vs_cloud_only"] = row["ms_per_token"] / baseline["ms"]
            agree = [a == b for o, b_ in zip(outs, baseline["tokens"]) for a, b in zip(o, b_)]
            row["generated_top1_agreement_with_cloud_only"] = float(np.mean(agree))
            if t is not None:
                q = quality[t][catch_up]
                row["teacher_forced_ppl_increase"] = q["ppl_increase"]
                row["teacher_forced_top1_agreement"] = q["top1_agreement"]
        emit(row, args.out)


def plot(jsonl, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot", file=sys.stderr)
        return
    rows = [json.loads(line) for line in open(jsonl)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("exact", "propagated"):
        pts = sorted((r["edge_fraction"], r["ppl_increase"] * 100) for r in rows
                     if r["kind"] == "quality" and r.get("catch_up") == mode)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{mode} catch-up")
    ax.set_xlabel("fraction of tokens decided at the edge")
    ax.set_ylabel("perplexity increase over the full model (%)")
    ax.axhline(2, color="grey", linestyle="--", linewidth=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
