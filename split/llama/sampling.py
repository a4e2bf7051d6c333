"""Sampling settings and `sample()`: one token id from one position's logits.

    s = Sampling(temperature=0.8, top_k=40, top_p=0.95, seed=7, repetition_penalty=1.1)
    gen = s.generator()                                  # None when greedy
    tok = sample(logits, s, gen, history=ids_so_far)     # logits: (vocab,)
    q = distribution(logits, s, history=ids_so_far)      # (vocab,): what sample() draws from

Order, as in transformers: repetition penalty (every id in `history` -- prompt and generated --
has a positive logit divided by the penalty, a negative one multiplied), then greedy argmax, or
temperature -> top-k -> top-p -> multinomial.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh seed per request (temperature > 0)
    repetition_penalty: float = 1.0  # 1: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """The random stream of one request (None when greedy)."""
        if self.greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else time.time_ns() % 2**63)
        return gen


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None,
           history: Sequence[int] = ()) -> int:
    """One token from (vocab,) logits."""
    if s.greedy:
        return int(_penalized(logits, s, history).argmax())
    return int(torch.multinomial(distribution(logits, s, history), 1, generator=gen))


def _penalized(logits: torch.Tensor, s: Sampling, history: Sequence[int]) -> torch.Tensor:
    if s.repetition_penalty == 1 or not history:
        return logits
    seen = torch.as_tensor(sorted(set(history)), dtype=torch.long)  # (n_seen,)
    picked = logits.float()[seen]
    logits = logits.float().clone()
    logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    return logits


def distribution(logits: torch.Tensor, s: Sampling, history: Sequence[int] = ()) -> torch.Tensor:
    """(vocab,) logits -> the (vocab,) float32 probabilities `sample` draws from (greedy: one-hot
    at the argmax), e.g. a draft's q or the verifier's p in speculative sampling."""
    logits = _penalized(logits, s, history)
    if s.greedy:
        return F.one_hot(logits.argmax(), logits.shape[-1]).float()
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits.softmax(-1)
