"""`--mode speculative`: the device drafts, the cloud verifies (DESIGN.md, "verified rather than
recomputed"; speculative decoding, Leviathan et al. 2023, split between an edge and a cloud as in
SLED or SpecEdge).

Per round the device drafts up to gamma tokens and sends the cloud the token ids it has not seen
plus the drafts in ONE call to the cloud's full model (`llm_full`: the llm_continuation backend at
first_layer 0, whose optional inputs draft_len / draft_probs / temperature / top_k / top_p / seed
ask it to verify). The cloud scores every draft in one forward and answers how many it accepts and
its own next token; it cuts its KV cache back to the accepted prefix, and the device cuts its edge
cache the same way. Greedy: the output is the cloud model's greedy output, token for token.
Sampling: the cloud runs speculative sampling against the distributions q the drafts were drawn
from (sent along), so the output is distributed as the cloud model's own samples.

Drafters: any callable drafter(ctx: DraftContext, n) returning an object with `.ids` (up to n
ids for the positions after ctx.history) and `.dists` ((len(ids), vocab): the distribution each id
was drawn from; read only when sampling). ExitHeadDrafter drafts autoregressively with the exit
head, running each draft through the edge layers (ctx.feed, ids in order) to draft the next; the
edge keeps the states of drafts the cloud accepts. Medusa heads (split.llama.medusa) plug in as

    CollabLlm(..., mode="speculative", drafter=lambda ctx, n: medusa.draft(ctx.h, n, ctx.sampling, ctx.gen))

Drafts are cut after one that ends the generation (EOS or a stop sequence) and to the tokens left,
so the cloud never holds a token the turn does not emit.

Adaptive gamma (Gamma, one per CollabLlm): drafts per round = 1 + the mean run of accepted drafts
per rejected one, from counts decayed by 0.8 per round, bounded 1..gamma_max; it starts at
gamma_max. Sampling is seeded by the device (`Sampling.seed`; the cloud's draws use a seed drawn
from the device's stream each round): the same seed, drafter and gamma state give the same tokens.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from edge_runtime.client.errors import ServerError
from split.llama import Sampling, Stop
from split.llama.sampling import distribution

DECAY = 0.8


@dataclass
class Draft:
    ids: list[int]                      # proposed ids for the positions after the history, in order
    dists: torch.Tensor | None = None   # (len(ids), vocab): what each id was drawn from (sampling)


@dataclass
class DraftContext:
    h: torch.Tensor                     # (1, 1, C) layer-k state of the last confirmed token
    history: list[int]                  # every confirmed token id of the conversation
    sampling: Sampling
    gen: torch.Generator | None
    feed: Callable[[int], torch.Tensor]  # runs the next draft id through the edge layers -> (1, 1, C)


Drafter = Callable[[DraftContext, int], Draft]


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """(token, the (vocab,) distribution it was drawn from) for one position's (vocab,) logits."""
    q = distribution(logits, s)
    token = int(logits.argmax()) if s.greedy else int(torch.multinomial(q, 1, generator=gen))
    return token, q


class ExitHeadDrafter:
    """Drafts autoregressively with the device's exit head at layer k."""

    def __init__(self, head):
        self.head = head

    def __call__(self, ctx: DraftContext, n: int) -> Draft:
        ids, dists, h = [], [], ctx.h
        for i in range(n):
            token, q = pick(self.head(h)[0, -1], ctx.sampling, ctx.gen)
            ids.append(token)
            dists.append(q)
            if i < n - 1:
                h = ctx.feed(token)  # (1, 1, C)
        return Draft(ids, torch.stack(dists) if dists else None)


class Gamma:
    """Drafts per round: 1 + accepted / rejected (decayed counts), bounded 1..gamma_max. The same
    counts estimate the per-draft acceptance (`acceptance`)."""

    def __init__(self, gamma_max: int):
        if isinstance(gamma_max, bool) or not isinstance(gamma_max, int) or gamma_max < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {gamma_max!r}")
        self.max, self.accepted, self.rejected = gamma_max, 0.0, 0.0

    @property
    def value(self) -> int:
        if self.rejected == 0:
            return self.max
        return max(1, min(self.max, 1 + round(self.accepted / self.rejected)))

    @property
    def acceptance(self) -> float:
        """The chance a draft is accepted once the ones before it were: accepted / (accepted +
        rejections), as a round's drafts after its first rejection are never judged (accepted /
        drafted would count them as rejected); Laplace-smoothed, so 0.5 before any round."""
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    def update(self, drafted: int, accepted: int) -> None:
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)


