"""llama.cpp as issue 12's benchmark peer: llama-cpp-python 0.3.36 built from source, GGUF f32/q8_0/q4_0, 2 threads.

    .venv/bin/python scripts/llamacpp_peer.py --quick                 # smoke test on a tiny shape
    .venv/bin/python scripts/llamacpp_peer.py --shapes 336M,1.1B      # issue 12's figures (~10 min after the build)
    .venv/bin/python scripts/llamacpp_peer.py --ensure-venv           # only the build (once, ~5-10 min on 2 cores)

What it does, each step cached under .cache/ (git-ignored) and done once:
  * ensure_venv(): `python -m venv .cache/llamacpp-venv`, then in it
        pip install 'numpy>=2.2.6,<3' 'sentencepiece>=0.1.98,<0.3.0' transformers==4.57.6 'protobuf>=4.21.0,<5.0.0' \
            torch==<the project venv's torch, the machine's CPU wheel> <sdist>/vendor/llama.cpp/gguf-py
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
            -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" FORCE_CMAKE=1 \
            pip install --verbose --no-binary llama-cpp-python llama-cpp-python==0.3.36
    the sdist being `pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d .cache/llamacpp-sdist`
    (the build log goes to .cache/llamacpp-build.log). The default native build enables ggml's AMX int8 path on
    this machine kind and then crashes in decode on every q8_0/q4_0 model (DESIGN.md, "llama.cpp as a benchmark
    peer"), so the build is checked with llama_cpp.llama_print_system_info(): AMX_INT8 must be absent.
  * checkpoint(shape): random bf16 Llama checkpoints written by transformers save_pretrained exactly as
    scripts/bench_prepare.py writes .cache/bench_llm/1.1B (which is reused); 336M goes to .cache/bench_llm/336M.
  * to_gguf(hf_dir, kind): the converter needs a real tokenizer folder, so .cache/bench_llm/<shape>/gguf/hf/ links
    the checkpoint's files (the checkpoint folder itself is left as it is) beside a `tokenizers` BPE vocabulary of
    the model's vocab size (no merges, ignore_merges, byte fallback, Llama's decoder: one id per token; the
    converter rejects WordLevel); then, in the llama.cpp venv,
        python <sdist>/vendor/llama.cpp/convert_hf_to_gguf.py gguf/hf --outtype f32 --outfile gguf/model-f32.gguf
    and q8_0 / q4_0 from the f32 file with llama_cpp.llama_model_quantize (llama-quantize is not built; q4_0
    keeps the output layer at q6_K, llama.cpp's default).
  * run_llamacpp(gguf, prompt_ids): a child process of the llama.cpp venv (llama_cpp cannot be imported here)
    loads the model (n_ctx 256; mmap, n_batch 512, flash attention off: llama-cpp-python's defaults), evaluates
    the prompt token ids (no text round trip) and then n_new greedy tokens one llama_decode at a time, argmax of
    the last logits in numpy; one warm-up generation, then `repeats` measured ones. time to first token = prompt
    decode + argmax; decode latency = one llama_decode of one token + argmax. Peak RSS is the child's VmHWM (the
    mmapped weights count once touched).
  * run_transformers(hf_dir, dtype, prompt_ids): the same prompt through transformers' greedy `generate` (fp32,
    bf16), 2 torch threads, in a child process of the project venv, timed by a streamer; rows of one shape carry
    ms/token over transformers fp32 of the same run.
stdout: one JSON object per (shape, engine, format) row (also written to --out); stderr: progress and a markdown
table. The machine has 2 cores shared with others' tests, and both engines' OpenMP threads degrade badly when a
neighbour holds a core (measured here with a niced single-thread neighbour: llama.cpp 336M q4_0 at 2 threads 2004
ms/token instead of ~31 at 1 thread; OMP_WAIT_POLICY=passive: 35): each row waits (--quiet-wait s at most) for a
1 s stretch in which the machine ran less than --quiet-limit cores, is measured again (--attempts at most) while
anything else took more than that during it, keeps the quietest try, and records others_load (cores' worth of
CPU that went to anything but the measured process over its life) and niced_load.
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from loadgen import machine  # scripts/
from llamacpp_build import (BENCH, CMAKE_ARGS, KINDS, MARKER, N_FIXED, ROOT, SHAPES, VERSION, checkpoint,  # scripts/
                            ensure_venv, in_venv, log, tensor_types, to_gguf, venv_python)


# The end of both child scripts: a warm-up generation (touches the mmapped weights), `repeats`
# measured ones, one JSON line. Each child defines a, generate(n_new) -> (ttft, steps, tokens),
# load_s and versions before it.
MEASURE = """
generate(min(a["n_new"], 8))
runs = [generate(a["n_new"]) for _ in range(a["repeats"])]
steps = [s for r in runs for s in r[1]]
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps(dict(
    ttft_ms=1e3 * statistics.median(r[0] for r in runs), ttft_ms_all=[round(1e3 * r[0], 2) for r in runs],
    ms_per_token=1e3 * statistics.median(steps), ms_per_token_mean=1e3 * statistics.mean(steps),
    ms_per_token_p90=1e3 * sorted(steps)[int(0.9 * (len(steps) - 1))], decode_steps=len(steps),
    tokens=runs[-1][2], same_tokens_every_run=all(r[2] == runs[0][2] for r in runs),
    load_s=load_s, peak_rss_mib=int(status["VmHWM"].split()[0]) / 1024,
    **versions)))
