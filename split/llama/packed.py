"""One forward over the pending steps of several generations or sessions at once (continuous batching).

    segments = [Segment(ids=[5, 17, 3], start=0, cache=cache_a),     # a newcomer's prefill
                Segment(ids=[42], start=9, cache=cache_b)]           # another stream's decode step
    logits = packed_forward(model, segments)                         # [(vocab,), (vocab,)]

Each segment is what one step of one generation would feed a plain model: rows at positions
start.., attending to its own KVCache. The rows of every segment are stacked into one packed
sequence (1, N, C), N = the rows of all segments: embeddings, norms, the q/k/v/o projections and
the MLP act on each row alone, so they run once over all N rows; RoPE turns each row by its own
position; only attention loops over the segments, each against its own cache with the same
position mask the plain model uses (a lone decode row needs none). The model's own submodules and
weights do the work (model.py), nothing is copied. A row's logits may differ from a run alone in
the last bits (CPU GEMM kernels accumulate differently for different row counts); greedy tokens
agree (tests/test_cloud_fleet_sessions.py).

A segment's rows are token ids (a model with embeddings) or, for a model that holds layers [k, L),
`hidden` states that enter at layer k (the cloud half of the collaborative LLM). Rows marked
`exited` left the network at layer k (CALM-style catch-up, exits.propagate_kv): in every layer
they only give their K and V, projected from their layer-k state, and skip queries, attention
output and MLP. `packed_logits` returns the logits of each segment's last `scored` rows (a draft
and the row before it, for speculative verification); `packed_forward` the last row's (what a
Generation step returns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .model import Llama, apply_rope, attention_mask


@dataclass
class Segment:
    ids: Sequence[int] | None      # the token ids this step feeds (None: `hidden` instead)
    start: int                     # the position of the first row
    cache: KVCache                 # this generation's own cache (grows by `rows` in every layer)
    hidden: torch.Tensor | None = None      # (T, C) states entering at the model's first layer
    exited: Sequence[bool] | None = None    # (T,) rows that only give K/V (propagated catch-up)
    scored: int = 1                # logits for the last `scored` rows (never exited)

    @property
    def rows(self) -> int:
        return len(self.ids) if self.hidden is None else self.hidden.shape[0]


def _attention(attn, x: torch.Tensor, cos, sin, positions, segments: Sequence[Segment], bounds,
               live, live_bounds) -> torch.Tensor:
    """Attention.forward for packed rows x (1, N, C): K/V projections over all rows, queries and the
    output projection over the `live` rows (all when None), attention per segment. -> (1, M, C)."""
    _, N, _ = x.shape
    H, Hkv, hd = attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim
    xq, q_pos, q_cos, q_sin = (x, positions, cos, sin) if live is None else \
        (x[:, live], positions[live], cos[live], sin[live])
    M = xq.shape[1]
    q = attn.q_proj(xq).view(1, M, H, hd)     # (1, M, n_head, head_dim)
    k = attn.k_proj(x).view(1, N, Hkv, hd)    # (1, N, n_kv_head, head_dim)
    v = attn.v_proj(x).view(1, N, Hkv, hd)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (1, n_head | n_kv_head, M | N, head_dim)
    q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin)  # each row at its own position
    ys = []
    for seg, (a, b), (qa, qb) in zip(segments, bounds, live_bounds):
        ks, vs, kv_pos = seg.cache.update(attn.layer_idx, k[:, :, a:b], v[:, :, a:b], positions[a:b])  # (1, Hkv, S, hd)
        # a lone query row is its segment's last position: it sees every key, unless a window cuts some
        mask = None if qb - qa == 1 and attn.window is None else attention_mask(q_pos[qa:qb], kv_pos, attn.window)
        ys.append(_attend(q[:, :, qa:qb], ks, vs, mask))                    # (1, H, T_live, hd)
    y = torch.cat(ys, dim=2).transpose(1, 2).reshape(1, M, H * hd)  # (1, M, H * hd)
    return attn.o_proj(y)  # (1, M, C)


def _attend(q, k, v, mask) -> torch.Tensor:
    """q (B, H, T, hd) over k, v (B, Hkv, S, hd), GQA: each kv head serves H / Hkv query heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _check(segments: Sequence[Segment]) -> None:
    if not segments:
        raise ValueError("a packed forward needs at least one segment")
    for i, seg in enumerate(segments):
        T = seg.rows
        if (seg.ids is None) == (seg.hidden is None):
            raise ValueError(f"segment {i}: give either ids or hidden states")
        if not 1 <= seg.scored <= T:
            raise ValueError(f"segment {i}: scored must be in 1..{T} (its rows), got {seg.scored}")
        if seg.exited is not None and (len(seg.exited) != T or any(seg.exited[T - seg.scored:])):
            raise ValueError(f"segment {i}: exited needs one flag per row, the {seg.scored} scored rows 0")