class Speculation:
    """One turn's rounds. choose() hands out their tokens one at a time: a round's accepted drafts
    ("draft"), then the cloud's token ("cloud"); with the cloud unreachable, one exit-head token per
    round ("degraded")."""

    def __init__(self, llm, conv, sampling: Sampling, stop: Stop, max_new_tokens: int):
        self.llm, self.conv, self.sampling, self.stop = llm, conv, sampling, stop
        self.max_new_tokens = max_new_tokens
        self.gen = sampling.generator()
        self.queue: deque = deque()   # (token, source) decided, not yet emitted

    def choose(self, res, generated: list[int]) -> int:
        if not self.queue:
            self._round(res.counters, generated)
        token, source = self.queue.popleft()
        C = res.counters
        if source == "cloud":
            C.cloud_tokens += 1
        elif source == "degraded":
            C.edge_tokens += 1
            C.degraded_tokens += 1
        res.tokens.append(token)
        res.sources.append(source)
        res.confidences.append(float("nan"))
        return token

    def finish(self) -> None:
        """The turn ended: forget drafts the edge ran ahead, and resync the cloud if it holds a token
        the turn did not emit (it cannot, as drafts are cut at a stop; this keeps it so)."""
        conv = self.conv
        conv.ahead.clear()
        conv.cache.crop(len(conv.tokens))
        if conv.acked > len(conv.tokens) + 1:
            conv.begin = True

    def _round(self, C, generated: list[int]) -> None:
        llm, conv = self.llm, self.conv
        n = min(llm.gamma.value, self.max_new_tokens - len(generated) - 1)
        ids, q, fed = self._draft(n, generated, C)
        out = llm._try_cloud(conv, C, ids, self._extra(ids, q))
        if out is None:   # unreachable: one token from the exit head, the drafts are dropped
            conv.cache.crop(len(conv.tokens))
            self.queue.append((pick(llm.head(conv.h[:, -1:])[0, -1], self.sampling, self.gen)[0], "degraded"))
            return
        accepted, token = int(out["accepted"][0]), int(out["next_token"][0])
        if not 0 <= accepted <= len(ids):
            raise ServerError(f"malformed reply: {accepted} of {len(ids)} drafts accepted", grpc.StatusCode.DATA_LOSS)
        keep = min(accepted, len(fed))     # accepted drafts whose edge states are valid
        conv.cache.crop(len(conv.tokens) + keep)
        conv.ahead = fed[:keep]
        if ids:
            llm.gamma.update(len(ids), accepted)
        C.drafted += len(ids)
        C.accepted += accepted
        self.queue.extend([(t, "draft") for t in ids[:accepted]] + [(token, "cloud")])

    def _draft(self, n: int, generated: list[int], C):
        """(ids, q (len, vocab) or None, edge states of the drafts fed) for up to n drafts."""
        if n <= 0:
            return [], None, []
        llm, conv, fed = self.llm, self.conv, []

        def feed(token: int) -> torch.Tensor:
            h = llm._edge_step([int(token)], len(conv.tokens) + len(fed), conv.cache)  # (1, 1, C)
            C.edge_layer_evals += llm.k
            fed.append(h)
            return h

        draft = llm.drafter(DraftContext(conv.h[:, -1:], list(conv.tokens), self.sampling, self.gen, feed), n)
        ids = [int(t) for t in draft.ids][:n]
        for i in range(len(ids)):   # nothing after a draft that ends the generation
            if self.stop.reached(generated + ids[:i + 1]):
                ids = ids[:i + 1]
                break
        q = None if self.sampling.greedy or not ids else torch.as_tensor(draft.dists[:len(ids)], dtype=torch.float32)
        return ids, q, fed

    def _extra(self, ids: list[int], q: torch.Tensor | None) -> dict:
        """The verification inputs of one round (none for a greedy round without drafts)."""
        extra = {"draft_len": np.array([len(ids)], np.int64)} if ids else {}
        s = self.sampling
        if not s.greedy:
            if ids:
                extra["draft_probs"] = q.numpy()  # (d, vocab)
            seed = int(torch.randint(0, 2**62, (), generator=self.gen))   # the cloud's draws, from ours
            extra.update(temperature=np.array([s.temperature], np.float32), top_k=np.array([s.top_k], np.int64),
                         top_p=np.array([s.top_p], np.float32), seed=np.array([seed], np.int64))
        return extra

