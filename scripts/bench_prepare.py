"""Peak memory of `tp prepare` on a TinyLlama-1.1B-shaped checkpoint, against the sizes it must stay near.

    .venv/bin/python scripts/bench_prepare.py                    # ~3 min on 2 cores, ~2.2 GB of disk
    .venv/bin/python scripts/bench_prepare.py --world-sizes 1,4 --out docs/bench_prepare.jsonl
    .venv/bin/python scripts/bench_prepare.py --world-sizes 1,4 --formats none,int8,int4 --out docs/bench_prepare.jsonl

The checkpoint is what a user downloads: random bf16 weights written by `transformers`
save_pretrained in 1 GB shards (22 layers, hidden 2048, intermediate 5632, 32 heads / 4 KV heads,
vocab 32000; 1.1B parameters), cached under .cache/bench_llm/ (git-ignored). Each prepare runs in a
fresh process that measures itself with devices.telemetry.ResidentSet (baseline after imports,
before any weight is read). One JSON object per row:
  * checkpoint: parameters, bytes on disk, its fp32 size;
  * prepare: world size, weight format (none = as the checkpoint; int8; int4 group 32), seconds,
    peak RSS above baseline, the largest tensor and the largest
    output block it writes, and peak / (largest tensor + largest block): the issue's bound is "near
    the size of the largest tensor plus one output block, never a full fp32 copy of the model".
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)

MAKE = """
import json, sys, torch, transformers
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)                 # initialise in bf16: no fp32 copy of 4.4 GB
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(sys.argv[1]), torch_dtype="bfloat16"))
model.save_pretrained(sys.argv[2], safe_serialization=True, max_shard_size="1GB")
"""

PREPARE = """
import json, sys, time
from pathlib import Path
from devices.telemetry import ResidentSet
from edge_runtime.tp.prepare import prepare
from split.llama.quantize import handler
quantize = None if sys.argv[4] == "none" else handler(sys.argv[4], 32)
rss = ResidentSet()
t0 = time.perf_counter()
prepare(sys.argv[1], int(sys.argv[2]), None, sys.argv[3], progress=False, quantize=quantize)
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak=rss.peak(), baseline=rss.baseline)))
"""


def checkpoint(cache: Path) -> Path:
    path = cache / "1.1B"
    if not (path / "model.safetensors.index.json").is_file():
        print("writing the 1.1B-shaped bf16 checkpoint (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", MAKE, json.dumps(SHAPE), str(path)], check=True)
    return path


def tensor_sizes(folder: Path) -> tuple[int, int]:
    """(parameters, bytes of the largest tensor) of a safetensors checkpoint, from its headers."""
    from safetensors import safe_open
    params = biggest = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                n = 1
                for d in s.get_shape():
                    n *= d
                params += n
                biggest = max(biggest, n * {"BF16": 2, "F16": 2, "F32": 4}[s.get_dtype()])
    return params, biggest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4])
    ap.add_argument("--formats", type=lambda t: t.split(","), default=["none"])
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench_llm"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_prepare.jsonl"))
    args = ap.parse_args()
    model = checkpoint(Path(args.cache))
    rows = []
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    n_params, biggest = tensor_sizes(model)
    rows.append(dict(bench="checkpoint", shape="1.1B", parameters=n_params, disk_mib=round(disk / 2**20, 1),
                     fp32_mib=round(4 * n_params / 2**20, 1), largest_tensor_mib=round(biggest / 2**20, 1)))
    for fmt, world in [(f, w) for f in args.formats for w in args.world_sizes]:
        out = Path(args.cache) / (f"1.1B-shards-w{world}" if fmt == "none" else f"1.1B-shards-{fmt}-w{world}")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PREPARE, str(model), str(world), str(out), fmt], check=True,
                              capture_output=True, text=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        block = max(f.stat().st_size for f in out.rglob("*.safetensors"))
        above = r["peak"] - r["baseline"]
        rows.append(dict(bench="prepare", shape="1.1B", world_size=world, format=fmt, seconds=round(r["seconds"], 1),
                         wall_s=round(time.perf_counter() - t0, 1), peak_rss_mib=round(r["peak"] / 2**20, 1),
                         baseline_rss_mib=round(r["baseline"] / 2**20, 1), above_baseline_mib=round(above / 2**20, 1),
                         largest_tensor_mib=round(biggest / 2**20, 1), largest_block_mib=round(block / 2**20, 1),
                         above_over_tensor_plus_block=round(above / (biggest + block), 2),
                         above_over_fp32_model=round(above / (4 * n_params), 3)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
