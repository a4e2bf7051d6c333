"""Tensor-parallel inference benchmark: allreduce, token latency and peak memory against transformers.

    .venv/bin/python scripts/bench_tp.py --quick                        # ~2 min: small shapes, 8 tokens
    .venv/bin/python scripts/bench_tp.py --plot docs/bench_tp.png       # full run, ~15-20 min on 2 cores
    .venv/bin/python scripts/bench_tp.py --only 46M                     # one row group (allreduce, 200M, 46M)
    (run it by its path, not with -m: Python then puts scripts/ on sys.path for `import bench_tp_allreduce`)

Prints one JSON object per measurement (also written to --out, JSON lines), then one row per
target with its measured numbers and pass/fail. Every comparison is measured in the same run on
the same cores:

  * allreduce rows: scripts/bench_tp_allreduce.py's `run` (star/ZeroMQ vs gloo, world 2-4, loopback
    and through the link emulator);
  * "200M": a random-initialised Llama (24 layers, hidden 1024, 16 heads / 8 KV heads,
    intermediate 1408, vocab 16000 untied: 209M parameters, fp32), world size 2, windows 2, 4, 8 and
    all-resident, warm page cache and cold (devices.page_cache.drop_page_cache before the run); per rank: token
    latency, peak RSS and the RSS baseline (before any weight is loaded), the share of block load
    time hidden behind compute (1 - acquire wait / load time); single-process transformers
    `generate` on the same checkpoint as the baseline;
  * "46M": 12 layers, hidden 512 (8 heads, intermediate 1376, vocab 8000): world 2 vs transformers.

Every run is a fresh process (`edge-runtime tp generate --json`, which starts the worker ranks on
loopback; transformers in a child of this script), greedy, 32 new tokens after a 16-token prompt,
EOS ignored. Token latency = the median decode step of a run; warm configurations run --rounds
times (default 3) interleaved, and the summary row takes the median over rounds, so a busy
neighbour slows every configuration alike. Ranks share the machine's cores (each rank gets
cores / world threads); transformers is measured with 1 thread and with every core, and the
targets compare against its faster setting. Checkpoints are cached under .cache/bench_tp/
(git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_tp"
PROMPT = list(range(11, 27))  # 16 tokens

SHAPES = {  # name -> transformers LlamaConfig kwargs
    "200M": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=1408, vocab_size=16000),
    "46M": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=1376, vocab_size=8000),
    # --quick stand-ins with the same structure
    "quick-24L": dict(hidden_size=256, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=512, vocab_size=4000),
    "quick-12L": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=512, vocab_size=4000),
}


def emit(row: dict, out) -> dict:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()
    return row


# --------------------------------------------------------------------------- checkpoints

def make_checkpoint(name: str) -> Path:
    """A random-initialised Llama in HF format, one safetensors file per layer (+ index.json), so
    memory stays at one layer while writing; std 0.02 like transformers' init, norms 1."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from tqdm import tqdm

    path = CACHE / name
    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = path.with_name(name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **SHAPES[name])
    cfg.save_pretrained(tmp)
    C, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, C_hd(cfg)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    weight_map, total = {}, 0
    files = [("embed", None)] + [("layer", i) for i in range(cfg.num_hidden_layers)] + [("head", None)]
    for kind, i in tqdm(files, desc=f"writing {name} checkpoint", unit="file"):
        if kind == "embed":
            ts = {"model.embed_tokens.weight": rnd(V, C)}
        elif kind == "head":
            ts = {"model.norm.weight": torch.ones(C), "lm_head.weight": rnd(V, C)}
        else:
            p = f"model.layers.{i}."
            nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
            ts = {p + "input_layernorm.weight": torch.ones(C), p + "post_attention_layernorm.weight": torch.ones(C),
                  p + "self_attn.q_proj.weight": rnd(nq, C), p + "self_attn.k_proj.weight": rnd(nkv, C),
                  p + "self_attn.v_proj.weight": rnd(nkv, C), p + "self_attn.o_proj.weight": rnd(C, nq),
                  p + "mlp.gate_proj.weight": rnd(I, C), p + "mlp.up_proj.weight": rnd(I, C),
                  p + "mlp.down_proj.weight": rnd(C, I)}
        fname = f"model-{kind}{'' if i is None else f'{i:03d}'}.safetensors"
        save_file(ts, tmp / fname, metadata={"format": "pt"})
        for k, t in ts.items():
            weight_map[k] = fname
            total += t.numel() * 4
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    tmp.rename(path)
    return path


