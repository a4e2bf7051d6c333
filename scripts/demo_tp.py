"""Tensor-parallel demo: a 3-rank generation on a small random-initialised Llama, window 2.

    .venv/bin/python scripts/demo_tp.py          # or from scripts/demo.py: demo_tp()

Writes a random Llama (8 layers, hidden 256, 8 heads / 4 KV heads, weights 1,1,2) with transformers
once under .cache/demo_tp/, runs `edge-runtime tp generate --world-size 3 --weights 1,1,2
--window 2 --json` (which prepares the shards and starts ranks 1 and 2 on loopback), checks the
tokens against transformers' greedy generate, and prints tokens per second and memory per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "demo_tp"
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def _checkpoint() -> Path:
    path = CACHE / "llama-8L-256"
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                                   max_position_embeddings=512, initializer_range=0.1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _reference(path: Path, n: int) -> list[int]:
    import torch
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                           eos_token_id=[], pad_token_id=0)[0, len(PROMPT):].tolist()


def demo_tp(max_new_tokens: int = 24, world_size: int = 3, window: int = 2) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = _checkpoint()
    weights = ["--weights", "1,1,2"] if world_size == 3 else []
    cmd = [sys.executable, "-m", "edge_runtime.cli", "tp", "generate", "--model", str(path),
           "--world-size", str(world_size), *weights, "--prompt-ids", ",".join(map(str, PROMPT)),
           "--max-new-tokens", str(max_new_tokens), "--ignore-eos", "--window", str(window),
           "--cache-dir", str(CACHE / "shards"), "--json"]
    print(f"tp demo: {world_size} ranks on loopback, window {window} blocks per rank, "
          f"{max_new_tokens} tokens greedy\n  $ edge-runtime tp generate --model {path.relative_to(ROOT)} "
          f"--world-size {world_size} --window {window} ...", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"tp generate failed:\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    same = r["token_ids"] == _reference(path, max_new_tokens)
    lat = r["token_latencies_s"]
    print(f"  tokens: {r['token_ids']}")
    print(f"  same tokens as transformers' generate: {same}")
    print(f"  {r['tokens_per_s']:.1f} tokens/s, first token after {1e3 * r['time_to_first_token_s']:.0f} ms, "
          f"{1e3 * sum(lat) / len(lat):.1f} ms per decode step")
    for rank, (peak, base, sent) in enumerate(zip(r["peak_rss_bytes"], r["baseline_rss_bytes"], r["bytes_sent"])):
        print(f"  rank {rank}: KV heads {r['kv_heads'][rank]}, MLP columns {r['mlp'][rank]}, peak RSS "
              f"{peak / 2**20:.0f} MiB ({(peak - base) / 2**20:.1f} MiB above its baseline), "
              f"sent {sent / 1024:.0f} KiB, at most {r['pager'][rank]['max_resident']} blocks resident")
    if not same:
        raise RuntimeError("tensor-parallel tokens differ from transformers")
    return r


if __name__ == "__main__":
    demo_tp()
