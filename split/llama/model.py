"""A plain Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3) that can run any range of its layers.

    from split.llama import load_llama, KVCache
    model = load_llama("path/to/hf_folder")                      # all layers, embeddings, head
    logits = model(tokens)                                       # (B, T) -> (B, T, vocab)

    # the same computation in pieces, as a device [0, k) and a cloud [k, L) would run it
    h = model.embed(tokens)                                      # (B, T, C)
    h = model.forward_layers(h, 0, k, positions=0)
    h = model.forward_layers(h, k, L, positions=0)
    logits = model.head(h)

Module and parameter names follow Hugging Face's Llama (`layers.{i}.self_attn.q_proj.weight`, ...);
families.py says where each lives in another family's checkpoint (Phi-3 fuses q/k/v and gate/up)
and which config fields a family reads, so no family is named here. `layers` is an nn.ModuleDict
keyed by the global layer index, so a process that holds only layers [a, b) still names them a..b-1.
Tensor parallelism (edge_runtime/tp/) shards q/k/v/o and gate/up/down by replacing weights and
setting Attention.n_local_heads / n_local_kv_heads (q_norm / k_norm act on one head: every rank keeps
them whole); nothing here knows about it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # normalize in float32, like transformers
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) float32, incl. Llama-3 scaling, computed as transformers does.
    rotary_dim is head_dim unless a partial_rotary_factor turns only the first dims of each head."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # cpu even under meta
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions, computed per call exactly as transformers does (float32).

    One call per forward_layers serves all its layers. No table sized to max_position_embeddings
    (128 MiB for Llama 3.1) and no GPU sync; inv_freq is a plain attribute, not a buffer, so
    model.to(bfloat16) cannot round it.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.inv_freq = rope_inv_freq(config)  # (rotary_dim/2,) float32

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, rotary_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, n_head, T, head_dim); cos, sin: (T, rotary_dim), rotary_dim <= head_dim
    rot = cos.shape[-1]
    if rot < x.shape[-1]:  # partial rotary: the first rot dims turn, the rest pass through
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T, S) bool, True where query i may attend to key j: kv_pos <= q_pos (and within the window)."""
    diff = q_pos[:, None] - kv_pos[None, :]  # (T, S)
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        C, hd = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.head_dim = hd
        # Heads held by this process; a tensor-parallel pass divides both when it shards the weights.
        self.n_local_heads = config.num_attention_heads
        self.n_local_kv_heads = config.num_key_value_heads
        self.window = config.window_for(layer_idx)
        self.q_proj = nn.Linear(C, config.num_attention_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, config.num_key_value_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, config.num_key_value_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, C, bias=config.attention_out_bias)
        # qk_norm: an RMSNorm over head_dim on each query / key head, the same weights for every head
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, positions, cache: KVCache | None = None, chunks=None):
        """`chunks`: the lengths of the calls the rows were first fed in (None: this call is one). Each
        chunk's rows attend to the keys up to its end in an attention call of their own, so feeding
        a prompt and the decode steps after it again in one call gives each row the bits it had."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_local_heads, self.head_dim)  # (B, T, n_head, head_dim)
        k = self.k_proj(x).view(B, T, self.n_local_kv_heads, self.head_dim)  # (B, T, n_kv_head, head_dim)
        v = self.v_proj(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # each head on its own
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_head | n_kv_head, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        kv_pos = positions
        if cache is not None:
            k, v, kv_pos = cache.update(self.layer_idx, k, v, positions)  # (B, n_kv_head, S, head_dim)
        if chunks is not None:
            y = self.attend_chunks(q, k, v, positions, kv_pos, chunks)
        elif cache is not None:
            y = self.attend(q, k, v, attention_mask(positions, kv_pos, self.window), False)
        elif self.window is not None and T > self.window:
            y = self.attend(q, k, v, attention_mask(positions, positions, self.window), False)
        else:
            y = self.attend(q, k, v, None, True)  # T_q == T_kv, same positions: the plain lower triangle
        y = y.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim)
        return self.o_proj(y)  # (B, T, C); partial sums under tensor parallelism

    def attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:  # -> (B, n_head, T, head_dim)
        n_rep = self.n_local_heads // self.n_local_kv_heads  # GQA: each kv head serves n_rep q heads
        k = k.repeat_interleave(n_rep, dim=1)  # (B, n_head, S, head_dim)
        v = v.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def attend_chunks(self, q, k, v, positions, kv_pos, chunks) -> torch.Tensor:
        """q (B, n_head, T, hd) in chunks of the given lengths (summing to T), each over the keys up to
        its own end (k, v: (B, n_kv_head, S, hd), the last T of them this call's)."""
        T, S = q.shape[2], k.shape[2]
        if sum(chunks) != T or min(chunks, default=1) < 1:
            raise ValueError(f"chunks must be positive lengths summing to the {T} rows fed, got {list(chunks)}")
        ys, a = [], 0
        for n in chunks:
            end = S - T + a + n  # keys up to this chunk's last row
            mask = attention_mask(positions[a:a + n], kv_pos[:end], self.window)  # (n, end)
            ys.append(self.attend(q[:, :, a:a + n], k[:, :, :end], v[:, :, :end], mask, False))
            a += n
        return torch.cat(ys, dim=2)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, H = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, H, bias=config.mlp_bias)
        self.up_proj = nn.Linear(C, H, bias=config.mlp_bias)
        self.down_proj = nn.Linear(H, C, bias=config.mlp_bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, cache=None, chunks=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, chunks)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, layers=None, with_embed: bool = True, with_head: bool = True):
        super().__init__()
        self.config = config
        self.layer_ids = layers = _layer_range(layers, config.num_hidden_layers)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if with_embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if with_head else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if with_head else None
        self.tie_weights()
        self.rope = RotaryEmbedding(config)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        if self.embed_tokens is None:
            raise RuntimeError("this model was built with with_embed=False; it has no embed_tokens")
        return self.embed_tokens(tokens)

    def forward_layers(self, hidden, start: int, end: int, positions, cache: KVCache | None = None, chunks=None):
        """Run layers [start, end) on hidden (B, T, C) at `positions` ((T,) int64 tensor, or an int p
        meaning p..p+T-1). Returns (B, T, C). `chunks` (lengths summing to T): the calls these rows
        were first fed in, attended as such (Attention.forward), e.g. [len(prompt), 1, 1, ...] to
        rebuild a cache with the bits the prefill and decode steps gave."""
        if start > end or (start < end and (start < self.layer_ids.start or end > self.layer_ids.stop)):
            raise ValueError(f"layers [{start}, {end}) are not all held by this model "
                             f"(it holds [{self.layer_ids.start}, {self.layer_ids.stop}))")
        T = hidden.shape[1]
        if isinstance(positions, int):
            positions = torch.arange(positions, positions + T, device=hidden.device)
        if positions.shape != (T,):
            raise ValueError(f"positions must have shape ({T},) to match hidden (B, {T}, C), "
                             f"got {tuple(positions.shape)}")
        cos, sin = self.rope(positions, hidden.dtype)  # (T, rotary_dim) each
        for i in range(start, end):
            hidden = self.layers[str(i)](hidden, cos, sin, positions, cache, chunks)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, vocab)
        if self.lm_head is None:
            raise RuntimeError("this model was built with with_head=False; it has no norm / lm_head")
        return self.lm_head(self.norm(hidden))

    def forward(self, tokens: torch.Tensor, positions=None, cache: KVCache | None = None,
                chunks=None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, vocab) logits over all layers. Positions default to continuing after
        the entries already in `cache` (0 without one); `chunks` as forward_layers."""
        if self.layer_ids != range(self.config.num_hidden_layers):
            raise RuntimeError(f"forward needs all {self.config.num_hidden_layers} layers, this model holds "
                               f"{self.layer_ids}; use embed / forward_layers / head")
        if positions is None:
            positions = cache.seq_len if cache is not None else 0
        hidden = self.embed(tokens)  # (B, T, C)
        hidden = self.forward_layers(hidden, self.layer_ids.start, self.layer_ids.stop, positions, cache, chunks)
        return self.head(hidden)


def _layer_range(layers, n_layers: int) -> range:
    """None -> all layers; otherwise a contiguous run of layer indices inside [0, n_layers)."""
    if layers is None:
        return range(n_layers)
    ids = list(layers)
    r = range(ids[0], ids[-1] + 1) if ids else range(0)
    if ids != list(r) or r.start < 0 or r.stop > n_layers:
        raise ValueError(f"layers must be a contiguous range inside [0, num_hidden_layers={n_layers}), "
                         f"got {layers!r}")
    return r
