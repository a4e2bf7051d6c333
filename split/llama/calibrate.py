"""Teacher-forced evaluation of an early-exit Llama and the exit-threshold calibration.

    stats = teacher_forced(model_dir, ids, exit_layer=2)              # per-token arrays
    rows = sweep(stats, thresholds=[0.3, 0.5, 0.8], metric="max_prob")
    report = calibrate_threshold(model_dir, ids, max_ppl_increase=0.02, write=True)

A token "exits" when the exit head's confidence >= T; its prediction is then the exit head's,
otherwise the full model's. `exact` catch-up (the cloud ran every state through [k, L)) makes the
cloud's prediction exactly the full model's, so the sweep here is exact-mode quality.
`propagated` quality needs the deeper K/V of exited tokens approximated: teacher_forced(...,
propagated_threshold=T) computes the cloud's logits that way for one T (as the cloud would).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_llama
from .exits import EXITS_JSON, confidence, continue_layers, load_exit_heads, read_exits_json
from .kv_cache import KVCache


@torch.no_grad()
def teacher_forced(model_dir, ids, exit_layer: int | None = None, context: int = 256,
                   propagated_threshold: float | None = None, metric: str = "max_prob", model=None, heads=None) -> dict:
    """Per next-token prediction over `ids` in windows of `context`: the full model's and the exit
    head's log-prob of the true token and argmax, and both confidences. With propagated_threshold,
    `full_*` are the cloud's outputs under propagated catch-up (tokens with confidence >= T exit)."""
    meta = read_exits_json(model_dir)
    k = exit_layer or max(meta["exit_layers"])
    model = model or load_llama(model_dir)
    head = (heads or load_exit_heads(model_dir, [k]))[k]
    L = model.config.num_hidden_layers
    out = {n: [] for n in ("full_logp", "exit_logp", "full_top", "exit_top", "max_prob", "entropy")}
    ids = list(ids)
    for s in range(0, len(ids) - 1, context):
        x = torch.tensor([ids[s:s + context]])
        y = torch.tensor(ids[s + 1:s + context + 1])
        x = x[:, : len(y)]
        hk = model.forward_layers(model.embed(x), 0, k, 0)                # (1, T, C)
        exit_logits = head(hk)[0]                                         # (T, vocab)
        if propagated_threshold is None:
            full_logits = model.head(model.forward_layers(hk, k, L, 0))[0]
        else:  # the exit decision at position t was made from row t: rows that exited only fill K/V
            exited = (confidence(exit_logits, metric) >= propagated_threshold).numpy()
            exited[-1] = False
            rows, idx, _, _ = continue_layers(model, hk, exited, 0, KVCache(), range(k, L))
            full_logits = exit_logits.clone()
            full_logits[idx] = model.head(rows)[0]
        for name, logits in (("full", full_logits), ("exit", exit_logits)):
            logp = F.log_softmax(logits.float(), -1)
            out[f"{name}_logp"].append(logp.gather(1, y[:, None])[:, 0].numpy())
            out[f"{name}_top"].append(logp.argmax(-1).numpy())
        out["max_prob"].append(confidence(exit_logits, "max_prob").numpy())
        out["entropy"].append(confidence(exit_logits, "entropy").numpy())
    return {n: np.concatenate(v) for n, v in out.items()}


def sweep(stats: dict, thresholds, metric: str = "max_prob", reference: dict | None = None) -> list[dict]:
    """Quality vs edge fraction per threshold. `reference` (the full model's stats) is what
    perplexity increase and top-1 agreement are measured against (default: stats itself)."""
    ref = reference or stats
    ppl_full = math.exp(-float(ref["full_logp"].mean()))
    rows = []
    for t in thresholds:
        exit_mask = stats[metric] >= t
        logp = np.where(exit_mask, stats["exit_logp"], stats["full_logp"])
        top = np.where(exit_mask, stats["exit_top"], stats["full_top"])
        ppl = math.exp(-float(logp.mean()))
        rows.append({"threshold": float(t), "edge_fraction": float(exit_mask.mean()), "ppl": ppl,
                     "ppl_full": ppl_full, "ppl_increase": ppl / ppl_full - 1,
                     "top1_agreement": float((top == ref["full_top"]).mean())})
    return rows


def calibrate_threshold(model_dir, ids, metric: str = "max_prob", exit_layer: int | None = None,
                        max_ppl_increase: float | None = 0.02, min_agreement: float | None = None,
                        context: int = 256, write: bool = False) -> dict:
    """The lowest threshold (most tokens at the edge) that meets the target on `ids`; optionally
    written into exits.json under threshold[metric]."""
    if (max_ppl_increase is None) == (min_agreement is None):
        raise ValueError("give exactly one target: max_ppl_increase or min_agreement")
    stats = teacher_forced(model_dir, ids, exit_layer, context)
    candidates = np.unique(np.concatenate([np.linspace(0, 1, 201), np.quantile(stats[metric], np.linspace(0, 1, 101))]))
    rows = sweep(stats, candidates, metric)
    ok = [r for r in rows if (r["ppl_increase"] <= max_ppl_increase if max_ppl_increase is not None
                              else r["top1_agreement"] >= min_agreement)]
    best = min(ok, key=lambda r: r["threshold"]) if ok else rows[-1]
    target = ({"max_ppl_increase": max_ppl_increase} if max_ppl_increase is not None
              else {"min_agreement": min_agreement})
    k = exit_layer or max(read_exits_json(model_dir)["exit_layers"])
    report = {**best, "metric": metric, "exit_layer": k, "target": target, "met": bool(ok),
              "eval_tokens": int(len(stats[metric]))}
    if write:
        file = Path(model_dir) / EXITS_JSON
        meta = json.loads(file.read_text())
        meta.setdefault("threshold", {})[metric] = {"value": best["threshold"], **report}
        file.write_text(json.dumps(meta, indent=2) + "\n")
    return report
