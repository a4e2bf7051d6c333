"""Issue 22, GGUF: `tp prepare` time and peak memory for the 1.1B shape's q4_0 GGUF against its Hugging Face folder.

    .venv/bin/python scripts/bench_gguf.py --rounds 3 --out docs/bench_gguf.jsonl  # docs/: ~2 min on 2 cores, 1.4 GB of disk at most
    .venv/bin/python scripts/bench_gguf.py --world-sizes 1                          # 2 rounds, world size 1
    .venv/bin/python scripts/bench_gguf.py --model .cache/bench_llm/tiny --cache /tmp/bg --out /tmp/bg.jsonl  # smoke

The checkpoint is bench_prepare.py's: TinyLlama-1.1B-shaped random bf16 weights written by transformers
(.cache/bench_llm/1.1B, made once if missing). It is written once as a q4_0 GGUF with the `gguf` package
(scripts/gguf_write.py: gguf.GGUFWriter streaming one tensor at a time, gguf.quants.quantize, llama.cpp's
tensor names and q/k row permutation) at <cache>/gguf/<shape>-q4_0.gguf, as llama.cpp's q4_0 does except
for the LM head: projections and token_embd Q4_0, norms F32, output.weight Q8_0 (--output-type; llama.cpp
writes Q6_K there, which the gguf package cannot quantize). Tokenizer metadata: the checkpoint's
tokenizer.json if it has one, else a minimal byte-level ("gpt2") BPE vocabulary of vocab_size tokens
(gguf_write.minimal_gpt2_vocab). Writing it is timed and measured in its own process, one row, since users
download this file rather than write it (kept in <file>.json beside it and repeated when the file is reused).

Then, alternating GGUF / HF, --rounds rounds per world size, each in a fresh process that measures itself
as bench_prepare.py does (devices.telemetry.ResidentSet: baseline after the imports, before any weight is
read; the GGUF path's modules imported before the baseline for both), `edge-runtime tp prepare` through
edge_runtime.cli.main:

    tp prepare --model <gguf> --world-size W --quantize int4 --group-size 32 --out DIR   (model folder + prepare)
    tp prepare --model <HF folder> --world-size W --quantize int4 --group-size 32 --out DIR

with EDGEFOLD_CACHE under <cache>/gguf/edgefold and the GGUF's cached model folder deleted before every
GGUF run, so each one makes it (edge_runtime.tp.gguf_source.model_folder: reads the file's header and
tokenizer, writes config / tokenizer files and the tensor index, no weights) and prepares, reading every
tensor straight from the .gguf (the Q4_0 projections' integers as they are). The machine is shared: each
run records the cores other processes used during it (from /proc/stat, less the child's own CPU time) and
the load average.

Each run's shards are measured and deleted (disk), all kept with --keep. --quantize int8 (per-channel int8:
every weight requantized from the dequantized floats) or none (float32 shards, every tensor dequantized;
4.2 GB for the 1.1B shape) instead of int4 group 32; the run rows say which ("quantize").

Output: one JSON object per row on stdout and in --out (JSON lines), progress on stderr. Rows (bench "gguf"):
  * kind "machine": CPU, cores, memory, package versions, date;
  * kind "checkpoint": the HF folder's parameters and safetensors bytes;
  * kind "write_gguf": the GGUF's bytes, tensor types, output type, tokenizer source, and writing it: seconds,
    peak RSS above baseline (cached: whether it was written by an earlier run);
  * kind "run": one per prepare: source (gguf | hf), world size, round, seconds (in the child, from before
    model_folder to the end), wall_s (the subprocess), above_baseline_mib; GGUF: folder_s (model_folder) and
    the peak above baseline by its end (folder_above_mib), folder_kib (the cached model folder), q4_0_kept
    (prepare said the Q4_0 projections were taken as stored); out_mib (shards written), written_mib (shards +
    model folder); others_cores, loadavg;
  * kind "median": per source and world size, the medians over the rounds (and the GGUF's model_folder share
    of the time);
  * kind "ratio": per world size, GGUF / HF of the median seconds, peak above baseline and bytes written.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
MIB = 2**20

WRITE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import numpy, torch, safetensors, tqdm, gguf, gguf.quants   # imported before the baseline
from devices.telemetry import ResidentSet
import gguf_write
from gguf import GGMLQuantizationType as Q
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = json.loads((folder / "config.json").read_text())
if (folder / "tokenizer.json").is_file():
    tok, source = gguf_write.vocab_from_tokenizer_json(folder / "tokenizer.json"), "tokenizer.json"
else:
    tok, source = gguf_write.minimal_gpt2_vocab(cfg["vocab_size"]), "minimal gpt2 vocabulary"
arch = {"llama": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
rss = ResidentSet()
t0 = time.perf_counter()
types = gguf_write.write_gguf(out, arch, cfg, gguf_write.from_safetensors(folder), Q.Q4_0, tokenizer=tok,
                              types={"token_embd.weight": Q.Q4_0, "output.weight": Q[sys.argv[3]]},
                              name=folder.name, keep=False, progress=True)
seconds = time.perf_counter() - t0
counts = {}
for t in types.values():
    counts[t.name] = counts.get(t.name, 0) + 1
print(json.dumps(dict(seconds=seconds, peak=rss.peak(), baseline=rss.baseline, types=counts, tokenizer=source,
                      output_type=sys.argv[3], n_tokens=len(tok["tokens"]))))
"""

