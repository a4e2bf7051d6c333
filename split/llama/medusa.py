"""Medusa heads on the device's exit layer (Cai et al. 2024, Medusa-1): K heads that guess tokens
t+2..t+1+K from the same layer-k hidden state at position t from which the exit head predicts t+1.

    medusa = load_medusa_heads("path/to/folder", k=4)     # the exit head after layer 4 + its K heads
    d = medusa.draft(h_last, n=3)                          # h_last: (C,) layer-k state of the last fed token
    d.ids, d.probs, d.dists                                # m = min(n, K+1) ids; (m,) their probs; (m, vocab)
    stats = acceptance(model, medusa, held_out_ids)        # teacher-forced agreement per head

Head i (1..K) is x + SiLU(res_i(x)) -> proj_i, on x = the exit head's norm of h (the paper's heads
sit on the base model's normed last state): res_i starts at zero and proj_i as a copy of the exit
head's projection (the paper copies the base LM head), so an untrained head repeats the exit head.
The exit head is frozen and shared; only res_i and proj_i are the Medusa heads' own.

Drafter contract (what speculative decoding plugs in): `draft(h_last, n, sampling=None, gen=None)`
proposes ids[j] for position t+1+j, j = 0 from the exit head, j = i from Medusa head i, with
len(ids) = min(n, K+1). dists[j] (vocab,) is the distribution ids[j] was drawn from, i.e. the q of
speculative sampling (accept with min(1, p[ids[j]] / dists[j][ids[j]])): greedy (sampling None or
temperature 0) takes the argmax, so dists[j] is one-hot; sampling draws from the head's softmax after
`sampling`'s temperature / top-k / top-p (split.llama.sampling.distribution; no repetition penalty:
the heads see no history). probs[j] is the head's own softmax probability of ids[j] (its confidence,
at temperature 1). Medusa-1 heads never see the tokens they follow, so a draft is a chain of guesses:
position j counts only if 0..j-1 were accepted.

A model folder with Medusa heads holds, beside exit_heads.safetensors:
    medusa.json                {"hidden_size": C, "vocab_size": V, "heads": {"4": {"num_heads": K, ...}}}
    medusa_heads.safetensors   medusa.{k}.{i}.res.weight (C, C), .res.bias (C,), .proj.weight (V, C), i = 1..K
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .exits import ExitHead, load_exit_heads
from .sampling import Sampling, distribution

MEDUSA_JSON = "medusa.json"
MEDUSA_FILE = "medusa_heads.safetensors"


class MedusaHead(nn.Module):
    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.res = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) normed -> (..., vocab)
        return self.proj(x + F.silu(self.res(x)))


@dataclass
class Draft:
    ids: list[int]          # m proposed ids, for positions t+1 .. t+m
    probs: list[float]      # each head's own probability of its id (softmax at temperature 1)
    dists: torch.Tensor     # (m, vocab) float32: the distribution each id was drawn from


class MedusaHeads(nn.Module):
    def __init__(self, exit_head: ExitHead, num_heads: int, exit_layer: int):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.exit_layer = exit_layer
        self.exit_head = exit_head.requires_grad_(False)  # norm + the t+1 projection, frozen
        vocab, hidden = exit_head.proj.weight.shape
        self.heads = nn.ModuleList(MedusaHead(hidden, vocab) for _ in range(num_heads))  # heads[i-1]: t+1+i

    @classmethod
    def from_exit_head(cls, exit_head: ExitHead, num_heads: int, exit_layer: int) -> "MedusaHeads":
        """Fresh heads as the paper initializes them: res = 0, proj = the exit head's projection."""
        medusa = cls(exit_head, num_heads, exit_layer)
        with torch.no_grad():
            for head in medusa.heads:
                head.res.weight.zero_()
                head.res.bias.zero_()
                head.proj.weight.copy_(exit_head.proj.weight)
        return medusa

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) layer-k states -> (B, T, 1+K, vocab): [..., 0, :] the exit head's logits for t+1,
        [..., i, :] head i's for t+1+i."""
        x = self.exit_head.norm(hidden)  # (B, T, C)
        logits = [self.exit_head.proj(x)] + [head(x) for head in self.heads]
        return torch.stack(logits, dim=-2)

    @torch.no_grad()
    def draft(self, h_last: torch.Tensor, n: int, sampling: Sampling | None = None,
              gen: torch.Generator | None = None) -> Draft:
        """Up to n ids for t+1.. from h_last, the (C,) (or (1, C), (1, 1, C)) layer-k state at t."""
        C = self.exit_head.proj.in_features
        if h_last.numel() != C:
            raise ValueError(f"h_last must hold one layer-{self.exit_layer} state of {C} values, "
                             f"got shape {tuple(h_last.shape)}")
        if n < 1:
            raise ValueError(f"n (draft length) must be >= 1, got {n}")
        m = min(n, 1 + self.num_heads)
        x = self.exit_head.norm(h_last.reshape(1, C).to(self.exit_head.proj.weight.dtype))  # (1, C)
        logits = torch.cat([self.exit_head.proj(x)] + [head(x) for head in self.heads[:m - 1]]).float()  # (m, vocab)
        sampling = sampling or Sampling()
        dists = torch.stack([distribution(row, sampling) for row in logits])  # (m, vocab)
        if sampling.greedy:
            ids = logits.argmax(-1)  # (m,)
        else:
            ids = torch.multinomial(dists, 1, generator=gen)[:, 0]
        probs = logits.softmax(-1).gather(1, ids[:, None])[:, 0]
        return Draft(ids.tolist(), probs.tolist(), dists)