def _inputs(model: Llama, segments: Sequence[Segment], device) -> torch.Tensor:
    """The packed input rows (1, N, C): embeddings of ids, or the segments' hidden states."""
    if all(seg.hidden is None for seg in segments):
        ids = torch.tensor([t for seg in segments for t in seg.ids], dtype=torch.long, device=device)  # (N,)
        return model.embed(ids[None])
    parts = [seg.hidden if seg.hidden is not None else
             model.embed(torch.tensor(list(seg.ids), dtype=torch.long, device=device)[None])[0] for seg in segments]
    return torch.cat(parts)[None]   # (1, N, C)


@torch.inference_mode()
def packed_logits(model: Llama, segments: Sequence[Segment]) -> list[torch.Tensor]:
    """Run every segment's rows through all layers of `model` in one packed forward; returns the
    (scored, vocab) logits of each segment's last `scored` rows, in order."""
    _check(segments)
    device = next(model.parameters()).device
    bounds, a = [], 0
    for seg in segments:
        bounds.append((a, a + seg.rows))
        a += seg.rows
    positions = torch.cat([torch.arange(s.start, s.start + s.rows, device=device) for s in segments])  # (N,)
    h = _inputs(model, segments, device)        # (1, N, C)
    cos, sin = model.rope(positions, h.dtype)   # (N, rotary_dim) each
    live, live_bounds = None, bounds
    if any(seg.exited is not None and any(seg.exited) for seg in segments):
        keep = [not e for seg in segments for e in (seg.exited if seg.exited is not None else [False] * seg.rows)]
        live = torch.tensor(keep, device=device).nonzero()[:, 0]   # (M,) the rows that run the layers
        live_bounds, qa = [], 0
        for a, b in bounds:
            n = sum(keep[a:b])
            live_bounds.append((qa, qa + n))
            qa += n
    for i in model.layer_ids:
        layer = model.layers[str(i)]
        y = _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, positions, segments, bounds, live,
                       live_bounds)             # (1, M, C)
        if live is None:
            h = h + y
            h = h + layer.mlp(layer.post_attention_layernorm(h))  # (1, N, C)
        else:   # exited rows keep their layer-k state: each layer's K/V come from it
            hl = h[:, live] + y                                      # (1, M, C)
            hl = hl + layer.mlp(layer.post_attention_layernorm(hl))
            h = h.index_copy(1, live, hl)                            # (1, N, C)
    scored = torch.cat([torch.arange(b - seg.scored, b, device=device) for seg, (_, b) in zip(segments, bounds)])
    logits = model.head(h[:, scored])[0]        # (sum of scored, vocab)
    return list(logits.split([seg.scored for seg in segments]))


def packed_forward(model: Llama, segments: Sequence[Segment]) -> list[torch.Tensor]:
    """packed_logits for Generation steps: the (vocab,) logits of each segment's last row."""
    return [scores[-1] for scores in packed_logits(model, segments)]