"""

RUN_LLAMACPP = """
import json, statistics, sys, time
import numpy as np
import llama_cpp
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=a["gguf"], n_ctx=a["n_ctx"], n_threads=a["threads"], n_threads_batch=a["threads"],
                      seed=0, verbose=False)
load_s = time.perf_counter() - t0
n_vocab = llm.n_vocab()
ctx = llm._ctx.ctx

def argmax():
    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())

def generate(n_new):
    llm.reset()
    t = time.perf_counter()
    llm.eval(a["prompt"])
    tokens = [argmax()]
    now = time.perf_counter()
    ttft, steps = now - t, []
    while len(tokens) < n_new:
        t = now
        llm.eval([tokens[-1]])
        tokens.append(argmax())
        now = time.perf_counter()
        steps.append(now - t)
    return ttft, steps, tokens

versions = dict(system_info=llama_cpp.llama_print_system_info().decode().strip(),
                llama_cpp_python=llama_cpp.__version__)
""" + MEASURE

RUN_TRANSFORMERS = """
import json, statistics, sys, time
import torch, transformers
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(a["hf_dir"], dtype=getattr(torch, a["dtype"]))
model.eval()
load_s = time.perf_counter() - t0
prompt = torch.tensor([a["prompt"]])

class Clock(transformers.generation.streamers.BaseStreamer):
    def __init__(self):
        self.times = []
    def put(self, value):
        self.times.append(time.perf_counter())
    def end(self):
        pass

def generate(n_new):
    clock = Clock()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, streamer=clock, pad_token_id=0)
    times = clock.times[1:]                          # the first put() is the prompt
    return times[0] - t, [b - a for a, b in zip(times, times[1:])], out[0, prompt.shape[1]:].tolist()

