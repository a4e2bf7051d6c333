"""Exit heads for the Llama model: after layer k, a norm + vocabulary projection that predicts the
next token from the hidden state the first k layers produce (the device's "early exit").

A model folder with exits holds, beside the Hugging Face files:
    exits.json             {"exit_layers": [2, 4], "num_hidden_layers": 6, "threshold": {...}}
    exit_heads.safetensors exit.{k}.norm.weight (C,), exit.{k}.proj.weight (vocab, C) per exit k

    heads = load_exit_heads("path/to/folder")            # {k: ExitHead}
    logits = heads[k](h)                                  # h: (B, T, C) after layers [0, k)
    conf = confidence(logits[:, -1], "max_prob")          # in [0, 1]; higher is surer
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LlamaConfig
from .model import RMSNorm

EXITS_JSON = "exits.json"
EXIT_HEADS_FILE = "exit_heads.safetensors"
CONFIDENCE_METRICS = ("max_prob", "entropy")


class ExitHead(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, vocab)
        return self.proj(self.norm(hidden))


def confidence(logits: torch.Tensor, metric: str = "max_prob") -> torch.Tensor:
    """(..., vocab) logits -> (...) confidence in [0, 1]: the max probability, or 1 - normalized
    entropy (1 = one-hot, 0 = uniform), so one threshold rule (emit when >= T) serves both."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if metric == "max_prob":
        return logp.max(-1).values.exp()
    if metric == "entropy":
        ent = -(logp.exp() * logp).sum(-1)
        return 1.0 - ent / math.log(logits.shape[-1])
    raise ValueError(f"confidence metric must be one of {CONFIDENCE_METRICS}, got {metric!r}")


def read_exits_json(path: str | Path) -> dict:
    file = Path(path) / EXITS_JSON
    if not file.is_file():
        raise FileNotFoundError(f"no {EXITS_JSON} in {path} (a model with exit heads names its exit layers there)")
    meta = json.loads(file.read_text())
    layers = meta.get("exit_layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(k, int) and k > 0 for k in layers):
        raise ValueError(f"{file}: 'exit_layers' must be a non-empty list of positive layer counts, got {layers!r}")
    return meta


def save_exit_heads(path: str | Path, heads: dict[int, ExitHead], extra: dict | None = None) -> None:
    path = Path(path)
    tensors = {f"exit.{k}.{name}": t.detach().contiguous().cpu() for k, head in heads.items()
               for name, t in head.state_dict().items()}
    save_file(tensors, str(path / EXIT_HEADS_FILE))
    meta = {"exit_layers": sorted(heads)}
    if (path / EXITS_JSON).is_file():
        meta = {**json.loads((path / EXITS_JSON).read_text()), **meta}
    meta.update(extra or {})
    (path / EXITS_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def load_exit_heads(path: str | Path, layers=None, dtype: torch.dtype = torch.float32) -> dict[int, ExitHead]:
    """{k: ExitHead} for the exits named in exits.json (or only `layers`), weights from exit_heads.safetensors."""
    path = Path(path)
    config = LlamaConfig.from_dir(path)
    meta = read_exits_json(path)
    wanted = meta["exit_layers"] if layers is None else list(layers)
    missing = [k for k in wanted if k not in meta["exit_layers"]]
    if missing:
        raise ValueError(f"{path}: no exit head after layer(s) {missing}; exits.json has {meta['exit_layers']}")
    state = load_file(str(path / EXIT_HEADS_FILE))
    heads = {}
    for k in wanted:
        head = ExitHead(config)
        head.load_state_dict({n: state[f"exit.{k}.{n}"] for n in head.state_dict()}, strict=True)
        heads[k] = head.to(dtype).eval().requires_grad_(False)
    return heads


def propagate_kv(model, h: torch.Tensor, positions: torch.Tensor, cache, layers: range) -> None:
    """CALM-style catch-up for tokens that exited at layer layers.start: each deeper layer's K/V are
    computed from the exit-layer state h (B, T, C) by that layer's norm + K/V projections only."""
    from .model import apply_rope
    cos, sin = model.rope(positions, h.dtype)
    B, T, _ = h.shape
    for i in layers:
        layer = model.layers[str(i)]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        k = attn.k_proj(x).view(B, T, attn.n_local_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, attn.n_local_kv_heads, attn.head_dim).transpose(1, 2)
        cache.update(i, apply_rope(k, cos, sin), v, positions)


def continue_layers(model, h: torch.Tensor, exited, start: int, cache, layers: range):
    """Run layers [layers.start, layers.stop) on rows h (1, T, C) at positions start.., in order:
    rows with exited[i] only get their K/V propagated, the others run the layers (attending to the
    cache). Returns (outputs (1, n_full, C) of the full rows, their row indices, n_full, n_kv)."""
    T = h.shape[1]
    outs, idx, n_kv, i = [], [], 0, 0
    while i < T:
        j = i
        while j < T and bool(exited[j]) == bool(exited[i]):
            j += 1
        positions = torch.arange(start + i, start + j)
        if exited[i]:
            propagate_kv(model, h[:, i:j], positions, cache, layers)
            n_kv += j - i
        else:
            outs.append(model.forward_layers(h[:, i:j], layers.start, layers.stop, positions, cache))
            idx.extend(range(i, j))
        i = j
    out = torch.cat(outs, dim=1) if outs else h[:, :0]
    return out, idx, len(idx), n_kv
