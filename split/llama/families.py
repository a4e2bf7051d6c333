"""What differs between the model families that share the one plain model (model.py): which
config.json fields each family reads, and where each of the model's parameters lives in a
Hugging Face checkpoint (torchtitan's state_dict_adapter). The model code never asks for a family.

    FAMILIES["qwen3"].qk_norm                     # True: q_norm / k_norm on every head
    hf_source(config, "layers.0.self_attn.k_proj.weight")
    # llama:  Source("model.layers.0.self_attn.k_proj.weight")
    # phi3:   Source("model.layers.0.self_attn.qkv_proj.weight", rows=(nq*hd, nq*hd + nkv*hd), total=...)

What each family reads (everything else is the shared block; rope default or llama3 but for phi3):
- llama: biases on q/k/v/o from attention_bias and on the MLP from mlp_bias.
- mistral: no biases (attention_bias, mlp_bias are not read); sliding_window on every layer.
- qwen2: q/k/v biases always, none on o or the MLP; with use_sliding_window, sliding_window on
  the layers layer_types marks (else the layers >= max_window_layers).
- qwen3: q/k/v/o biases from attention_bias, none on the MLP; windows as qwen2; q_norm / k_norm
  (RMSNorm over head_dim on every head before RoPE); head_dim defaults to 128, not hidden / heads.
- phi3: no biases; sliding_window on every layer; partial_rotary_factor; fused qkv_proj (rows: all
  q heads, then k, then v) and gate_up_proj (rows: gate, then up); rope default only (LongRoPE,
  also spelled 'su' / 'yarn', is refused by name).

Defaults for fields a config.json may leave out are transformers' (per family).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NO_LONGROPE = ("phi3 reads 'su' and 'yarn' as 'longrope'; LongRoPE is not supported: transformers "
                "switches from short to long factors once a sequence passes original_max_position_embeddings "
                "and then re-runs the whole sequence without its KV cache")


@dataclass(frozen=True)
class Family:
    # Bias flags: the config.json field that turns the bias on, or True / False whatever it says.
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    mlp_bias: str | bool = False
    window: str = "none"  # "none", "every" (sliding_window on every layer), "qwen" (use_sliding_window + layer types)
    qk_norm: bool = False  # RMSNorm over head_dim on every query and key head, before RoPE
    partial_rotary: bool = False  # reads partial_rotary_factor (RoPE on the first part of each head)
    rope_types: tuple[str, ...] = ("default", "llama3")
    rope_note: str = ""  # said when a rope type is refused
    # Fused checkpoint tensors inside a layer: (their module, our modules in row order)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    defaults: dict = field(default_factory=dict)  # transformers' defaults where they are not the generic ones

    def flag(self, d: dict, how: str | bool) -> bool:
        return bool(d.get(how, False)) if isinstance(how, str) else how


FAMILIES = {
    "llama": Family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
                    defaults=dict(max_position_embeddings=2048)),
    "mistral": Family(window="every", defaults=dict(max_position_embeddings=131072, sliding_window=4096)),
    "qwen2": Family(qkv_bias=True, window="qwen", defaults=dict(max_position_embeddings=32768)),
    "qwen3": Family(qkv_bias="attention_bias", o_bias="attention_bias", window="qwen", qk_norm=True,
                    defaults=dict(max_position_embeddings=32768, head_dim=128)),
    "phi3": Family(window="every", partial_rotary=True, rope_types=("default",), rope_note=_NO_LONGROPE,
                   fused=(("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                          ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))),
                   defaults=dict(max_position_embeddings=4096, rms_norm_eps=1e-5)),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model_type) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    return FAMILIES[model_type]


def config_fields(d: dict) -> dict:
    """The LlamaConfig keyword arguments that differ between families, from a config.json dict."""
    fam = family(d.get("model_type"))
    n_layers = d["num_hidden_layers"]
    sliding_window, layer_types = None, None
    if fam.window == "every":
        sliding_window = d.get("sliding_window", fam.defaults.get("sliding_window"))
    elif fam.window == "qwen" and d.get("use_sliding_window", False):
        sliding_window = d.get("sliding_window", 4096)
        if sliding_window is not None:  # as transformers builds them when config.json has none
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                for i in range(n_layers)]
    head_dim = d.get("head_dim", fam.defaults.get("head_dim"))
    if head_dim is None and "head_dim" in fam.defaults:
        raise ValueError(f"head_dim must be a positive integer for model_type {d['model_type']!r}, got None")
    return dict(
        head_dim=head_dim,
        rms_norm_eps=d.get("rms_norm_eps", fam.defaults.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=d.get("max_position_embeddings", fam.defaults["max_position_embeddings"]),
        attention_bias=fam.flag(d, fam.qkv_bias),
        attention_out_bias=fam.flag(d, fam.o_bias),
        mlp_bias=fam.flag(d, fam.mlp_bias),
        sliding_window=sliding_window,
        layer_types=layer_types,
        qk_norm=fam.qk_norm,
    )


# --------------------------------------------------------------------------- checkpoint tensors

@dataclass(frozen=True)
class Source:
    """Where one of our parameters lives in a checkpoint: the whole tensor `name`, or rows [a, b)
    of a fused tensor of `total` rows."""
    name: str
    rows: tuple[int, int] | None = None
    total: int | None = None

    def span(self, a: int, b: int) -> tuple[int, int]:
        """Rows [a, b) of our parameter as rows of the checkpoint tensor."""
        start = self.rows[0] if self.rows else 0
        return start + a, start + b


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face one: "layers.0.mlp.up_proj.weight" -> "model.layers.0...."."""
    return name if name.startswith("lm_head.") else "model." + name


def _rows(config, module: str) -> int:
    """Output rows of one of our projections (a part of a fused tensor)."""
    per = {"q_proj": config.num_attention_heads * config.head_dim,
           "k_proj": config.num_key_value_heads * config.head_dim,
           "v_proj": config.num_key_value_heads * config.head_dim,
           "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
    return per[module.rpartition(".")[2]]


_LAYER_PARAM = re.compile(r"^(layers\.\d+\.)(.+)\.(weight|bias)$")


def hf_source(config, name: str) -> Source:
    """Where our parameter `name` (e.g. "layers.3.self_attn.q_proj.weight") is in the checkpoint."""
    m = _LAYER_PARAM.match(name)
    if m:
        prefix, module, kind = m.groups()
        for fused, parts in family(config.model_type).fused:
            if module in parts:
                i = parts.index(module)
                start = sum(_rows(config, p) for p in parts[:i])
                total = sum(_rows(config, p) for p in parts)
                return Source(hf_name(f"{prefix}{fused}.{kind}"), (start, start + _rows(config, module)), total)
    return Source(hf_name(name))
