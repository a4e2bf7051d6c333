"""Held-out quality of weight-only int8 / int4 quantization (split/llama/quantize.py) on a trained LM.

    .venv/bin/python scripts/eval_quantized_lm.py --model runs/ee_lm_q --out runs/eval_quantized_lm.jsonl \\
        --plot runs/eval_quantized_lm.png [--variants all]       # ~3 min on 2 cores; all: ~25 min

--model is a folder written by scripts/train_early_exit_lm.py (its tokenizer.json; the held-out split
is the last `val_fraction` of the corpus as recorded in its exits.json, never trained on). Every
variant is teacher-forced over the held-out tokens in non-overlapping windows of --context tokens
(the training context), and prints one JSON object: perplexity, its ratio to the fp32 model and the
increase in percent, top-1 agreement with the fp32 model's next-token choice, bytes of the linear
weights as stored, and the target (int8 <= +0.5%, int4 group 32 <= +3% perplexity) where one applies.
The fp32 model (the baseline) is evaluated in the same run. Variants: fp32, bf16 (the float weights
and activations in bf16, for scale), int8 and int4 with group 32 / 64 / 128 on the default bf16
activations, and int8 / int4-g32 with the LM head quantized too; `--variants all` adds int8 / int4-g32
with fp32 activations (weight rounding alone, on the kernels' slow fp32 path: 14x and 40x slower).
The embeddings are never quantized.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from split.llama import load_llama
from split.llama.quantize import linears, quantize_model, quantized_state_dict

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {("int8", None): 0.005, ("int4", 32): 0.03}  # max perplexity increase, from issue 12
# (name, scheme, group, head, compute dtype); scheme None = the float model in that dtype
SLOW = ("int8 fp32-act", "int4-g32 fp32-act")  # only with --variants all (or named)
VARIANTS = [
    ("fp32", None, None, False, torch.float32),
    ("bf16", None, None, False, torch.bfloat16),
    ("int8", "int8", None, False, torch.bfloat16),
    ("int4-g32", "int4", 32, False, torch.bfloat16),
    ("int4-g64", "int4", 64, False, torch.bfloat16),
    ("int4-g128", "int4", 128, False, torch.bfloat16),
    ("int8 fp32-act", "int8", None, False, torch.float32),
    ("int4-g32 fp32-act", "int4", 32, False, torch.float32),
    ("int8 +head", "int8", None, True, torch.bfloat16),
    ("int4-g32 +head", "int4", 32, True, torch.bfloat16),
]


def heldout_ids(model_dir: Path, data: str) -> torch.Tensor:
    from tokenizers import Tokenizer
    meta = json.loads((model_dir / "exits.json").read_text()) if (model_dir / "exits.json").is_file() else {}
    frac = meta.get("val_fraction", 0.05)
    if not Path(data).is_file():
        sys.exit(f"eval_quantized_lm: corpus {data} not found (pass --data FILE)")
    text = Path(data).read_text(encoding="utf-8")
    val = text[int(len(text) * (1 - frac)):]
    return torch.tensor(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(val).ids, dtype=torch.long)


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, context: int, batch: int):
    """Next-token NLL summed over all targets, and the argmax per target (N,), over windows of `context`."""
    n_win = (len(ids) - 1) // context
    x = ids[: n_win * context].view(n_win, context)  # (W, T)
    y = ids[1: n_win * context + 1].view(n_win, context)
    nll, top = 0.0, []
    for s in range(0, n_win, batch):
        logits = model(x[s:s + batch]).float()  # (b, T, vocab)
        nll += F.cross_entropy(logits.flatten(0, 1), y[s:s + batch].flatten(), reduction="sum").item()
        top.append(logits.argmax(-1).flatten())
    return nll, torch.cat(top), y.numel()


def linear_bytes(model, scheme, group, head) -> int:
    if scheme is None:
        return sum(m.weight.numel() * m.weight.element_size() for _, m in linears(model, head=True))
    q = quantized_state_dict(model, scheme, group or 32, head=head)
    names = {n for n, _ in linears(model, head=True)}
    return sum(t.numel() * t.element_size() for k, t in q.items()
               if k.rpartition(".")[0] in names and not k.endswith(".bias"))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["variant"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(names, [r["ppl_increase_pct"] for r in rows], color="tab:blue")
    a.set_ylabel("held-out perplexity increase vs fp32 (%)")
    b.bar(names, [100 * r["top1_agreement"] for r in rows], color="tab:green")
    b.set_ylabel("top-1 agreement with fp32 (%)")
    b.set_ylim(min(100 * r["top1_agreement"] for r in rows) - 2, 100.5)
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(f"weight-only quantization, {rows[0]['model']}, {rows[0]['tokens']} held-out tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "ee_lm_q"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "shakespeare.txt"))
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=0, help="use only the first N held-out tokens (0: all)")
    p.add_argument("--variants", default="", help="'all', or a comma-separated subset of: "
                   + ", ".join(v[0] for v in VARIANTS) + " (default: all but " + ", ".join(SLOW) + ")")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also append the rows to this .jsonl file")
    p.add_argument("--plot", default=None, help="write a PNG here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    ids = heldout_ids(model_dir, args.data)
    if args.max_tokens:
        ids = ids[: args.max_tokens + 1]
    names = [v[0] for v in VARIANTS]
    wanted = (set(names) if args.variants == "all" else set(args.variants.split(",")) if args.variants
              else set(names) - set(SLOW))
    if wanted - set(names):
        sys.exit(f"eval_quantized_lm: unknown --variants {sorted(wanted - set(names))}; choose from {names}")
    variants = [v for v in VARIANTS if v[0] == "fp32" or v[0] in wanted]

    rows, ref_ppl, ref_top = [], None, None
    for name, scheme, group, head, dtype in variants:
        model = load_llama(model_dir)
        nbytes = linear_bytes(model, scheme, group, head)
        if scheme is None:
            model = model.to(dtype)
        else:
            quantize_model(model, scheme, group or 32, head=head, compute_dtype=dtype)
        t0 = time.perf_counter()
        nll, top, n = teacher_forced(model, ids, args.context, args.batch)
        ppl = math.exp(nll / n)
        if ref_ppl is None:
            ref_ppl, ref_top = ppl, top
        row = {"kind": "quality", "model": model_dir.name, "variant": name, "scheme": scheme or name,
               "group_size": group, "lm_head_quantized": head, "activations": str(dtype).removeprefix("torch."),
               "tokens": n, "ppl": round(ppl, 4), "ppl_ratio": round(ppl / ref_ppl, 5),
               "ppl_increase_pct": round(100 * (ppl / ref_ppl - 1), 3),
               "top1_agreement": round((top == ref_top).float().mean().item(), 5),
               "linear_weight_bytes": nbytes, "eval_seconds": round(time.perf_counter() - t0, 1),
               "baseline": "fp32, same run"}
        target = TARGETS.get((scheme, group)) if not head and dtype == torch.bfloat16 else None
        if target is not None:
            row.update(target_pct=100 * target, meets_target=ppl / ref_ppl - 1 <= target)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
