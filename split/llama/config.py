"""LlamaConfig: the few numbers a Llama-family model needs, read from a Hugging Face config.json.

    cfg = LlamaConfig.from_dir("path/to/hf_folder")      # or LlamaConfig.from_hf(json_dict)

Covers model_type "llama", "mistral", "qwen2", "qwen3" and "phi3": one block, with the differences
(biases, sliding windows, Qwen3's q/k norms, Phi-3's partial rotary embedding and fused tensors)
read per family in families.py. Both the transformers-4 spelling (`rope_theta` + `rope_scaling`)
and the transformers-5 one (`rope_parameters` holding `rope_theta` and `rope_type`) are accepted.
Anything else fails here, with the field and the expected value named, rather than silently
producing wrong logits later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .families import SUPPORTED_MODEL_TYPES, config_fields, family

SUPPORTED_ROPE_TYPES = ("default", "llama3")  # of all families; FAMILIES[model_type].rope_types per family
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None -> num_attention_heads (plain multi-head attention)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q_proj, k_proj, v_proj
    attention_out_bias: bool | None = None  # bias on o_proj; None -> same as attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # None: full causal attention
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" / "sliding_attention"
    model_type: str = "llama"
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE (Qwen3)
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim * factor) dims of a head (Phi-3)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int("head_dim", self.head_dim)
        fam = family(self.model_type)  # names the supported model types if it is none of them
        prf = self.partial_rotary_factor
        if prf != 1.0 and not fam.partial_rotary:
            raise ValueError(f"partial_rotary_factor must be 1.0 for model_type {self.model_type!r} "
                             f"(rotary embedding on the whole head), got {prf!r}")
        if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1:
            raise ValueError(f"partial_rotary_factor must be a number in (0, 1], got {prf!r}")
        if self.head_dim % 2 and prf == 1.0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(f"int(head_dim * partial_rotary_factor) must be even and positive for rotary "
                             f"embeddings, got int({self.head_dim} * {prf}) = {self.rotary_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window)
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types must have num_hidden_layers={self.num_hidden_layers} "
                                 f"entries, got {len(self.layer_types)}")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise ValueError(f"layer_types entries must be 'full_attention' or "
                                 f"'sliding_attention', got {bad}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings, self.model_type)

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE turns (the first ones); the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    def window_for(self, layer: int) -> int | None:
        """Sliding-window size for global layer index `layer`, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_dir(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}")
        with open(file) as f:
            config = cls.from_hf(json.load(f))
        generation = file.parent / "generation_config.json"  # what transformers' generate stops on
        if generation.is_file():
            with open(generation) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                config.eos_token_ids = _eos_ids(eos)
        return config

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from the dict in a Hugging Face config.json (transformers 4 or 5 spelling)."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            if name not in d:
                raise ValueError(f"config.json is missing the required field {name!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU MLP), got {act!r}")

        # transformers 5 writes rope_parameters = {"rope_theta", "rope_type", ...}; 4.x wrote
        # rope_theta at top level and rope_scaling = {"rope_type" or "type", ...} or null.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {rope!r}")
        rope = dict(rope)
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        partial_rotary_factor = rope.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
        rope_scaling = None if rope_type == "default" else rope

        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            model_type=model_type,
            eos_token_ids=_eos_ids(d.get("eos_token_id")),
            partial_rotary_factor=partial_rotary_factor,
            **config_fields(d),  # biases, windows, head_dim, norms: what this family reads (families.py)
        )


def _eos_ids(eos) -> tuple[int, ...]:
    """eos_token_id of a config.json / generation_config.json: null, one id, or a list of ids."""
    ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id must be an integer, a list of integers or null, got {eos!r}")
    return ids


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _normalize_rope_scaling(rs: dict | None, max_position_embeddings: int, model_type: str = "llama") -> dict | None:
    """None for plain RoPE, else a dict with "rope_type" set (accepting the older key "type")."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling must be null or an object, got {rs!r}")
    rs = dict(rs)
    rope_type = rs.pop("type", None)
    rope_type = rs.setdefault("rope_type", rope_type or "default")
    fam = family(model_type)
    if rope_type not in fam.rope_types:
        raise ValueError(f"rope_scaling.rope_type must be one of {fam.rope_types} for model_type {model_type!r}, "
                         f"got {rope_type!r}" + (f" ({fam.rope_note})" if fam.rope_note else ""))
    if rope_type == "default":
        return None
    # As in transformers: without original_max_position_embeddings, llama3 uses max_position_embeddings.
    rs.setdefault("original_max_position_embeddings", max_position_embeddings)
    for key in _LLAMA3_ROPE_KEYS:
        if key not in rs:
            raise ValueError(f"rope_scaling.{key} is required for rope_type 'llama3'")
        if not isinstance(rs[key], (int, float)) or isinstance(rs[key], bool) or rs[key] <= 0:
            raise ValueError(f"rope_scaling.{key} must be a positive number, got {rs[key]!r}")
    if rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise ValueError(f"rope_scaling.high_freq_factor ({rs['high_freq_factor']}) must be greater than "
                         f"rope_scaling.low_freq_factor ({rs['low_freq_factor']})")
    return rs