versions = dict(torch=torch.__version__, transformers=transformers.__version__)
""" + MEASURE


def run_llamacpp(gguf: Path, prompt_ids: list[int], n_new: int = 32, threads: int = 2, repeats: int = 3,
                 n_ctx: int = 256, env: dict | None = None) -> dict:
    """Greedy decode of n_new tokens after prompt_ids by llama.cpp in a child process of its venv: ttft_ms,
    ms_per_token (median of the decode steps of `repeats` runs after a warm-up), peak_rss_mib, tokens, ...
    env: extra environment of the child (e.g. OMP_WAIT_POLICY; none by default: llama.cpp as users run it)."""
    args = dict(gguf=str(gguf), prompt=[int(t) for t in prompt_ids], n_new=n_new, threads=threads,
                repeats=repeats, n_ctx=max(n_ctx, len(prompt_ids) + n_new))
    return in_venv(RUN_LLAMACPP, json.dumps(args), env=env)


def run_transformers(hf_dir: Path, dtype: str, prompt_ids: list[int], n_new: int = 32, threads: int = 2,
                     repeats: int = 3) -> dict:
    """The same greedy decode by transformers' generate (dtype 'float32' or 'bfloat16') in a child process of
    the project venv."""
    args = dict(hf_dir=str(hf_dir), dtype=dtype, prompt=[int(t) for t in prompt_ids], n_new=n_new,
                threads=threads, repeats=repeats)
    done = subprocess.run([sys.executable, "-c", RUN_TRANSFORMERS, json.dumps(args)], capture_output=True,
                          text=True, timeout=3600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode:
        raise RuntimeError(f"transformers child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- neighbours on a shared machine -------------------------------------------------------------------------
def machine_cpu_s() -> tuple[float, float]:
    """(busy, niced) CPU seconds of the whole machine since boot (/proc/stat; steal counts as busy)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    tck = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tck, nice / tck


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(limit: float, max_wait_s: float) -> bool:
    """Wait (max_wait_s at most) for a 1 s stretch in which the machine ran less than `limit` cores of work
    (niced work included: it slows us too); False if none came."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_cpu_s()[0]
        time.sleep(1.0)
        if machine_cpu_s()[0] - before <= limit:
            return True
        if time.monotonic() > deadline:
            return False


def quietest(measure, limit: float, attempts: int, wait_s: float) -> dict:
    """measure() (which runs one child process) once the machine is quiet, again (`attempts` at most) while
    something else took more than `limit` cores during it; keeps the quietest attempt. others_load: cores'
    worth of CPU that went to anything but the child, over the child's life; niced_load: niced work in it."""
    best = None
    for attempt in range(1, attempts + 1):
        quiet = wait_quiet(limit, wait_s)
        busy0, nice0 = machine_cpu_s()
        own0, t0 = children_cpu_s(), time.monotonic()
        r = measure()
        wall = time.monotonic() - t0
        busy1, nice1 = machine_cpu_s()
        r = dict(r, others_load=round(max(0.0, busy1 - busy0 - (children_cpu_s() - own0)) / wall, 3),
                 niced_load=round((nice1 - nice0) / wall, 3), quiet_before=quiet)
        if best is None or r["others_load"] < best["others_load"]:
            best = r
        if r["others_load"] <= limit or not quiet:
            break
    return dict(best, attempts=attempt)


