"""Train Medusa heads (split/llama/medusa.py) on a frozen early-exit LM from train_early_exit_lm.py:
K heads on the exit layer k that guess tokens t+2..t+1+K, written beside exit_heads.safetensors.

    nice -n 5 .venv/bin/python scripts/train_medusa_heads.py --model runs/ee_lm --exit-layer 6 --max-minutes 10
    .venv/bin/python scripts/train_medusa_heads.py --model /tmp/t --exit-layer 2 --steps 20 --threads 1

A sibling of train_early_exit_lm.py rather than a flag of it: that script builds and trains a whole
LM, this one loads a trained one, freezes it (the exit heads too) and trains other parameters. Both
share one data pipeline and one loop (train_early_exit_lm.split_text / batches / fit: the same
held-out last 5% of the corpus, never trained on; seeded batches per step; AdamW, warmup + cosine lr;
checkpoint and resume), and the model folder's tokenizer. Loss = sum over heads i = 1..K of
0.8^i x the cross-entropy of head i's guess at position t against the token at t+1+i (the paper's
weighting). The checkpoint (heads + AdamW moments + step) lives in
--model/checkpoint/medusa_k{k}_{K}heads/, written every --save-every steps and at the end; a rerun
with the same arguments resumes from it. At the end: medusa_heads.safetensors and medusa.json
(heads of other exit layers are kept) with the teacher-forced greedy acceptance per head on the
held-out split (medusa.acceptance), printed as one JSON line.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from train_early_exit_lm import VAL_FRACTION, fit, split_text  # the sibling script (scripts/ is sys.path[0])

from split.llama import load_llama
from split.llama.exits import load_exit_heads
from split.llama.medusa import MedusaHeads, acceptance, save_medusa_heads

ROOT = Path(__file__).resolve().parents[1]

DECAY = 0.8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a folder written by train_early_exit_lm.py")
    p.add_argument("--exit-layer", type=int, required=True, help="k: the exit head the Medusa heads sit beside")
    p.add_argument("--medusa-heads", type=int, default=4, help="K: heads guessing t+2..t+1+K")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "shakespeare.txt"))
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def medusa_losses(model, medusa: MedusaHeads, x, y) -> dict:
    """{"head{i}": cross-entropy of head i at t against y[t + i] (the token at t+1+i)}."""
    with torch.no_grad():  # the backbone and the exit norm are frozen
        h = medusa.exit_head.norm(model.forward_layers(model.embed(x), 0, medusa.exit_layer, 0))  # (B, T, C)
    T = x.shape[1]
    return {f"head{i}": F.cross_entropy(head(h[:, :T - i]).flatten(0, 1), y[:, i:].flatten())
            for i, head in enumerate(medusa.heads, 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, k, K = Path(args.model), args.exit_layer, args.medusa_heads
    if not (out / "tokenizer.json").is_file():
        raise SystemExit(f"train_medusa_heads: {out} has no tokenizer.json (train the LM with train_early_exit_lm.py)")
    if not 0 < K < args.context:
        raise SystemExit(f"--medusa-heads must lie in 1..{args.context - 1}, got {K}")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train_text, val_text = split_text(args.data)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    val_ids = torch.tensor(tok.encode(val_text).ids, dtype=torch.long)
    model = load_llama(out).eval().requires_grad_(False)
    try:
        exit_head = load_exit_heads(out, [k])[k]
    except ValueError as e:
        raise SystemExit(f"train_medusa_heads: --exit-layer: {e}")
    medusa = MedusaHeads.from_exit_head(exit_head, K, k)
    print(json.dumps({"train_tokens": len(train_ids), "val_tokens": len(val_ids), "exit_layer": k, "medusa_heads": K,
                      "params": sum(p.numel() for p in medusa.heads.parameters())}), flush=True)

    def loss_fn(x, y):
        per = medusa_losses(model, medusa, x, y)
        return sum(DECAY ** i * loss for i, loss in enumerate(per.values(), 1)), per

    ckpt = out / "checkpoint" / f"medusa_k{k}_{K}heads"
    step, elapsed = fit({"medusa": medusa.heads}, loss_fn, train_ids, args, ckpt, ckpt / "train_log.jsonl",
                        desc=f"medusa k={k}")
    medusa.eval()
    stats = acceptance(model, medusa, val_ids, args.context)
    summary = {"train_steps": step, "train_seconds": round(elapsed, 1), "val_fraction": VAL_FRACTION,
               "acceptance": stats}
    save_medusa_heads(out, medusa, summary)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
