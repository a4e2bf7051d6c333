"""One forward over the pending steps of several generations at once (continuous batching).

    segments = [Segment(ids=[5, 17, 3], start=0, cache=cache_a),     # a newcomer's prefill
                Segment(ids=[42], start=9, cache=cache_b)]           # another stream's decode step
    logits = packed_forward(model, segments)                         # [(vocab,), (vocab,)]

Each segment is what one `Generation` step would feed a plain model: ids at positions start..,
attending to its own KVCache. The rows of every segment are stacked into one packed sequence
(1, N, C), N = the rows of all segments: embeddings, norms, the q/k/v/o projections and the MLP
act on each row alone, so they run once over all N rows; RoPE turns each row by its own position;
only attention loops over the segments, each against its own cache with the same position mask
the plain model uses. The model's own submodules and weights do the work (model.py), nothing is
copied. Returns, per segment, the logits of its last row (what a Generation step returns).
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
    ids: Sequence[int]   # the token ids this step feeds
    start: int           # the position of ids[0]
    cache: KVCache       # this generation's own cache (grows by len(ids) in every layer)


def _attention(attn, x: torch.Tensor, cos, sin, positions, segments: Sequence[Segment], bounds) -> torch.Tensor:
    """Attention.forward for packed rows x (1, N, C): projections over all rows, attention per segment."""
    _, N, _ = x.shape
    H, Hkv, hd = attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(1, N, H, hd)      # (1, N, n_head, head_dim)
    k = attn.k_proj(x).view(1, N, Hkv, hd)    # (1, N, n_kv_head, head_dim)
    v = attn.v_proj(x).view(1, N, Hkv, hd)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (1, n_head | n_kv_head, N, head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # each row at its own position
    n_rep = H // Hkv                                          # GQA: each kv head serves n_rep q heads
    ys = []
    for seg, (a, b) in zip(segments, bounds):
        ks, vs, kv_pos = seg.cache.update(attn.layer_idx, k[:, :, a:b], v[:, :, a:b], positions[a:b])  # (1, Hkv, S, hd)
        mask = attention_mask(positions[a:b], kv_pos, attn.window)  # (T_seg, S)
        ks, vs = ks.repeat_interleave(n_rep, dim=1), vs.repeat_interleave(n_rep, dim=1)  # (1, H, S, hd)
        ys.append(F.scaled_dot_product_attention(q[:, :, a:b], ks, vs, attn_mask=mask))  # (1, H, T_seg, hd)
    y = torch.cat(ys, dim=2).transpose(1, 2).reshape(1, N, H * hd)  # (1, N, n_head * head_dim)
    return attn.o_proj(y)  # (1, N, C)


@torch.inference_mode()
def packed_forward(model: Llama, segments: Sequence[Segment]) -> list[torch.Tensor]:
    """Run every segment's step through all layers of `model` in one packed forward; returns the
    (vocab,) logits of each segment's last row, in order."""
    if not segments or any(len(s.ids) == 0 for s in segments):
        raise ValueError("packed_forward needs at least one segment, each with at least one id")
    device = next(model.parameters()).device
    bounds, a = [], 0
    for seg in segments:
        bounds.append((a, a + len(seg.ids)))
        a += len(seg.ids)
    ids = torch.tensor([t for seg in segments for t in seg.ids], dtype=torch.long, device=device)  # (N,)
    positions = torch.cat([torch.arange(s.start, s.start + len(s.ids), device=device) for s in segments])  # (N,)
    h = model.embed(ids[None])                  # (1, N, C)
    cos, sin = model.rope(positions, h.dtype)   # (N, rotary_dim) each
    for i in model.layer_ids:
        layer = model.layers[str(i)]
        h = h + _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, positions, segments, bounds)
        h = h + layer.mlp(layer.post_attention_layernorm(h))  # (1, N, C)
    last = torch.tensor([b - 1 for _, b in bounds], device=device)  # (n_segments,)
    logits = model.head(h[:, last])             # (1, n_segments, vocab)
    return list(logits[0])