def prompt_ids(vocab_size: int, n: int = 16, seed: int = 0) -> list[int]:
    """<s> and n - 1 word ids drawn with a fixed seed (the tokens every engine gets, as ids)."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(N_FIXED, vocab_size) for _ in range(n - 1)]




def markdown(rows: list[dict]) -> str:
    lines = ["| shape | engine | format | ms/token (median) | time to first token, ms | peak RSS, MiB | "
             "/ transformers fp32 | others' load, cores |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms, ttft = (f"{r[k]:.1f}" if r[k] >= 10 else f"{r[k]:.2f}" for k in ("ms_per_token", "ttft_ms"))
        lines.append(f"| {r['shape']} | {r['engine']} | {r['format']} | {ms} | {ttft} | {r['peak_rss_mib']:.0f} | "
                     f"{r.get('over_transformers_fp32', 0):.2f} | {r.get('others_load', 0):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="336M,1.1B", help="comma-separated, of " + ", ".join(SHAPES))
    ap.add_argument("--kinds", default=",".join(KINDS), help="GGUF formats")
    ap.add_argument("--transformers", default="float32,bfloat16", help="dtypes of transformers rows ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="measured generations per row, after one warm-up")
    ap.add_argument("--quiet-limit", type=float, default=0.15,
                    help="cores of other work (niced included) above which a row counts as disturbed")
    ap.add_argument("--quiet-wait", type=float, default=120, help="seconds to wait for a quiet machine per try")
    ap.add_argument("--attempts", type=int, default=3, help="tries of a disturbed row, the quietest kept")
    ap.add_argument("--omp-wait-policy", default="", help="OMP_WAIT_POLICY for llama.cpp (default: unset)")
    ap.add_argument("--quick", action="store_true", help="smoke test: the tiny shape, one repeat")
    ap.add_argument("--ensure-venv", action="store_true", help="only build the llama.cpp venv and say so")
    ap.add_argument("--cache", default=str(BENCH))
    ap.add_argument("--out", default=str(ROOT / "runs" / "llamacpp_peer.jsonl"))
    args = ap.parse_args()
    ensure_venv()
    build = json.loads(MARKER.read_text())
    if args.ensure_venv:
        print(json.dumps(dict(python=str(venv_python()), version=VERSION, cmake_args=CMAKE_ARGS,
                              build_s=build.get("build_s"), system_info=build["system_info"])))
        return
    if args.quick:
        args.shapes, args.repeats, args.quiet_wait, args.attempts = "tiny", 1, 5, 1
    common = dict(threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  repeats=args.repeats, machine=machine())
    llama_env = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}

    def measured(fn, *a):
        return quietest(lambda: fn(*a), args.quiet_limit, args.attempts, args.quiet_wait)
    rows = []
    for shape in args.shapes.split(","):
        hf_dir = checkpoint(shape, Path(args.cache))
        vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
        prompt = prompt_ids(vocab, args.prompt_tokens)
        shape_rows = []
        for kind in filter(None, args.kinds.split(",")):
            gguf = to_gguf(hf_dir, kind, args.threads)
            log(f"{shape} llama.cpp {kind} ...")
            load = os.getloadavg()[0]
            r = measured(run_llamacpp, gguf, prompt, args.new_tokens, args.threads, args.repeats, 256, llama_env)
            shape_rows.append(dict(
                bench="llamacpp_peer", shape=shape, engine="llama.cpp", format=kind, **common,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()},
                gguf_mib=round(gguf.stat().st_size / 2**20, 1), tensor_types=tensor_types(gguf),
                build=dict(llama_cpp_python=VERSION, cmake_args=CMAKE_ARGS, flash_attn=False, n_ctx=256,
                           mmap=True), env=llama_env, loadavg_before=load, loadavg_after=os.getloadavg()[0]))
            log(f"  {r['ms_per_token']:.1f} ms/token, ttft {r['ttft_ms']:.1f} ms, peak RSS {r['peak_rss_mib']:.0f} MiB,"
                f" others' load {r['others_load']:.2f} cores, {r['attempts']} tries")
        for dtype in filter(None, args.transformers.split(",")):
            log(f"{shape} transformers {dtype} ...")
            load = os.getloadavg()[0]
            r = measured(run_transformers, hf_dir, dtype, prompt, args.new_tokens, args.threads, args.repeats)
            shape_rows.append(dict(
                bench="llamacpp_peer", shape=shape, engine="transformers", format=dtype, **common,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()},
                loadavg_before=load, loadavg_after=os.getloadavg()[0]))
            log(f"  {r['ms_per_token']:.1f} ms/token, ttft {r['ttft_ms']:.1f} ms, peak RSS {r['peak_rss_mib']:.0f} MiB,"
                f" others' load {r['others_load']:.2f} cores, {r['attempts']} tries")
        ref = next((r for r in shape_rows if r["engine"] == "transformers" and r["format"] == "float32"), None)
        for r in shape_rows:
            if ref:
                r["over_transformers_fp32"] = round(r["ms_per_token"] / ref["ms_per_token"], 3)
                r["same_first_tokens_as_transformers_fp32"] = next(
                    (i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"])) if a != b), len(ref["tokens"]))
            print(json.dumps(r), flush=True)
        rows += shape_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    log(f"machine: {machine()}; llama.cpp built with CMAKE_ARGS={CMAKE_ARGS}\n" + markdown(rows))


if __name__ == "__main__":
    main()
