"""KVCache: per-layer keys and values for the layers this process runs.

A device that runs layers [0, k) and a cloud that runs [k, L) each keep their own KVCache; the
cache is keyed by the global layer index, so the two never collide. Every entry carries its
position, so attention masks are built from positions (a cache may start at any position, and a
chunk of several new tokens attends correctly to what is already cached).

    cache = KVCache()                      # grows as needed; KVCache(max_len=N) allocates N once
    logits = model(prompt, cache=cache)    # prefill, positions 0..T-1
    logits = model(next_tok, positions=torch.tensor([T]), cache=cache)   # one decode step
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, max_len: int | None = None):
        if max_len is not None and max_len <= 0:
            raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
        self.max_len = max_len
        self.k: dict[int, torch.Tensor] = {}  # layer -> (B, n_kv_heads, capacity, head_dim)
        self.v: dict[int, torch.Tensor] = {}  # layer -> (B, n_kv_heads, capacity, head_dim)
        self.pos: dict[int, torch.Tensor] = {}  # layer -> (capacity,) int64 positions of the entries
        self.lengths: dict[int, int] = {}  # layer -> number of valid entries

    @property
    def seq_len(self) -> int:
        """Number of cached tokens (the same for every layer after a full step); 0 when empty."""
        return max(self.lengths.values(), default=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Append k, v (B, n_kv_heads, T, head_dim) at `positions` (T,) for `layer`.

        Returns all cached keys, values (B, n_kv_heads, S, head_dim) and their positions (S,).
        """
        B, H, T, D = k.shape
        n = self.lengths.get(layer, 0)
        need = n + T
        if self.max_len is not None and need > self.max_len:
            raise ValueError(f"KVCache is full: layer {layer} holds {n} tokens, {T} more would exceed "
                             f"max_len={self.max_len}")
        if layer in self.k and self.k[layer].shape[0] != B:
            raise ValueError(f"batch size {B} differs from the cached batch size {self.k[layer].shape[0]} "
                             f"for layer {layer}")
        capacity = self.k[layer].shape[2] if layer in self.k else 0
        if need > capacity:  # allocate (max_len at once) or grow geometrically
            new_cap = self.max_len or max(need, 2 * capacity, 64)
            k_buf = k.new_empty(B, H, new_cap, D)
            v_buf = v.new_empty(B, H, new_cap, D)
            pos_buf = torch.empty(new_cap, dtype=torch.long, device=k.device)
            if n:
                k_buf[:, :, :n] = self.k[layer][:, :, :n]
                v_buf[:, :, :n] = self.v[layer][:, :, :n]
                pos_buf[:n] = self.pos[layer][:n]
            self.k[layer], self.v[layer], self.pos[layer] = k_buf, v_buf, pos_buf
        self.k[layer][:, :, n:need] = k
        self.v[layer][:, :, n:need] = v
        self.pos[layer][n:need] = positions
        self.lengths[layer] = need
        return self.k[layer][:, :, :need], self.v[layer][:, :, :need], self.pos[layer][:need]

    def crop(self, length: int) -> None:
        """Forget every entry after the first `length` (e.g. to roll back rejected tokens)."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        for layer, n in self.lengths.items():
            self.lengths[layer] = min(n, length)

    def reset(self) -> None:
        for d in (self.k, self.v, self.pos, self.lengths):
            d.clear()
