"""Train a small early-exit Llama on Shakespeare: BPE tokenizer + Llama with exit heads, joint loss.

    nice -n 10 .venv/bin/python scripts/train_early_exit_lm.py --out runs/ee_lm            # ~25 min, 2 cores
    .venv/bin/python scripts/train_early_exit_lm.py --out /tmp/t --max-minutes 0.2 --hidden 64 --layers 4 --exits 2

Writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json; loads with
transformers' LlamaForCausalLM) plus exit_heads.safetensors and exits.json (exit layers, val
losses). The last 5% of the corpus (by characters) is the validation split; the tokenizer and
the model never see it. Loss = mean over the exits and the final head of next-token cross-entropy.
Checkpoints (--out/checkpoint/: state.safetensors with model, exit heads and AdamW moments;
state.json with step and elapsed time) are written every --save-every steps and at the end; a rerun
with the same --out resumes from there. The lr follows a cosine over progress = max(step / steps,
elapsed / max-minutes), so a time-limited run still anneals. Medusa heads for a trained model:
scripts/train_medusa_heads.py (the same data pipeline and loop: split_text, batches, fit).
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from split.llama import LlamaConfig
from split.llama.exits import ExitHead, save_exit_heads

ROOT = Path(__file__).resolve().parents[1]

VAL_FRACTION = 0.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "shakespeare.txt"))
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=320)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=864)
    p.add_argument("--exits", default="2,4,6", help="exit heads after these many layers")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--max-minutes", type=float, default=24.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def split_text(path: str) -> tuple[str, str]:
    if not Path(path).is_file():
        raise SystemExit(f"train_early_exit_lm: corpus {path} not found (the project's shared/ folder sits "
                         "beside the repository; pass --data FILE)")
    text = Path(path).read_text(encoding="utf-8")
    cut = int(len(text) * (1 - VAL_FRACTION))
    return text[:cut], text[cut:]


def train_tokenizer(train_text: str, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    file = out / "tokenizer.json"
    if file.is_file():
        return Tokenizer.from_file(str(file))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_text.splitlines(keepends=True), trainer)
    tok.save(str(file))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}) + "\n")
    return tok


def build(args, vocab_size):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=0, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    exits = [int(k) for k in args.exits.split(",")]
    if not all(0 < k < args.layers for k in exits):
        raise SystemExit(f"--exits must lie in 1..{args.layers - 1}, got {exits}")
    heads = torch.nn.ModuleDict({str(k): ExitHead(LlamaConfig.from_hf(cfg.to_dict())) for k in exits})
    for h in heads.values():
        torch.nn.init.normal_(h.proj.weight, std=0.02)
    return model, heads, exits


def losses(model, heads, exits, x, y):
    out = model(input_ids=x, output_hidden_states=True)
    per = {"final": F.cross_entropy(out.logits.flatten(0, 1), y.flatten())}
    for k in exits:  # hidden_states[k] is the output of layer k-1, i.e. after k layers
        per[f"exit{k}"] = F.cross_entropy(heads[str(k)](out.hidden_states[k]).flatten(0, 1), y.flatten())
    return per


def batches(ids: torch.Tensor, context: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=g)
    x = torch.stack([ids[s:s + context] for s in starts])
    y = torch.stack([ids[s + 1:s + context + 1] for s in starts])
    return x, y


@torch.no_grad()
def evaluate(model, heads, exits, ids, context, max_windows=64):
    model.eval()
    sums, n = {}, 0
    for s in range(0, min(len(ids) - 1, max_windows * context), context):
        x, y = ids[s:s + context][None], ids[s + 1:s + context + 1][None]
        x = x[:, : y.shape[1]]
        for name, v in losses(model, heads, exits, x, y).items():
            sums[name] = sums.get(name, 0.0) + float(v) * y.numel()
        n += y.numel()
    model.train()
    return {name: v / n for name, v in sums.items()}


def save_checkpoint(ckpt: Path, modules: dict, opt, step, elapsed):
    """Every parameter of modules {prefix: nn.Module} as {prefix}.{name}, its AdamW moments as
    opt.{prefix}.{name}.*, and state.json with the step and the elapsed seconds."""
    ckpt.mkdir(parents=True, exist_ok=True)
    named = [(f"{prefix}.{n}", p) for prefix, m in modules.items() for n, p in m.named_parameters()]
    tensors = {n: p.detach().contiguous() for n, p in named}
    for n, p in named:
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{n}.exp_avg"] = st["exp_avg"].contiguous()
            tensors[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            tensors[f"opt.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tmp = ckpt / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(ckpt / "state.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed}) + "\n")


def load_checkpoint(ckpt: Path, modules: dict, opt):
    state = load_file(str(ckpt / "state.safetensors"))
    meta = json.loads((ckpt / "state.json").read_text())
    named = [(f"{prefix}.{n}", p) for prefix, m in modules.items() for n, p in m.named_parameters()]
    with torch.no_grad():
        for n, p in named:
            p.copy_(state[n])
    for n, p in named:
        if f"opt.{n}.exp_avg" in state:
            opt.state[p] = {"exp_avg": state[f"opt.{n}.exp_avg"], "exp_avg_sq": state[f"opt.{n}.exp_avg_sq"],
                            "step": state[f"opt.{n}.step"][0].clone()}
    return meta["step"], meta["elapsed_s"]


def fit(modules: dict, loss_fn, train_ids, args, ckpt: Path, log_file: Path, desc: str = "train"):
    """The loop both recipes share: AdamW over the parameters of modules {prefix: nn.Module} that
    require grad (weight decay 0.1 on matrices), lr warmup (100 steps) then a cosine to 0.1x over
    progress = max(step / steps, elapsed / max-minutes), gradients clipped to norm 1, the batch of
    each step seeded by (seed, step), a checkpoint in `ckpt` every --save-every steps and at the end,
    resumed from there. loss_fn(x, y) -> (loss to minimize, {name: tensor} to log, with the shown
    one first). Returns (step, elapsed seconds)."""
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    if (ckpt / "state.json").is_file():
        step, elapsed = load_checkpoint(ckpt, modules, opt)
        print(f"resumed from {ckpt} at step {step} ({elapsed:.0f} s)", flush=True)
    budget = args.max_minutes * 60
    t_start = time.monotonic() - elapsed
    log_file.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=args.steps, initial=step, desc=desc, dynamic_ncols=True)
    with open(log_file, "a") as log:
        while step < args.steps and time.monotonic() - t_start < budget:
            progress = max(step / args.steps, (time.monotonic() - t_start) / budget)
            lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = batches(train_ids, args.context, args.batch, args.seed * 1_000_003 + step)
            loss, per = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{next(iter(per.values())).item():.3f}", lr=f"{lr:.2e}")
            if step % 20 == 0:
                log.write(json.dumps({"step": step, "lr": lr, **{k: v.item() for k, v in per.items()}}) + "\n")
                log.flush()
            if step % args.save_every == 0:
                save_checkpoint(ckpt, modules, opt, step, time.monotonic() - t_start)
    bar.close()
    elapsed = time.monotonic() - t_start
    save_checkpoint(ckpt, modules, opt, step, elapsed)
    return step, elapsed


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, val_text = split_text(args.data)
    tok = train_tokenizer(train_text, args.vocab_size, out)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    val_ids = torch.tensor(tok.encode(val_text).ids, dtype=torch.long)
    model, heads, exits = build(args, tok.get_vocab_size())
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in heads.parameters())
    print(json.dumps({"train_tokens": len(train_ids), "val_tokens": len(val_ids), "params": n_params,
                      "exits": exits}), flush=True)

    def loss_fn(x, y):
        per = losses(model, heads, exits, x, y)
        return sum(per.values()) / len(per), per

    model.train()
    step, elapsed = fit({"model": model, "exit": heads}, loss_fn, train_ids, args, out / "checkpoint",
                        out / "train_log.jsonl")
    val = evaluate(model, heads, exits, val_ids, args.context)
    model.save_pretrained(out, safe_serialization=True)
    save_exit_heads(out, {k: heads[str(k)] for k in exits},
                    {"num_hidden_layers": args.layers, "val_loss": val, "train_steps": step,
                     "train_seconds": round(elapsed, 1), "params": n_params, "val_fraction": VAL_FRACTION})
    print(json.dumps({"step": step, "seconds": round(elapsed, 1), "val_loss": val,
                      "val_ppl": {k: math.exp(v) for k, v in val.items()}}), flush=True)


if __name__ == "__main__":
    main()
