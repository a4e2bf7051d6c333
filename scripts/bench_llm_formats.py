"""Issue 12's benchmark: edgefold's weight formats against llama.cpp and transformers, in one run.

    .venv/bin/python scripts/bench_llm_formats.py --quick                  # smoke test, tiny shape (~3 min)
    .venv/bin/python scripts/bench_llm_formats.py --out docs/bench_llm_formats.jsonl \\
        --plot docs/bench_llm_formats.png           # the full run: ~1 h on a quiet machine, ~2 h with neighbours
    .venv/bin/python scripts/bench_llm_formats.py --profile --shapes 1.1B --formats int4 --windows 0,4
                                                                            # where the time goes, world 1
    .venv/bin/python scripts/bench_llm_formats.py --shapes 1.1B --formats int4 --worlds 1 --windows 0 \\
        --no-transformers                                                  # any subset
    (run it by its path, not with -m: scripts/llamacpp_peer.py, loaded by path, imports llamacpp_build from scripts/)

What runs, on the 336M shape (24 layers, hidden 1024, intermediate 2816, 16 heads, 4 KV heads, vocab 32000)
and the 1.1B shape (TinyLlama's: 22 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads), random bf16
checkpoints under .cache/bench_llm/<shape> (scripts/llamacpp_build.py's checkpoint()), greedy, 32 new tokens
after the same 16 prompt ids (llamacpp_peer.prompt_ids), 2 threads in total:
  * edgefold: `python -m edge_runtime.cli tp generate --shards DIR --json --window W [--dtype bf16]` in a child
    process (it starts its workers on loopback), for each format x world size x window. Shards come from
    `tp prepare --model HF --world-size N [--quantize int8|int4 --group-size 32] --out DIR`, kept under
    .cache/bench_llm/formats/<shape>-<store>-w<N> (store: float, shared by the fp32 and bf16 rows, int8, int4)
    and reused when plan.json is there. Every rank gets threads / world torch threads (at least 1, so 4 ranks run
    4 threads on 2 cores). Before the rows of a shard folder, one 2-token all-resident run warms the page cache
    (and makes int4's kernel-layout folder).
  * transformers `generate` (fp32, bf16) and llama.cpp (GGUF f32, q8_0, q4_0) through llamacpp_peer.py's
    run_transformers / run_llamacpp (one warm-up generation, then --peer-repeats measured ones in one process).
The machine is shared: every row waits for a quiet second and is measured again while others took more than
--quiet-limit cores during it (llamacpp_peer.quietest; the quietest try is kept).

Output: one JSON object per row on stdout and in --out (JSON lines), progress and a markdown table on stderr,
a PNG (--plot) of ms/token per configuration, one panel per shape, llama.cpp and transformers as lines.
Row fields (bench "bench_llm_formats"):
  shape, engine (edgefold | llama.cpp | transformers), format (edgefold and transformers: fp32 bf16 int8 int4;
  llama.cpp: f32 q8_0 q4_0), world (ranks), window (blocks resident per rank, 0 = all; None for the peers),
  ms_per_token: median of the decode steps' latencies (every step after the first token, pooled over repeats);
  ms_per_token_mean, ms_per_token_p90: their mean and 90th percentile; ttft_ms: time to first token (prompt
  prefill + first choice; median over repeats); peak_rss_mib: peak RSS per rank (peers: the process's, mmapped
  weights count once touched); above_baseline_mib: edgefold's peak per rank minus that rank's RSS before any
  weight was loaded; max_above_baseline_mib: its largest rank; paged_mib_per_token: MiB the pagers of all ranks
  read per forward pass (prompt pass included; with window 0 it is the one-time load spread over the run);
  paged_mib: each rank's total; pager_wait_s / pager_load_s: per rank, time waiting for a block / loading;
  threads_per_rank; tokens: the generated ids; same_tokens_every_run; same_first_tokens_as_transformers_fp32:
  how many leading tokens equal transformers fp32's; over_transformers_fp32: ms_per_token ratio to it;
  over_llamacpp: ratio to llama.cpp of the same bits (int8 / q8_0, int4 / q4_0, fp32 / f32); others_load,
  niced_load: cores' worth of CPU that other processes (niced ones) took while the row ran; quiet_before;
  attempts; wall_s: the row's wall time, repeats included; error: why a row failed (its other fields absent).
Target rows (bench "target"): name, shape, measured, limit, ok (measured <= limit; None: an input row was not
run), detail. On the 1.1B shape (else the last shape run), world 1: int8 resident <= 1.5x llama.cpp q8_0 ms/token,
int4 resident <= 1.5x q4_0, int4 resident <= 0.35x fp32 resident, int4 window 4 <= 1.5x int4 resident; and at
the largest world run (4), window 2, every rank's peak RSS above baseline <= the fp32 model size / 8 (the
issue's 4.4 GB / 8 = 550 MiB), one row per format run. Misses are reported as measured; --profile says why.
--quick: the tiny shape (.cache/bench_llm/tiny), 8 tokens, worlds 1,2, windows 0,2, one try per row; its
targets are smoke output only.
Profile rows (bench "profile", --profile): one per (shape, format, window) at world 1, run in this process
(engine.Master on a LocalCollective), after a warm-up generation: ms_per_token and parts_ms_per_token per decode
step: embed, norms (the RMSNorms inside layers), attn_proj (q/k/v/o), attn_core (rope, KV cache, attention:
the attention block minus its projections), mlp (gate/up/down and the activation), head (final norm and LM
head), pager_wait (waiting in the pager for a block), other (the rest: sampling, releasing blocks, Python);
per_layer_ms: each layer's whole time (its pager waits included); pager: loads, bytes and seconds;
others_load, quiet_before, attempts as above (others_load: the machine's busy CPU minus this process's).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".cache" / "bench_llm"
SHARDS = BENCH / "formats"
MiB = 2 ** 20
FORMATS = ("fp32", "bf16", "int8", "int4")
STORE = {"fp32": "float", "bf16": "float", "int8": "int8", "int4": "int4"}  # what tp prepare writes for each
LLAMACPP_KINDS = ("f32", "q8_0", "q4_0")
SAME_BITS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp's format of the same weight bits
TRANSFORMERS = {"fp32": "float32", "bf16": "bfloat16"}
TARGET_SHAPE = "1.1B"


@dataclass(frozen=True)
class Settings:
    """How every row is measured (plain values, set once in main)."""
    n_new: int = 32
    threads: int = 2
    repeats: int = 1            # edgefold processes per configuration (decode steps pooled)
    peer_repeats: int = 3       # measured generations per llama.cpp / transformers row, after a warm-up
    group_size: int = 32
    quiet_limit: float = 0.15
    attempts: int = 3
    quiet_wait: float = 120.0


def log(*parts) -> None:
    print("[bench_llm_formats]", *parts, file=sys.stderr, flush=True)


def load_peer():
    """scripts/llamacpp_peer.py as a module (by path)."""
    spec = importlib.util.spec_from_file_location("llamacpp_peer", Path(__file__).with_name("llamacpp_peer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emit(row: dict, out) -> dict:
    line = json.dumps(row)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()
    return row


# --- shards -------------------------------------------------------------------------------------------------
def ensure_shards(hf_dir: Path, shape: str, fmt: str, world: int, group_size: int) -> Path:
    """.cache/bench_llm/formats/<shape>-<store>-w<world> (int4 at another group size than 32: <store>-g<G>),
    prepared once by `tp prepare`."""
    store = STORE[fmt]
    out = SHARDS / f"{shape}-{store}{f'-g{group_size}' if store == 'int4' and group_size != 32 else ''}-w{world}"
    if (out / "plan.json").is_file():
        return out
    cmd = [sys.executable, "-m", "edge_runtime.cli", "tp", "prepare", "--model", str(hf_dir),
           "--world-size", str(world), "--out", str(out)]
    if store != "float":
        cmd += ["--quantize", store, "--group-size", str(group_size)]
    log(f"preparing {out.name} ...")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    log(f"  prepared in {time.perf_counter() - t0:.0f} s")
    return out


def n_params(hf_dir: Path) -> int:
    """Parameters of a safetensors checkpoint, from the files' headers."""
    total = 0
    for f in Path(hf_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


# --- edgefold -----------------------------------------------------------------------------------------------
def run_edgefold(shards: Path, fmt: str, window: int, prompt: list[int], n_new: int, threads: int) -> dict:
    """One `tp generate --json` child process; its JSON result."""
    world = json.loads((shards / "plan.json").read_text())["world_size"]
    cmd = [sys.executable, "-m", "edge_runtime.cli", "tp", "generate", "--shards", str(shards),
           "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(n_new), "--ignore-eos", "--json",
           "--window", str(window), "--timeout-s", "120", "--join-timeout-s", "300"]
    if STORE[fmt] == "float":
        cmd += ["--dtype", fmt]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // world)))  # tp generate passes it to workers
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode:
        raise RuntimeError(f"tp generate failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pooled(results: list[dict]) -> dict:
    """The row fields of one edgefold configuration from its runs (decode steps pooled, peaks the largest)."""
    steps = [s for r in results for s in r["token_latencies_s"]]
    peak = [max(v) for v in zip(*(r["peak_rss_bytes"] for r in results))]
    above = [max(p - b for p, b in v) for v in zip(*(zip(r["peak_rss_bytes"], r["baseline_rss_bytes"])
                                                      for r in results))]
    last = results[-1]
    paged = [p["bytes_loaded"] for p in last["pager"]]
    return dict(
        ms_per_token=1e3 * statistics.median(steps), ms_per_token_mean=1e3 * statistics.mean(steps),
        ms_per_token_p90=1e3 * sorted(steps)[int(0.9 * (len(steps) - 1))], decode_steps=len(steps),
        ttft_ms=1e3 * statistics.median(r["time_to_first_token_s"] for r in results),
        peak_rss_mib=[round(b / MiB, 1) for b in peak], above_baseline_mib=[round(b / MiB, 1) for b in above],
        max_above_baseline_mib=round(max(above) / MiB, 1),
        paged_mib_per_token=round(sum(paged) / max(1, len(last["token_ids"])) / MiB, 2),
        paged_mib=[round(b / MiB, 1) for b in paged], pager_wait_s=[round(p["wait_s"], 3) for p in last["pager"]],
        pager_load_s=[round(p["load_s"], 3) for p in last["pager"]], threads_per_rank=last["torch_threads"],
        dtype=last["dtype"], quantize=last["quantize"], tokens=last["token_ids"],
        same_tokens_every_run=all(r["token_ids"] == last["token_ids"] for r in results))


def edgefold_row(peer, shards: Path, fmt: str, window: int, prompt: list[int], s: Settings) -> dict:
    def measure():
        t0 = time.monotonic()
        runs = [run_edgefold(shards, fmt, window, prompt, s.n_new, s.threads) for _ in range(s.repeats)]
        return dict(pooled(runs), wall_s=round(time.monotonic() - t0, 1))
    return peer.quietest(measure, s.quiet_limit, s.attempts, s.quiet_wait)


def edgefold_rows(peer, hf_dir: Path, shape: str, formats, worlds, windows, prompt, s: Settings) -> list[dict]:
    rows, warm = [], set()
    for world in worlds:
        for fmt in formats:
            base = dict(bench="bench_llm_formats", shape=shape, engine="edgefold", format=fmt, world=world)
            try:
                shards = ensure_shards(hf_dir, shape, fmt, world, s.group_size)
                if shards not in warm:  # fp32 and bf16 share theirs
                    run_edgefold(shards, fmt, 0, prompt, 2, s.threads)  # page cache, int4 kernel layout
                    warm.add(shards)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                rows += [dict(base, window=w, error=str(err)[-2000:]) for w in windows]
                log(f"{shape} edgefold {fmt} world {world}: {err}")
                continue
            for window in windows:
                log(f"{shape} edgefold {fmt} world {world} window {window or 'all'} ...")
                try:
                    r = edgefold_row(peer, shards, fmt, window, prompt, s)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    rows.append(dict(base, window=window, error=str(err)[-2000:]))
                    log(f"  failed: {str(err)[-500:]}")
                    continue
                rows.append(dict(base, window=window, **rounded(r)))
                log(f"  {r['ms_per_token']:.1f} ms/token, ttft {r['ttft_ms']:.0f} ms, above baseline "
                    f"{r['above_baseline_mib']} MiB, paged {r['paged_mib_per_token']:.0f} MiB/token, "
                    f"others' load {r['others_load']:.2f} cores, {r['attempts']} tries")
    return rows


def rounded(r: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


# --- llama.cpp and transformers -----------------------------------------------------------------------------
def peer_rows(peer, hf_dir: Path, shape: str, llamacpp: bool, transformers: bool, prompt, s: Settings) -> list[dict]:
    """llama.cpp f32/q8_0/q4_0 and transformers fp32/bf16 rows through llamacpp_peer.py."""
    jobs = []
    if llamacpp:
        jobs += [("llama.cpp", kind, lambda k=kind: peer.run_llamacpp(
            peer.to_gguf(hf_dir, k, s.threads), prompt, s.n_new, s.threads, s.peer_repeats)) for kind in LLAMACPP_KINDS]
    if transformers:
        jobs += [("transformers", fmt, lambda d=dtype: peer.run_transformers(
            hf_dir, d, prompt, s.n_new, s.threads, s.peer_repeats)) for fmt, dtype in TRANSFORMERS.items()]
    rows = []
    for engine, fmt, fn in jobs:
        base = dict(bench="bench_llm_formats", shape=shape, engine=engine, format=fmt, world=1, window=None)
        log(f"{shape} {engine} {fmt} ...")
        t0 = time.monotonic()
        try:
            r = peer.quietest(fn, s.quiet_limit, s.attempts, s.quiet_wait)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            rows.append(dict(base, error=str(err)[-2000:]))
            log(f"  failed: {str(err)[-500:]}")
            continue
        r = dict(r, wall_s=round(time.monotonic() - t0, 1), peak_rss_mib=[round(r["peak_rss_mib"], 1)],
                 threads_per_rank=s.threads)
        rows.append(dict(base, **rounded(r)))
        log(f"  {r['ms_per_token']:.1f} ms/token, ttft {r['ttft_ms']:.0f} ms, peak RSS {r['peak_rss_mib'][0]:.0f} MiB, "
            f"others' load {r['others_load']:.2f} cores, {r['attempts']} tries")
    return rows


def find(rows: list[dict], shape: str, engine: str, fmt: str, world: int = 1, window: int | None = 0) -> dict | None:
    window = None if engine != "edgefold" else window
    return next((r for r in rows if "error" not in r and (r["shape"], r["engine"], r["format"], r["world"],
                                                          r["window"]) == (shape, engine, fmt, world, window)), None)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row of a shape with its ratios to transformers fp32 and to llama.cpp of the same bits."""
    out = []
    for r in rows:
        if "error" in r:
            out.append(r)
            continue
        ref = find(rows, r["shape"], "transformers", "fp32")
        same = find(rows, r["shape"], "llama.cpp", SAME_BITS.get(r["format"], "")) if r["engine"] == "edgefold" else None
        extra = {}
        if ref:
            extra["over_transformers_fp32"] = round(r["ms_per_token"] / ref["ms_per_token"], 3)
            extra["same_first_tokens_as_transformers_fp32"] = next(
                (i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"])) if a != b), len(ref["tokens"]))
        if same:
            extra["over_llamacpp"] = round(r["ms_per_token"] / same["ms_per_token"], 3)
        out.append(dict(r, **extra))
    return out


# --- targets ------------------------------------------------------------------------------------------------
def target(name: str, shape: str, measured: float | None, limit: float, detail: str) -> dict:
    return dict(bench="target", name=name, shape=shape, measured=None if measured is None else round(measured, 3),
                limit=limit, ok=None if measured is None else bool(measured <= limit), detail=detail)


def ratio_target(name: str, shape: str, a: dict | None, b: dict | None, limit: float, what: str) -> dict:
    if a is None or b is None:
        return target(name, shape, None, limit, f"not run: {what}")
    return target(name, shape, a["ms_per_token"] / b["ms_per_token"], limit,
                  f"{what}: {a['ms_per_token']:.1f} vs {b['ms_per_token']:.1f} ms/token")


def targets(rows: list[dict], shape: str, rss_world: int, rss_limit_mib: float) -> list[dict]:
    """Issue 12's targets, each a ratio (or a bound) from this run's rows of `shape`."""
    def ef(fmt, window=0):
        return find(rows, shape, "edgefold", fmt, 1, window)

    def lc(kind):
        return find(rows, shape, "llama.cpp", kind)
    out = [
        ratio_target("int8 resident ms/token <= 1.5x llama.cpp q8_0 (world 1)", shape, ef("int8"), lc("q8_0"), 1.5,
                     "edgefold int8 all-resident vs llama.cpp q8_0"),
        ratio_target("int4 resident ms/token <= 1.5x llama.cpp q4_0 (world 1)", shape, ef("int4"), lc("q4_0"), 1.5,
                     "edgefold int4 all-resident vs llama.cpp q4_0"),
        ratio_target("int4 resident ms/token <= 0.35x fp32 resident (world 1)", shape, ef("int4"), ef("fp32"), 0.35,
                     "edgefold int4 vs fp32, all-resident"),
        ratio_target("int4 window 4 ms/token <= 1.5x int4 resident (world 1)", shape, ef("int4", 4), ef("int4"), 1.5,
                     "edgefold int4 window 4 vs all-resident"),
    ]
    name = f"{rss_world}-rank window 2 peak RSS above baseline <= fp32 size / 8 ({rss_limit_mib:.4g} MiB), every rank"
    ran = [r for r in rows if r.get("engine") == "edgefold" and r["shape"] == shape and r["world"] == rss_world
           and r["window"] == 2 and "error" not in r]
    out += [target(f"{name}, {r['format']}", shape, r["max_above_baseline_mib"], round(rss_limit_mib, 1),
                   f"above baseline per rank {r['above_baseline_mib']} MiB") for r in ran]
    if not any(r["format"] == "int4" for r in ran):
        out.append(target(f"{name}, int4", shape, None, round(rss_limit_mib, 1), "not run: int4 window 2"))
    return out


# --- profile ------------------------------------------------------------------------------------------------
class PartTimer:
    """Forward hooks timing each module kind of a tensor-parallel Master's model, and the pager's acquire."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self.layers: dict[int, float] = {}
        self.started: dict[int, float] = {}

    def reset(self) -> None:
        self.parts.clear()
        self.layers.clear()

    def add(self, part: str, seconds: float, layer: int | None = None) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds
        if layer is not None:
            self.layers[layer] = self.layers.get(layer, 0.0) + seconds

    def watch(self, module, part: str, layer: int | None = None, inner: bool = False) -> None:
        """Time module's forward under `part` (per layer too when `layer` is set). inner: after its other
        pre-hooks (the pager's acquire) and before its other hooks (release, allreduce); else around them."""
        def pre(m, args):
            self.started[id(m)] = time.perf_counter()

        def post(m, args, output):
            self.add(part, time.perf_counter() - self.started.pop(id(m)), layer)
        module.register_forward_pre_hook(pre, prepend=not inner)
        module.register_forward_hook(post, prepend=inner)

    def attach(self, master) -> None:
        kinds = {"self_attn": "attn", "mlp": "mlp", "input_layernorm": "norms", "post_attention_layernorm": "norms",
                 "self_attn.q_proj": "attn_proj", "self_attn.k_proj": "attn_proj", "self_attn.v_proj": "attn_proj",
                 "self_attn.o_proj": "attn_proj"}
        model = master.model
        for name, layer in model.layers.items():
            self.watch(layer, "layer", int(name))
            for sub, part in kinds.items():
                self.watch(layer.get_submodule(sub), part, inner=True)
        self.watch(model.embed_tokens, "embed")
        self.watch(model.norm, "head")
        self.watch(model.lm_head, "head")
        pager, acquire = master.shard.pager, master.shard.pager.acquire

        def timed_acquire(key):
            t0 = time.perf_counter()
            try:
                return acquire(key)
            finally:
                self.add("pager_wait", time.perf_counter() - t0)
        pager.acquire = timed_acquire  # the paging hooks look it up on the pager object


def profile(shards: Path, shape: str, fmt: str, window: int, prompt: list[int], n_new: int, threads: int) -> dict:
    """One world-1 generation in this process with PartTimer's hooks: ms per decode step of each part."""
    import torch

    from edge_runtime.tp.collective import LocalCollective
    from edge_runtime.tp.engine import Master

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    master = Master(shards / "rank0", LocalCollective(), window, dtype)
    try:
        list(master.generate(prompt, 4))  # warm-up: page cache, kernels
        timer = PartTimer()
        timer.attach(master)
        gen = master.generate(prompt, n_new)
        for i, _ in enumerate(gen):
            if i == 0:
                timer.reset()  # the prompt's pass is not a decode step
        stats = master.shard.pager.stats
    finally:
        master.close()
    steps = gen.token_latencies_s
    n = len(steps)
    per_step = {k: 1e3 * v / n for k, v in timer.parts.items()}
    parts = {"embed": per_step.get("embed", 0.0), "norms": per_step.get("norms", 0.0),
             "attn_proj": per_step.get("attn_proj", 0.0),
             "attn_core": per_step.get("attn", 0.0) - per_step.get("attn_proj", 0.0),
             "mlp": per_step.get("mlp", 0.0), "head": per_step.get("head", 0.0),
             "pager_wait": per_step.get("pager_wait", 0.0)}
    parts["other"] = 1e3 * sum(steps) / n - sum(parts.values())
    return dict(bench="profile", shape=shape, engine="edgefold", format=fmt, world=1, window=window, threads=threads,
                ms_per_token=round(1e3 * statistics.median(steps), 3), ms_per_token_mean=round(1e3 * sum(steps) / n, 3),
                decode_steps=n, parts_ms_per_token={k: round(v, 3) for k, v in parts.items()},
                per_layer_ms=[round(1e3 * timer.layers[i] / n, 3) for i in sorted(timer.layers)],
                pager=dict(loads=stats.loads, bytes_loaded=stats.bytes_loaded, load_s=round(stats.load_seconds, 3),
                           wait_s=round(stats.wait_seconds, 3)))


def quietest_here(peer, measure, s: Settings) -> dict:
    """llamacpp_peer.quietest for work done in this process: others_load is the machine's busy CPU minus
    this process's own over the run; tried again (s.attempts at most) while it exceeds s.quiet_limit."""
    best = None
    for attempt in range(1, s.attempts + 1):
        quiet = peer.wait_quiet(s.quiet_limit, s.quiet_wait)
        busy0, own0, t0 = peer.machine_cpu_s()[0], time.process_time(), time.monotonic()
        r = measure()
        wall = time.monotonic() - t0
        others = max(0.0, peer.machine_cpu_s()[0] - busy0 - (time.process_time() - own0)) / wall
        r = dict(r, others_load=round(others, 3), quiet_before=quiet)
        if best is None or others < best["others_load"]:
            best = r
        if others <= s.quiet_limit or not quiet:
            break
    return dict(best, attempts=attempt)


def profile_rows(peer, shapes, formats, windows, s: Settings, cache: Path, out) -> None:
    for shape in shapes:
        hf_dir = peer.checkpoint(shape, cache)
        prompt = peer.prompt_ids(json.loads((hf_dir / "config.json").read_text())["vocab_size"])
        for fmt in formats:
            shards = ensure_shards(hf_dir, shape, fmt, 1, s.group_size)
            for window in windows:
                log(f"profiling {shape} {fmt} world 1 window {window or 'all'} ...")
                row = emit(quietest_here(peer, lambda w=window: profile(shards, shape, fmt, w, prompt, s.n_new,
                                                                        s.threads), s), out)
                log("  " + ", ".join(f"{k} {v:.1f}" for k, v in row["parts_ms_per_token"].items())
                    + f" ms/token (median step {row['ms_per_token']:.1f} ms), others' load "
                      f"{row['others_load']:.2f} cores, {row['attempts']} tries")


# --- output -------------------------------------------------------------------------------------------------
def fmt_ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | engine | format | world | window | ms/token (median) | first token, ms | "
             "peak RSS above baseline, MiB per rank | peak RSS, MiB | paged MiB/token | / transformers fp32 | "
             "/ llama.cpp same bits | others' load |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        window = "" if r["window"] is None else (r["window"] or "all")
        head = f"| {r['shape']} | {r['engine']} | {r['format']} | {r['world']} | {window} |"
        if "error" in r:
            lines.append(f"{head} failed | | | | | | | |")
            continue
        above = "/".join(f"{v:.0f}" for v in r.get("above_baseline_mib", [])) or "-"
        paged = f"{r['paged_mib_per_token']:.0f}" if "paged_mib_per_token" in r else "-"
        lines.append(f"{head} {fmt_ms(r['ms_per_token'])} | {fmt_ms(r['ttft_ms'])} | {above} | "
                     f"{max(r['peak_rss_mib']):.0f} | {paged} | {r.get('over_transformers_fp32', '-')} | "
                     f"{r.get('over_llamacpp', '-')} | {r['others_load']:.2f} |")
    return "\n".join(lines)


def target_markdown(rows: list[dict]) -> str:
    lines = ["| target | measured | limit | ok |", "|---|---:|---:|---|"]
    lines += [f"| {t['name']} | {t['measured'] if t['measured'] is not None else '-'} | {t['limit']} | "
              f"{ {True: 'yes', False: '**no**', None: 'not run'}[t['ok']] } |" for t in rows]
    return "\n".join(lines)


COLORS = {"fp32": "tab:blue", "f32": "tab:blue", "bf16": "tab:purple", "int8": "tab:green", "q8_0": "tab:green",
          "int4": "tab:red", "q4_0": "tab:red"}


def plot(rows: list[dict], path: Path) -> None:
    """ms/token per configuration (world, window) and format, one panel per shape; peers as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    shapes = list(dict.fromkeys(r["shape"] for r in ok if r["engine"] == "edgefold"))
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        ef = [r for r in ok if r["shape"] == shape and r["engine"] == "edgefold"]
        configs = sorted({(r["world"], r["window"]) for r in ef})  # per world: all resident, then windows
        labels = [f"{w} rank{'s' if w > 1 else ''}\n{'all' if win == 0 else f'window {win}'}" for w, win in configs]
        for fmt in FORMATS:
            ys = [next((r["ms_per_token"] for r in ef if r["format"] == fmt and (r["world"], r["window"]) == c),
                       math.nan) for c in configs]
            if not all(math.isnan(y) for y in ys):
                ax.plot(range(len(configs)), ys, "o-", color=COLORS[fmt], label=f"edgefold {fmt}")
        for r in ok:
            if r["shape"] == shape and r["engine"] != "edgefold":
                ax.axhline(r["ms_per_token"], color=COLORS.get(r["format"], "gray"),
                           ls="--" if r["engine"] == "llama.cpp" else ":", lw=1,
                           label=f"{r['engine']} {r['format']} ({fmt_ms(r['ms_per_token'])})")
        ax.set_xticks(range(len(configs)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set(ylabel="ms per token (median decode step)", title=f"{shape}: greedy decode, 2 threads in total")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


# --- main ---------------------------------------------------------------------------------------------------
def csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="336M,1.1B", help="comma-separated, of 336M, 1.1B (and tiny)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="edgefold formats")
    ap.add_argument("--worlds", default="1,2,4", help="edgefold world sizes")
    ap.add_argument("--windows", default="0,2,4", help="edgefold windows (0 = all resident)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="in total (split between ranks)")
    ap.add_argument("--repeats", type=int, default=1, help="edgefold processes per configuration")
    ap.add_argument("--peer-repeats", type=int, default=3, help="measured generations per peer row, after a warm-up")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size")
    ap.add_argument("--quiet-limit", type=float, default=0.15, help="cores of others' work that count as disturbed")
    ap.add_argument("--quiet-wait", type=float, default=120, help="seconds to wait for a quiet machine per try")
    ap.add_argument("--attempts", type=int, default=3, help="tries of a disturbed row, the quietest kept")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny shape, 8 tokens, worlds 1,2, windows 0,2")
    ap.add_argument("--profile", action="store_true",
                    help="instead: a per-part profile of each selected shape x format x window at world 1")
    ap.add_argument("--cache", default=str(BENCH), help="where the checkpoints are")
    ap.add_argument("--out", help="JSON lines (default runs/bench_llm_formats[_quick|_profile].jsonl)")
    ap.add_argument("--plot", help="PNG (default docs/bench_llm_formats.png; --quick: runs/bench_llm_formats_quick.png)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.shapes, args.worlds, args.windows, args.new_tokens = "tiny", "1,2", "0,2", 8
        args.peer_repeats, args.quiet_wait, args.attempts = 1, 5, 1
    suffix = "_quick" if args.quick else "_profile" if args.profile else ""
    out_path = Path(args.out or ROOT / "runs" / f"bench_llm_formats{suffix}.jsonl")
    plot_path = Path(args.plot or (ROOT / "runs" / "bench_llm_formats_quick.png" if args.quick
                                   else ROOT / "docs" / "bench_llm_formats.png"))
    s = Settings(n_new=args.new_tokens, threads=args.threads, repeats=args.repeats, peer_repeats=args.peer_repeats,
                 group_size=args.group_size, quiet_limit=args.quiet_limit, attempts=args.attempts,
                 quiet_wait=args.quiet_wait)
    shapes, formats = csv(args.shapes), csv(args.formats)
    worlds, windows = csv(args.worlds, int), csv(args.windows, int)
    if set(formats) - set(FORMATS):
        raise SystemExit(f"--formats: expected some of {','.join(FORMATS)}, got {args.formats}")
    peer = load_peer()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out:
        emit(dict(bench="machine", machine=peer.machine(), cpus=os.cpu_count(), loadavg=os.getloadavg(),
                  threads=s.threads, new_tokens=s.n_new, prompt_tokens=16, repeats=s.repeats,
                  peer_repeats=s.peer_repeats, group_size=s.group_size, quick=args.quick), out)
        log(f"machine: {peer.machine()}")
        if args.profile:
            profile_rows(peer, shapes, formats, windows, s, Path(args.cache), out)
            return
        rows = []
        for shape in shapes:
            hf_dir = peer.checkpoint(shape, Path(args.cache))
            prompt = peer.prompt_ids(json.loads((hf_dir / "config.json").read_text())["vocab_size"])
            shape_rows = peer_rows(peer, hf_dir, shape, not args.no_llamacpp, not args.no_transformers, prompt, s)
            shape_rows += edgefold_rows(peer, hf_dir, shape, formats, worlds, windows, prompt, s)
            rows += [emit(r, out) for r in with_ratios(shape_rows)]
        target_shape = TARGET_SHAPE if TARGET_SHAPE in shapes else shapes[-1]
        rss_limit = n_params(peer.checkpoint(target_shape, Path(args.cache))) * 4 / 8 / 1e6  # the 4.4 GB/8 = 550
        found = [emit(t, out) for t in targets(rows, target_shape, max(worlds), rss_limit)]
    log("\n" + markdown(rows) + "\n\n" + target_markdown(found))
    plot(rows, plot_path)


if __name__ == "__main__":
    main()