def C_hd(cfg) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def n_params(path: Path) -> int:
    return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 4


# --------------------------------------------------------------------------- runs

def run_tp(shards: Path, window: int, n_new: int, backend="star", payload="fp32", cold=False) -> dict:
    from devices.page_cache import drop_page_cache
    if cold:
        drop_page_cache([p for p in shards.rglob("*.safetensors")])
    cmd = [sys.executable, "-m", "edge_runtime.cli", "tp", "generate", "--shards", str(shards),
           "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(n_new), "--ignore-eos",
           "--window", str(window), "--backend", backend, "--payload", payload, "--json", "--timeout-s", "30"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_hf(model: Path, n_new: int, cold=False, threads: int | None = None) -> dict:
    if cold:
        from devices.page_cache import drop_page_cache
        drop_page_cache(list(model.glob("*.safetensors")))
    cmd = [sys.executable, __file__, "--hf-child", str(model), "--n-new", str(n_new)]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"transformers baseline failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_child(model: str, n_new: int, threads: int | None) -> None:
    """Single-process transformers generate; prints token ids, latencies and peak RSS as JSON."""
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    from devices.telemetry import ResidentSet

    transformers.logging.set_verbosity_error()
    rss = ResidentSet()
    hf = transformers.LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    times = []

    class Clock(transformers.generation.streamers.BaseStreamer):
        def put(self, value):
            times.append(time.perf_counter())

        def end(self):
            pass

    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        t0 = time.perf_counter()
        ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False,
                          eos_token_id=[], pad_token_id=0, streamer=Clock())[0, len(PROMPT):].tolist()
    # put() is called with the prompt first, then once per new token
    tok_times = times[1:]
    lat = [b - a for a, b in zip(tok_times, tok_times[1:])]
    print(json.dumps(dict(token_ids=ids, time_to_first_token_s=tok_times[0] - t0, token_latencies_s=lat,
                          mean_token_latency_s=sum(lat) / len(lat), peak_rss_bytes=[rss.peak()],
                          baseline_rss_bytes=[rss.baseline], torch_threads=torch.get_num_threads())))


def _hidden(result: dict) -> list[float]:
    return [round(max(0.0, 1 - p["wait_s"] / p["load_s"]), 3) if p["load_s"] else 1.0 for p in result["pager"]]


