"""Benchmark the collaborative LLM against cloud streaming: quality, cloud work, bytes and latency per token.

    .venv/bin/python scripts/bench_collab_llm.py --model runs/ee_lm --out runs/bench_collab_llm.jsonl \\
        [--eval-text FILE] [--thresholds 0.3,0.5,0.7,0.9] [--medusa] [--plot runs/bench_collab_llm.png]

Without --eval-text the held-out split (the last 5% of ../shared/data/shakespeare.txt, never trained
on) is used. Prints one JSON object per measurement (and appends them to --out):
- kind "quality": teacher-forced on the eval text, per threshold and catch-up mode (exact /
  propagated), and the full model: perplexity, its increase over the full model, top-1 agreement
  with the full model, fraction of tokens decided at the edge.
- kind "generation": a real cloud-service behind scripts/linkemu.py for each --links profile
  (default 5 ms / 100 Mbit and 40 ms / 10 Mbit, one-way delay), greedy generation from --prompts
  prompts taken from the eval text (plus one warm-up), for: cloud-only (one call per token, the
  CE-CoLLM-style baseline), cloud-stream (the cloud generates the whole answer and streams it: what
  a hosted LLM API does, the baseline that matters), standalone, collaborative at each threshold
  with exact, propagated and token-id catch-up, speculative (exit-head drafts; with --medusa also
  Medusa drafts) and auto (what it chose, and its prediction). Per row: who decided the tokens,
  bytes per generated token (tensor payloads; request_bytes_per_further_token is what each
  further generated token adds to the serialized requests, the first request, which carries the
  prompt, left out), round trips per token, cloud layer-token evaluations per token (K/V-only ones
  weighted by their share of a layer), ms per token end to end and time to first token, against
  cloud-only and cloud-stream measured in the same run, and whether the tokens equal cloud-only's.
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

from edge_runtime.client.oip_client import OipClient
from edge_runtime.collab.auto import AutoLlm
from edge_runtime.collab.device import CollabLlm
from edge_runtime.collab.stream import CloudStream
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
    """llm (exact catch-up), llm_prop (propagated), llm_tok (token ids), llm_full (k = 0: cloud-only and
    speculative verification) and llm_stream (the cloud generates and streams)."""
    for name, first, mode in (("llm", k, "exact"), ("llm_prop", k, "propagated"), ("llm_tok", k, "tokens"),
                              ("llm_full", 0, "exact")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.toml").write_text(
            f'backend = "llm_continuation"\n[sequence_batching]\nmax_sequence_idle_microseconds = 600000000\n'
            f'max_state_bytes = 1073741824\n[parameters]\ncheckpoint = "{model.resolve()}"\nfirst_layer = {first}\n'
            f'catch_up = "{mode}"\ntop_k = 5\nintra_op_thread_count = 1\n')
    (root / "llm_stream" / "1").mkdir(parents=True)
    (root / "llm_stream" / "config.toml").write_text(
        f'backend = "llm_stream"\n[model_transaction_policy]\ndecoupled = true\n[parameters]\n'
        f'checkpoint = "{model.resolve()}"\nintra_op_thread_count = 1\n')


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
    p.add_argument("--gamma", type=int, default=8, help="speculative: the most drafts per call (adapted)")
    p.add_argument("--medusa", action="store_true",
                   help="also speculative with the Medusa heads beside the exit heads (medusa_heads.safetensors)")
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
                    args.link_rate = rate     # what --mode auto is told; it measures the round trip itself
                    run_link(args, model_dir, k, L, share, prompts, thresholds, f"127.0.0.1:{port}",
                             {**common, "link": {"delay_ms": delay, "rate_mbit": rate}}, quality, full_row,
                             cfg.hidden_size, medusa_drafter(model_dir, k) if args.medusa else None)
                finally:
                    emu.terminate()
                    emu.wait(10)
        finally:
            cloud.terminate()
            cloud.wait(30)
    if args.plot and args.out:
        plot(args.out, args.plot)


def medusa_drafter(model_dir: Path, k: int):
    """A speculative drafter from the Medusa heads trained beside the exit heads (split.llama.medusa)."""
    from split.llama.medusa import load_medusa_heads
    heads = load_medusa_heads(model_dir, k)
    return lambda ctx, n: heads.draft(ctx.h, n, ctx.sampling, ctx.gen)


class CountingClient(OipClient):
    """An OipClient that keeps the serialized size of every request it sends (and of its reply), so a
    generation's bytes can be split into the first request (the prompt) and what each further
    generated token adds."""

    def __init__(self, target: str, **kw):
        super().__init__(target, **kw)
        self.requests, self.replies = [], []

    def call(self, rpc, request, timeout_s=None):
        reply = super().call(rpc, request, timeout_s)
        if rpc == "ModelInfer":
            self.requests.append(request.ByteSize())
            self.replies.append(reply.ByteSize())
        return reply


def run_mode(config, model_dir, k, address, args, prompts, medusa=None):
    """Greedy generation of every prompt in one mode; per prompt: tokens, sources, counters, seconds,
    time to first token, request and reply sizes. config: (mode, threshold, cloud model or drafter)."""
    mode, t, which = config
    client = CountingClient(address, timeout_s=30.0)
    if mode == "cloud-stream":
        runner = CloudStream(client=client, timeout_s=30.0)
    else:
        collab_mode = "speculative" if mode in ("speculative", "auto") else mode
        runner = CollabLlm(model_dir, mode=collab_mode, threshold=t if t is not None else 0.5, metric=args.metric,
                           exit_layer=k, cloud_model=which if mode == "collaborative" else "llm", wire=args.wire,
                           timeout_s=30.0, client=client, gamma=args.gamma,
                           drafter=medusa if mode == "speculative" and which == "medusa" else None)
        if mode == "auto":
            runner = AutoLlm(runner, rate_mbit=args.link_rate, max_ppl_increase=0.0)
    out = []
    for i, prompt in enumerate([prompts[0][:4]] + prompts):     # the first: warm-up (connection, first calls)
        client.requests.clear()
        client.replies.clear()
        t0 = time.perf_counter()
        if mode == "cloud-stream":
            r = runner.generate(prompt, args.new_tokens, ignore_eos=True)
            c = {"bytes_sent": r.bytes_sent, "request_bytes": r.bytes_sent, "bytes_received": r.bytes_received,
                 "round_trips": 1, "cloud_layer_evals": r.cloud_layer_evals, "cloud_tokens": len(r.tokens)}
            requests, replies = [r.bytes_sent], [r.bytes_received]
        elif mode == "auto":
            r = runner.generate(prompt, args.new_tokens)
            c, requests, replies = dict(r.counters), list(client.requests), list(client.replies)
            c["chose"], c["predicted_ms"] = r.mode, 1e3 * r.choice.predicted_s_per_token
            c["predictions"] = {row.mode: round(1e3 * row.seconds_per_token, 2) for row in r.choice.rows}
        else:
            r = runner.generate(prompt, args.new_tokens)
            c, requests, replies = r.counters.as_dict(), list(client.requests), list(client.replies)
        seconds = time.perf_counter() - t0
        if i:
            out.append(dict(tokens=list(r.tokens), sources=list(r.sources), counters=c, seconds=seconds,
                            ttft=r.seconds_per_token[0] if r.seconds_per_token else None,
                            requests=requests, replies=replies))
    (runner.llm if mode == "auto" else runner).close()
    return out


def run_link(args, model_dir, k, L, share, prompts, thresholds, address, common, quality, full_row, hidden,
             medusa=None):
    configs = [("cloud-only", None, "llm_full"), ("cloud-stream", None, None), ("standalone", None, None)]
    configs += [("collaborative", t, model) for t in thresholds for model in ("llm", "llm_prop", "llm_tok")]
    configs += [("speculative", None, "exit"), ("auto", None, None)]
    if medusa is not None:
        configs.append(("speculative", None, "medusa"))
    baseline = stream = None
    for config in configs:
        mode, t, which = config
        runs = run_mode(config, model_dir, k, address, args, prompts, medusa)
        n = sum(len(r["tokens"]) for r in runs) or 1
        total = lambda key: sum(r["counters"].get(key, 0) for r in runs)  # noqa: E731
        sources = [s for r in runs for s in r["sources"]]
        further = [(sum(r["requests"][1:]), sum(r["replies"][1:]), len(r["tokens"]) - 1) for r in runs]
        cloud_cost = (total("cloud_layer_evals") + share * total("cloud_kv_evals")) / n
        catch_up = {"llm": "exact", "llm_prop": "propagated", "llm_tok": "tokens"}.get(which) if mode == "collaborative" else None
        row = {"kind": "generation", "config": mode, "catch_up": catch_up, "threshold": t,
               "drafter": which if mode == "speculative" else None, **common, "wire": args.wire,
               "prompts": len(prompts), "new_tokens": args.new_tokens,
               "edge_fraction": sources.count("edge") / n, "draft_fraction": sources.count("draft") / n,
               "cloud_fraction": sources.count("cloud") / n, "degraded_tokens": sources.count("degraded"),
               "bytes_per_token": total("bytes_sent") / n,
               "bytes_per_offloaded_token": total("bytes_sent") / total("cloud_tokens") if total("cloud_tokens") else None,
               "request_bytes_per_token": total("request_bytes") / n,
               "request_bytes_per_further_token": sum(f[0] for f in further) / max(sum(f[2] for f in further), 1),
               "reply_bytes_per_further_token": sum(f[1] for f in further) / max(sum(f[2] for f in further), 1),
               "round_trips_per_token": total("round_trips") / n, "hidden_size": hidden,
               "cloud_layer_evals_per_token": total("cloud_layer_evals") / n,
               "cloud_kv_evals_per_token": total("cloud_kv_evals") / n,
               "cloud_cost_layer_equiv_per_token": cloud_cost,
               "ms_per_token": 1e3 * sum(r["seconds"] for r in runs) / n,
               "ttft_ms": 1e3 * float(np.median([r["ttft"] for r in runs if r["ttft"] is not None]))}
        if mode == "speculative":
            row["drafted"], row["accepted"] = total("drafted"), total("accepted")
            row["acceptance"] = total("accepted") / max(total("drafted"), 1)
        if mode == "auto":
            row["chose"] = [r["counters"]["chose"] for r in runs]
            row["predicted_ms_per_token"] = [round(r["counters"]["predicted_ms"], 2) for r in runs]
            row["predictions_ms_per_token"] = runs[-1]["counters"]["predictions"]
        outs = [r["tokens"] for r in runs]
        if mode == "cloud-only":
            baseline = {"cost": cloud_cost, "ms": row["ms_per_token"], "tokens": outs}
        else:
            row["cloud_compute_reduction_vs_cloud_only"] = 1 - cloud_cost / baseline["cost"]
            row["latency_vs_cloud_only"] = row["ms_per_token"] / baseline["ms"]
            agree = [a == b for o, b_ in zip(outs, baseline["tokens"]) for a, b in zip(o, b_)]
            row["generated_top1_agreement_with_cloud_only"] = float(np.mean(agree))
            row["identical_to_cloud_only"] = outs == baseline["tokens"]
        if mode == "cloud-stream":
            stream = {"cost": cloud_cost, "ms": row["ms_per_token"]}
        elif stream is not None and mode != "cloud-only":
            row["latency_vs_cloud_stream"] = row["ms_per_token"] / stream["ms"]
            row["cloud_work_vs_cloud_stream"] = cloud_cost / stream["cost"] if stream["cost"] else None
        if t is not None and catch_up in ("exact", "propagated"):
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