def agreement(drafts: np.ndarray, full_top: np.ndarray) -> dict:
    """drafts (T, 1+K): row t's proposals for t+1..t+1+K; full_top (T,): the full model's argmax at
    each position (its greedy guess for t+1, given the text up to t). Counts positions t whose whole
    draft lies inside the window (t + K < T): 'agree'[j] draft j equals full_top[t+j]; 'chain'[j]
    drafts 0..j all do; 'medusa_chain'[i-1] Medusa drafts 1..i all do (t+1 already decided)."""
    T, width = drafts.shape
    n = T - width + 1
    if n <= 0:
        return {"positions": 0, "agree": np.zeros(width), "chain": np.zeros(width), "medusa_chain": np.zeros(width - 1)}
    hit = np.stack([drafts[:n, j] == full_top[j:j + n] for j in range(width)], axis=1)  # (n, 1+K)
    return {"positions": n, "agree": hit.sum(0), "chain": np.cumprod(hit, axis=1).sum(0),
            "medusa_chain": np.cumprod(hit[:, 1:], axis=1).sum(0)}


@torch.no_grad()
def acceptance(model, medusa: MedusaHeads, ids, context: int = 256) -> dict:
    """Teacher-forced greedy acceptance on `ids` (windows of `context`): fractions per drafted
    position as in `agreement`, plus the expected accepted drafts per verification call when the
    device drafts all 1+K ('accepted_per_draft' = sum of 'chain') and, with t+1 known, Medusa's
    acceptance length ('medusa_accept_length' = 1 + sum of 'medusa_chain')."""
    k, L = medusa.exit_layer, model.config.num_hidden_layers
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    sums = None
    for s in range(0, len(ids) - 1, context):
        x = ids[s:s + context][None]  # (1, T)
        hk = model.forward_layers(model.embed(x), 0, k, 0)  # (1, T, C)
        full_top = model.head(model.forward_layers(hk, k, L, 0))[0].argmax(-1)  # (T,)
        drafts = medusa(hk)[0].argmax(-1)  # (T, 1+K)
        counts = agreement(drafts.numpy(), full_top.numpy())
        sums = counts if sums is None else {name: sums[name] + v for name, v in counts.items()}
    n = max(sums["positions"], 1)
    chain, medusa_chain = sums["chain"] / n, sums["medusa_chain"] / n
    return {"exit_layer": k, "num_heads": medusa.num_heads, "positions": int(sums["positions"]),
            "agree": (sums["agree"] / n).tolist(), "chain": chain.tolist(), "medusa_chain": medusa_chain.tolist(),
            "accepted_per_draft": float(chain.sum()), "medusa_accept_length": float(1 + medusa_chain.sum())}


def read_medusa_json(path: str | Path) -> dict:
    file = Path(path) / MEDUSA_JSON
    if not file.is_file():
        raise FileNotFoundError(f"no {MEDUSA_JSON} in {path} (train Medusa heads with scripts/train_medusa_heads.py)")
    return json.loads(file.read_text())


def save_medusa_heads(path: str | Path, medusa: MedusaHeads, extra: dict | None = None) -> None:
    """Write (or replace) the heads of exit layer medusa.exit_layer, keeping other layers' heads."""
    path, k = Path(path), medusa.exit_layer
    file = path / MEDUSA_FILE
    kept = {n: t for n, t in load_file(str(file)).items() if not n.startswith(f"medusa.{k}.")} if file.is_file() else {}
    tensors = {f"medusa.{k}.{i + 1}.{name}": t.detach().contiguous().cpu()
               for i, head in enumerate(medusa.heads) for name, t in head.state_dict().items()}
    tmp = path / (MEDUSA_FILE + ".tmp")
    save_file({**kept, **tensors}, str(tmp))
    tmp.replace(file)
    vocab, hidden = medusa.exit_head.proj.weight.shape
    meta = read_medusa_json(path) if (path / MEDUSA_JSON).is_file() else {"heads": {}}
    meta.update(hidden_size=hidden, vocab_size=vocab)
    meta["heads"][str(k)] = {"num_heads": medusa.num_heads, **(extra or {})}
    (path / MEDUSA_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def load_medusa_heads(path: str | Path, k: int, dtype: torch.dtype = torch.float32) -> MedusaHeads:
    """The exit head after layer k (exit_heads.safetensors) with its Medusa heads, frozen, in eval mode."""
    path = Path(path)
    meta = read_medusa_json(path)
    if str(k) not in meta["heads"]:
        raise ValueError(f"{path}: no Medusa heads for exit layer {k}; {MEDUSA_JSON} has "
                         f"{sorted(int(x) for x in meta['heads'])}")
    exit_head = load_exit_heads(path, [k])[k]
    if exit_head.proj.weight.shape != (meta["vocab_size"], meta["hidden_size"]):
        raise ValueError(f"{path}: {MEDUSA_JSON} says hidden {meta['hidden_size']}, vocab {meta['vocab_size']}; "
                         f"the exit head has {tuple(exit_head.proj.weight.shape[::-1])}")
    medusa = MedusaHeads(exit_head, meta["heads"][str(k)]["num_heads"], k)
    state = load_file(str(path / MEDUSA_FILE))
    for i, head in enumerate(medusa.heads):
        head.load_state_dict({n: state[f"medusa.{k}.{i + 1}.{n}"] for n in head.state_dict()}, strict=True)
    return medusa.to(dtype).eval().requires_grad_(False)