def _tp_row(name, shards, world, window, cache, result, hf_ids=None) -> dict:
    mib = 2 ** 20
    lat = result["token_latencies_s"]
    return dict(bench="tp_generate", model=name, world_size=world, window=window or "all", page_cache=cache,
                backend=result["backend"], payload=result["payload"],
                mean_token_latency_ms=round(1e3 * sum(lat) / len(lat), 2),
                median_token_latency_ms=round(1e3 * sorted(lat)[len(lat) // 2], 2),
                time_to_first_token_ms=round(1e3 * result["time_to_first_token_s"], 1),
                peak_rss_mib=[round(b / mib, 1) for b in result["peak_rss_bytes"]],
                baseline_rss_mib=[round(b / mib, 1) for b in result["baseline_rss_bytes"]],
                above_baseline_mib=[round((p - b) / mib, 1) for p, b in
                                    zip(result["peak_rss_bytes"], result["baseline_rss_bytes"])],
                load_hidden_fraction=_hidden(result),
                load_s=[p["load_s"] for p in result["pager"]], wait_s=[p["wait_s"] for p in result["pager"]],
                bytes_sent=result["bytes_sent"], threads_per_rank=result["torch_threads"],
                same_tokens_as_transformers=None if hf_ids is None else result["token_ids"] == hf_ids,
                tokens=len(result["token_ids"]))


def _hf_row(name, cache, r) -> dict:
    mib = 2 ** 20
    lat = r["token_latencies_s"]
    return dict(bench="transformers_generate", model=name, page_cache=cache,
                mean_token_latency_ms=round(1e3 * r["mean_token_latency_s"], 2),
                median_token_latency_ms=round(1e3 * sorted(lat)[len(lat) // 2], 2),
                time_to_first_token_ms=round(1e3 * r["time_to_first_token_s"], 1),
                peak_rss_mib=round(r["peak_rss_bytes"][0] / mib, 1),
                baseline_rss_mib=round(r["baseline_rss_bytes"][0] / mib, 1),
                above_baseline_mib=round((r["peak_rss_bytes"][0] - r["baseline_rss_bytes"][0]) / mib, 1),
                threads=r["torch_threads"], tokens=len(r["token_ids"]))


def aggregate(runs: list[dict]) -> dict:
    """One row for repeated runs of a configuration: the median over runs of each run's median token
    latency (and its spread), the largest peak RSS."""
    med = sorted(r["median_token_latency_ms"] for r in runs)
    row = {k: v for k, v in runs[-1].items() if k != "round"}
    row.update(bench=row["bench"] + "_summary", runs=len(runs), run_median_token_latency_ms=med,
               median_token_latency_ms=med[len(med) // 2],
               mean_token_latency_ms=round(sum(r["mean_token_latency_ms"] for r in runs) / len(runs), 2))
    for key in ("peak_rss_mib", "above_baseline_mib"):
        vals = [r[key] for r in runs]
        row[key] = [max(v) for v in zip(*vals)] if isinstance(vals[0], list) else max(vals)
    return row


def target(out, name, measured, limit, ok, detail) -> dict:
    return emit(dict(bench="target", target=name, measured=round(measured, 3), limit=limit, passed=bool(ok),
                     detail=detail), out)


GROUPS = ("allreduce", "200M", "46M")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small stand-in shapes, 8 tokens, no cold runs")
    ap.add_argument("--plot", help="write a PNG of token latency and peak memory against window")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_tp.jsonl"))
    ap.add_argument("--only", type=lambda t: set(t.split(",")), default=set(GROUPS),
                    help=f"comma-separated row groups to run, of {','.join(GROUPS)} (with --quick, 200M and 46M "
                         "mean their stand-ins); targets only for the groups run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every warm configuration")
    ap.add_argument("--hf-child", help=argparse.SUPPRESS)
    ap.add_argument("--n-new", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only - set(GROUPS):
        ap.error(f"--only: expected groups from {','.join(GROUPS)}, got {','.join(sorted(args.only - set(GROUPS)))}")
    if args.hf_child:
        hf_child(args.hf_child, args.n_new, args.threads)
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "w")
    n_new = 8 if args.quick else 32
    big, small = ("quick-24L", "quick-12L") if args.quick else ("200M", "46M")
    windows = [2, 4, 0] if args.quick else [2, 4, 8, 0]
    emit(dict(bench="machine", cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
              load_average=os.getloadavg(), quick=args.quick, new_tokens=n_new, prompt_tokens=len(PROMPT)), out)

    if "allreduce" in args.only:
        try:
            from bench_tp_allreduce import run as allreduce_run
        except ImportError as e:
            emit(dict(bench="allreduce", skipped=f"scripts/bench_tp_allreduce.py not importable: {e}"), out)
        else:
            quick = dict(world_sizes=(2, 4), delays_ms=(0, 5), hidden=(1024,), iters=50, warmup=5)
            allreduce_run(**(quick if args.quick else {}), emit=lambda row: emit(row, out))

    rows = {}
    rounds = 1 if args.quick else args.rounds
    hf_threads = sorted({1, os.cpu_count() or 1})  # transformers with 1 thread and with every core
    if "200M" in args.only:
        big_rows(rows, big, windows, n_new, rounds, hf_threads, args.quick, out)
    if "46M" in args.only:
        small_rows(rows, small, n_new, rounds, hf_threads, out)
    out.close()
    if args.plot and "200M" in args.only:
        plot(rows, windows, big, args.plot, cold=not args.quick)
    return 0


def big_rows(rows, big, windows, n_new, rounds, hf_threads, quick, out) -> None:
    """The 200M shape (or its quick stand-in): windows, warm and cold, vs transformers; its targets."""
    from edge_runtime.tp.launch import cached_shards

    model = make_checkpoint(big)
    emit(dict(bench="checkpoint", model=big, parameters=n_params(model), path=str(model)), out)
    shards = cached_shards(model, 2, [1.0, 1.0], CACHE / "shards")
    hf_ids = run_hf(model, n_new)["token_ids"]  # the reference tokens; also warms the page cache
    run_tp(shards, 0, 2)  # ... and for the shards
    warm = [("hf", t) for t in hf_threads] + [("tp", w) for w in windows]
    runs = {key: [] for key in warm}
    for i in range(rounds):  # interleaved rounds: a busy neighbour slows every configuration alike
        for kind, w in warm:
            if kind == "hf":
                runs[kind, w].append(emit(dict(_hf_row(big, "warm", run_hf(model, n_new, threads=w)), round=i), out))
            else:
                result = run_tp(shards, w, n_new)
                runs[kind, w].append(emit(dict(_tp_row(big, shards, 2, w, "warm", result, hf_ids), round=i), out))
    for t in hf_threads:
        rows["hf", t] = emit(aggregate(runs["hf", t]), out)
    # the baseline is transformers' faster thread setting on these cores
    rows["hf", "warm"] = min((rows["hf", t] for t in hf_threads), key=lambda r: r["median_token_latency_ms"])
    for w in windows:
        rows[w, "warm"] = emit(aggregate(runs["tp", w]), out)
    if not quick:
        for w in windows:
            rows[w, "cold"] = emit(_tp_row(big, shards, 2, w, "cold", run_tp(shards, w, n_new, cold=True)), out)
        rows["hf", "cold"] = emit(_hf_row(big, "cold", run_hf(model, n_new, cold=True)), out)

    all_lat = rows[0, "warm"]["median_token_latency_ms"]
    w4 = rows[4, "warm"]["median_token_latency_ms"]
    target(out, "window 4 token latency <= 1.5x all-resident (warm)", w4 / all_lat, 1.5, w4 <= 1.5 * all_lat,
           f"{big}: window 4 {w4} ms vs all-resident {all_lat} ms per token")
    for r, who in ((1, "worker rank 1"), (0, "master rank 0 (also holds the LM head)")):
        a2 = rows[2, "warm"]["above_baseline_mib"][r]
        aa = rows[0, "warm"]["above_baseline_mib"][r]
        target(out, f"window 2 peak RSS above baseline <= 15% of all-resident, {who}", a2 / aa, 0.15,
               a2 <= 0.15 * aa, f"{big}: window 2 {a2} MiB vs all-resident {aa} MiB above baseline")
    hf_lat = rows["hf", "warm"]["median_token_latency_ms"]
    target(out, "world-2 token latency <= 1.25x single-process transformers", all_lat / hf_lat, 1.25,
           all_lat <= 1.25 * hf_lat, f"{big}: world 2 all-resident {all_lat} ms vs transformers {hf_lat} ms per token")


def small_rows(rows, small, n_new, rounds, hf_threads, out) -> None:
    """The 46M shape (or its quick stand-in) at world 2 vs transformers; its target."""
    from edge_runtime.tp.launch import cached_shards

    model46 = make_checkpoint(small)
    emit(dict(bench="checkpoint", model=small, parameters=n_params(model46), path=str(model46)), out)
    shards46 = cached_shards(model46, 2, [1.0, 1.0], CACHE / "shards")
    hf46_ids = run_hf(model46, n_new)["token_ids"]
    run_tp(shards46, 0, 2)
    r46 = {"tp": [], **{("hf", t): [] for t in hf_threads}}
    for i in range(rounds):
        for t in hf_threads:
            r46["hf", t].append(emit(dict(_hf_row(small, "warm", run_hf(model46, n_new, threads=t)), round=i), out))
        r46["tp"].append(emit(dict(_tp_row(small, shards46, 2, 0, "warm", run_tp(shards46, 0, n_new), hf46_ids),
                                   round=i), out))
    rows["46", "tp"] = emit(aggregate(r46["tp"]), out)
    shards1 = cached_shards(model46, 1, [1.0], CACHE / "shards")  # world 1, same cores, interleaved rounds
    w1 = [emit(dict(_tp_row(small, shards1, 1, 0, "warm", run_tp(shards1, 0, n_new), hf46_ids), round=i), out)
          for i in range(rounds)]
    t1 = emit(aggregate(w1), out)["median_token_latency_ms"]
    t2 = rows["46", "tp"]["median_token_latency_ms"]
    target(out, "world 2 within 1.1x of world 1, all resident", t2 / t1, 1.1, t2 <= 1.1 * t1,
           f"{small}: world 2 {t2} ms vs world 1 {t1} ms per token (ranks share this machine's cores)")
    rows["46", "hf"] = min((emit(aggregate(r46["hf", t]), out) for t in hf_threads),
                           key=lambda r: r["median_token_latency_ms"])

    t46, h46 = rows["46", "tp"]["median_token_latency_ms"], rows["46", "hf"]["median_token_latency_ms"]
    target(out, "46M world-2 token latency <= 1.5x transformers", t46 / h46, 1.5, t46 <= 1.5 * h46,
           f"{small}: world 2 {t46} ms vs transformers ({rows['46', 'hf']['threads']} threads) {h46} ms per token")


def plot(rows, windows, name, path, cold):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(w) if w else "all" for w in windows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    med = [rows[w, "warm"]["median_token_latency_ms"] for w in windows]
    spread = [rows[w, "warm"].get("run_median_token_latency_ms", [m]) for w, m in zip(windows, med)]
    a.errorbar(labels, med, yerr=[[m - min(r) for m, r in zip(med, spread)], [max(r) - m for m, r in zip(med, spread)]],
               fmt="o-", capsize=3, label="world 2, warm cache (median, range over rounds)")
    if cold:
        a.plot(labels, [rows[w, "cold"]["median_token_latency_ms"] for w in windows], "s--", label="world 2, cold cache")
    a.axhline(rows["hf", "warm"]["median_token_latency_ms"], color="gray", ls=":",
              label=f"transformers, 1 process ({rows['hf', 'warm']['threads']} thread(s))")
    a.set(xlabel="window (blocks resident per rank)", ylabel="median ms per token", title=f"{name}: token latency")
    a.legend(fontsize=8)
    for r in (0, 1):
        b.plot(labels, [rows[w, "warm"]["peak_rss_mib"][r] for w in windows], "o-",
               label=f"rank {r}" + (" (master: + LM head)" if r == 0 else ""))
    b.axhline(rows["hf", "warm"]["peak_rss_mib"], color="gray", ls=":", label="transformers, 1 process")
    b.set(xlabel="window (blocks resident per rank)", ylabel="peak RSS (MiB)", title=f"{name}: peak memory per rank")
    b.set_ylim(bottom=0)
    b.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