PREPARE = """
import json, sys, time
import numpy, torch, safetensors.torch, tqdm, gguf, gguf.quants   # imported before the baseline, for both
from devices.telemetry import ResidentSet
from edge_runtime import cli
from edge_runtime.tp import gguf_source, prepare as _prepare
import split.llama.gguf_checkpoint, split.llama.quantize
conv = {}
model_folder = gguf_source.model_folder
def timed(*a, **k):
    t = time.perf_counter()
    folder = model_folder(*a, **k)
    conv.update(folder_s=time.perf_counter() - t, folder_peak=rss.peak())
    return folder
gguf_source.model_folder = timed      # cli._prepare imports it from the module when called
rss = ResidentSet()
t0 = time.perf_counter()
rc = cli.main(["tp", "prepare", "--model", sys.argv[1], "--world-size", sys.argv[2], "--out", sys.argv[3], *sys.argv[4:]])
print(json.dumps(dict(rc=rc, seconds=time.perf_counter() - t0, peak=rss.peak(), baseline=rss.baseline, **conv)))
"""


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def cpu_busy() -> float:
    """Seconds of CPU time all processes have used so far (/proc/stat: every state but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def child(code: str, args: list[str], env: dict | None = None, capture_err: bool = True) -> tuple[dict, dict]:
    """Run `code` in a fresh interpreter; its last stdout line as JSON, and the run's wall time / others' cores."""
    busy, own = cpu_busy(), os.times()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if capture_err else None, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    child_cpu = (after.children_user - own.children_user) + (after.children_system - own.children_system)
    if done.returncode != 0:
        sys.stderr.write(done.stderr or "")
        raise SystemExit(f"child failed ({done.returncode}): {args}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    r["stderr"] = done.stderr or ""
    return r, dict(wall_s=round(wall, 1), others_cores=round(max(0.0, cpu_busy() - busy - child_cpu) / wall, 2),
                   loadavg=[round(x, 2) for x in os.getloadavg()])


def machine() -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    from importlib.metadata import version
    return dict(bench="gguf", kind="machine", cpu=cpu, cores=os.cpu_count(), memory_gib=round(mem / 2**20, 1),
                python=platform.python_version(), torch=torch.__version__, gguf=version("gguf"),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), loadavg=[round(x, 2) for x in os.getloadavg()])


def write_once(model: Path, path: Path, output_type: str) -> dict:
    info = path.with_name(path.name + ".json")
    if path.is_file() and info.is_file():
        r = json.loads(info.read_text())
        r["cached"] = True
        return r
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    print(f"writing {path} with the gguf package (once) ...", file=sys.stderr)
    r, run = child(WRITE, [str(model), str(tmp), output_type, str(SCRIPTS)], capture_err=False)
    tmp.rename(path)
    r.pop("stderr")
    r = dict(bench="gguf", kind="write_gguf", file=str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
             gguf_mib=round(path.stat().st_size / MIB, 1), types=r["types"], output_type=r["output_type"],
             tokenizer=r["tokenizer"], n_tokens=r["n_tokens"], seconds=round(r["seconds"], 1), **run,
             above_baseline_mib=round((r["peak"] - r["baseline"]) / MIB, 1),
             baseline_rss_mib=round(r["baseline"] / MIB, 1), written_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    info.write_text(json.dumps(r))
    r["cached"] = False
    return r


QUANTIZE = {"int4": ["--quantize", "int4", "--group-size", "32"], "int8": ["--quantize", "int8"], "none": []}


def prepare_once(source: str, model: Path, world: int, work: Path, rnd: int, keep: bool, quantize: str) -> dict:
    edgefold_cache = work / "edgefold"
    folder_root = edgefold_cache / "tp-shards" / "gguf"
    out = work / f"prepare-{source}-w{world}"
    shutil.rmtree(out, ignore_errors=True)
    if source == "gguf":
        shutil.rmtree(folder_root, ignore_errors=True)  # made again by every GGUF run
    env = dict(os.environ, EDGEFOLD_CACHE=str(edgefold_cache), HF_HUB_OFFLINE="1")
    r, run = child(PREPARE, [str(model), str(world), str(out), *QUANTIZE[quantize]], env=env)
    assert r["rc"] == 0, r
    row = dict(bench="gguf", kind="run", source=source, quantize=quantize, world_size=world, round=rnd,
               seconds=round(r["seconds"], 1),
               wall_s=run["wall_s"], above_baseline_mib=round((r["peak"] - r["baseline"]) / MIB, 1),
               baseline_rss_mib=round(r["baseline"] / MIB, 1))
    out_bytes = du(out)
    row["out_mib"] = round(out_bytes / MIB, 1)
    written = out_bytes
    if not keep:
        shutil.rmtree(out)
    if source == "gguf":
        folder = du(folder_root)
        written += folder
        row.update(folder_s=round(r["folder_s"], 2), folder_share=round(r["folder_s"] / r["seconds"], 2),
                   folder_above_mib=round((r["folder_peak"] - r["baseline"]) / MIB, 1),
                   folder_kib=round(folder / 1024, 1), q4_0_kept="int4-g32 weights taken as stored" in r["stderr"])
    row["written_mib"] = round(written / MIB, 1)
    row.update(others_cores=run["others_cores"], loadavg=run["loadavg"])
    return row


def median_row(rows: list[dict]) -> dict:
    m = lambda k: round(statistics.median(r[k] for r in rows), 1)  # noqa: E731
    row = dict(bench="gguf", kind="median", source=rows[0]["source"], quantize=rows[0]["quantize"],
               world_size=rows[0]["world_size"],
               rounds=len(rows), seconds=m("seconds"), seconds_each=[r["seconds"] for r in rows], wall_s=m("wall_s"),
               above_baseline_mib=m("above_baseline_mib"), above_each=[r["above_baseline_mib"] for r in rows],
               out_mib=m("out_mib"), written_mib=m("written_mib"), others_cores_max=max(r["others_cores"] for r in rows))
    if row["source"] == "gguf":
        row.update(folder_s=round(statistics.median(r["folder_s"] for r in rows), 2),
                   folder_share=round(statistics.median(r["folder_share"] for r in rows), 2),
                   prepare_after_folder_s=round(m("seconds") - m("folder_s"), 1),
                   folder_above_mib=m("folder_above_mib"), folder_kib=m("folder_kib"),
                   q4_0_kept=all(r["q4_0_kept"] for r in rows))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: <cache>/1.1B, written once if missing)")
    ap.add_argument("--world-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output-type", default="Q8_0", choices=["Q8_0", "F16"], help="output.weight's GGUF type")
    ap.add_argument("--quantize", default="int4", choices=list(QUANTIZE),
                    help="the shards' format: int4 (group 32, the q4_0 integers kept), int8 or none (float32)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench_llm"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_gguf.jsonl"))
    ap.add_argument("--keep", action="store_true", help="keep every run's shards and the model folder (GBs)")
    args = ap.parse_args()
    cache = Path(args.cache).resolve()
    if args.model:
        model = Path(args.model).resolve()
    else:
        sys.path.insert(0, str(SCRIPTS))
        from bench_prepare import checkpoint
        model = checkpoint(cache)
    work = cache / "gguf"
    rows = [machine()]

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(json.dumps(rows[0]), flush=True)
    from bench_prepare import tensor_sizes  # (scripts/ is on sys.path when run by path)
    n_params, _ = tensor_sizes(model)
    emit(dict(bench="gguf", kind="checkpoint", model=str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
              parameters=n_params, safetensors_mib=round(sum(f.stat().st_size for f in model.glob("*.safetensors")) / MIB, 1),
              tokenizer_json=(model / "tokenizer.json").is_file()))
    gguf_path = work / f"{model.name}-q4_0.gguf"
    emit(write_once(model, gguf_path, args.output_type))
    runs = {}
    for world in args.world_sizes:
        for rnd in range(args.rounds):
            for source in ("gguf", "hf") if rnd % 2 == 0 else ("hf", "gguf"):
                print(f"prepare {source} world {world} round {rnd + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                row = prepare_once(source, gguf_path if source == "gguf" else model, world, work, rnd + 1, args.keep,
                                   args.quantize)
                runs.setdefault((source, world), []).append(row)
                emit(row)
    medians = {}
    for key, rs in runs.items():
        medians[key] = median_row(rs)
        emit(medians[key])
    for world in args.world_sizes:
        g, h = medians[("gguf", world)], medians[("hf", world)]
        emit(dict(bench="gguf", kind="ratio", world_size=world, gguf_over_hf_seconds=round(g["seconds"] / h["seconds"], 2),
                  gguf_over_hf_above_baseline=round(g["above_baseline_mib"] / h["above_baseline_mib"], 2),
                  gguf_over_hf_written=round(g["written_mib"] / h["written_mib"], 2),
                  gguf_prepare_after_folder_over_hf_seconds=round(g["prepare_after_folder_s"] / h["seconds"], 2)))
    if not args.keep:  # the GGUF file (and its .json) stay: they are the cache
        for d in [work / "edgefold", *work.glob("prepare-*-w*")]:
            shutil.rmtree(d, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
