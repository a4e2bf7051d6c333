"""A llama.cpp GGUF file read as a Hugging Face checkpoint: config.json, HF-named float tensors, tokenizer.

    g = read_gguf("model.gguf")          # GGUFModel: metadata parsed and checked, tensors not yet read
    g.config                             # the config.json dict (model_type llama / qwen2 / qwen3 / phi3)
    g.tokenizer                          # a tokenizers.Tokenizer built from tokenizer.ggml.* metadata
    g.tokenizer_config, g.generation_config
    g.types                              # {"Q8_0": 14, "F32": 5}: the GGUF tensor types found
    for hf_name, tensor in g.tensors():  # one tensor at a time, dequantized by gguf.quants.dequantize
        ...
    for module, stored in g.kept_projections("Q4_0"):  # Q4_0 projections as int4 group-32, integers kept
        ...                                              # (and "Q8_0": as int8g group-32; see KEPT)

Architectures ("general.architecture"): "llama" (also Mistral: llama.cpp writes it as llama; read as
model_type "llama", i.e. without a sliding window, as llama.cpp runs it), "qwen2", "qwen3", "phi3".
Every tensor type goes through the `gguf` package's own dequantization (`gguf.quants.dequantize`) to
float32 (bfloat16 where the file holds only BF16 tensors, exactly as stored). llama.cpp's converter
permutes the rows of the q and k projections of "llama" models for its RoPE layout; the inverse
permutation is applied here (as transformers' GGUF loader does). Phi-3's fused attn_qkv / ffn_up are
Hugging Face's qkv_proj / gate_up_proj as they are.

Two GGUF types also map onto a split.llama.quantize stored form keeping their integers (KEPT), so a
projection quantized by llama.cpp need not be requantized from its dequantized floats: Q4_0 onto
int4 group 32 (q4_0_as_int4) and Q8_0 onto group-wise int8, group 32 (int8g, q8_0_as_int8). The one
difference from llama.cpp's weights is the scale d: fp16 in the file, bf16 for our kernels.

Tokenizers (`tokenizer.ggml.model`): "gpt2" (byte-level BPE: tokens + merges, the split regex from
`tokenizer.ggml.pre`) and "llama" (SentencePiece BPE: tokens + scores, merges from the file or derived
from the scores, byte fallback; Phi-3's prefix-space normalizer), each as transformers builds it from
the same metadata. Anything else is refused by name.

Every problem is a ValueError naming the file and the key or tensor: not a GGUF or truncated, an
unknown architecture, a missing key, a tensor whose shape disagrees with the metadata, LongRoPE or
another rope scaling the model cannot run. Nothing here imports transformers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}  # GGUF arch -> model_type
TOKENIZER_MODELS = ("gpt2", "llama")

# llama.cpp tensor names inside a block -> Hugging Face ones (after "model.layers.N.")
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # Qwen3
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
    "ffn_up": "mlp.up_proj",  # Phi-3: mlp.gate_up_proj (gate rows, then up rows)
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# The split regex of a byte-level vocabulary, by tokenizer.ggml.pre (as transformers' GGUF loader has them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@dataclass
class GGUFModel:
    path: Path
    arch: str
    config: dict  # config.json
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict
    generation_config: dict
    types: dict[str, int]  # GGUF tensor type name -> how many tensors have it
    dtype: torch.dtype  # what tensors() yields
    _reader: Any = field(repr=False, default=None)
    _names: dict[str, str] = field(repr=False, default_factory=dict)  # GGUF tensor name -> HF name

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float tensor) for every tensor, in file order, one at a time."""
        from gguf.quants import dequantize

        heads, kv = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        for t in self._reader.tensors:
            if t.name not in self._names:
                continue
            try:
                w = np.asarray(dequantize(t.data, t.tensor_type))
            except Exception as err:  # a bad type or a short tensor: name it
                raise ValueError(f"{self.path}: cannot dequantize tensor {t.name!r} "
                                 f"({t.tensor_type.name}): {err}") from None
            w = w.reshape(tuple(reversed([int(n) for n in t.shape])))
            if self.arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_q.bias")):
                w = unpermute(w, heads)
            elif self.arch == "llama" and t.name.endswith((".attn_k.weight", ".attn_k.bias")):
                w = unpermute(w, kv)
            yield self._names[t.name], torch.from_numpy(np.array(w, dtype=np.float32)).to(self.dtype)

    def kept_projections(self, qtype: str) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(HF module name, stored tensors) for every projection of GGUF type `qtype` (a key of KEPT:
        "Q4_0" -> int4 group 32, "Q8_0" -> int8g group 32), its integers kept as they are; not yet
        Phi-3's fused qkv_proj / gate_up_proj (those are requantized from the floats). llama's q / k
        rows are un-permuted like tensors() does (the permutation moves whole rows and a block runs
        along a row, so it commutes with the mapping)."""
        if qtype not in KEPT:
            raise ValueError(f"GGUF type {qtype!r} has no kept form (only {', '.join(KEPT)})")
        as_stored = KEPT[qtype][1]
        heads, kv = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        for t in self._reader.tensors:
            hf = self._names.get(t.name)
            if hf is None or t.tensor_type.name != qtype or not hf.endswith("_proj.weight") \
                    or hf.endswith(("qkv_proj.weight", "gate_up_proj.weight")):  # Phi-3's fused: requantized
                continue
            n_out, n_in = (int(n) for n in reversed(t.shape))
            out = as_stored(t.data, n_out, n_in)
            n = heads if t.name.endswith(".attn_q.weight") else kv if t.name.endswith(".attn_k.weight") else None
            if self.arch == "llama" and n is not None:
                out = {k: unpermute(v, n).contiguous() for k, v in out.items()}
            yield hf[:-len(".weight")], out


def q4_0_as_int4(data: np.ndarray, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
    """A Q4_0 tensor's bytes (each row n_in/32 blocks of 18 bytes: fp16 d, then 16 bytes whose low
    nibbles are elements 0..15 and high nibbles 16..31; w = d * (q - 8)) in split.llama.quantize's int4
    stored form with group 32 (w = (q - 8) * scales + zeros, columns 2j / 2j+1 in a byte's low / high
    nibble): the same integers q, scales = d rounded to bf16 (the kernel's dtype), zeros = 0. The
    only difference from llama.cpp's weights is that rounding: at most 8 * |d - bf16(d)| <= |d| / 32."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(n_out, n_in // 32, 18)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # (out, in/32)
    qs = blocks[..., 2:]  # (out, in/32, 16)
    q = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(n_out, n_in)  # elements in order, 0..15
    scales = torch.from_numpy(d.astype(np.float32)).to(torch.bfloat16)
    return {"weight": torch.from_numpy(np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))),
            "scales": scales, "zeros": torch.zeros_like(scales)}


def q8_0_as_int8(data: np.ndarray, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
    """A Q8_0 tensor's bytes (each row n_in/32 blocks of 34 bytes: fp16 d, then 32 int8 q; w = d * q,
    as gguf.quants.Q8_0) in split.llama.quantize's int8g stored form with group 32 (weight int8
    (out, in), scales bf16 (out, in/32), w[:, j] = weight[:, j] * scales[:, j//32]): the same integers
    q, scales = d rounded to bf16 (the kernel's dtype). The only difference from llama.cpp's weights is
    that rounding: |q| * |d - bf16(d)| <= 127 * 2^-8 * |d| < |d| / 2 (half a step) per weight."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(n_out, n_in // 32, 34)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # (out, in/32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n_out, n_in)  # elements in order
    return {"weight": torch.from_numpy(q), "scales": torch.from_numpy(d.astype(np.float32)).to(torch.bfloat16)}


# GGUF type -> (the split.llama.quantize scheme, group 32, whose stored form keeps its integers; the mapping)
KEPT = {"Q4_0": ("int4", q4_0_as_int4), "Q8_0": ("int8g", q8_0_as_int8)}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q / k rows (per head: interleaved -> halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's own permutation of a Hugging Face q / k projection (what its converter writes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- reading

def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # numpy reading past the end, a bad count or type: the file is damaged
        raise ValueError(f"{path}: cannot read the GGUF header (truncated or damaged file?): "
                         f"{type(err).__name__}: {err}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise ValueError(f"{path}: tensor {t.name!r} ends at byte {end} but the file has {size} bytes "
                             f"(truncated file)")
    return reader


def _value(reader, key: str, path: Path, default: Any = ..., kind=None):
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise ValueError(f"{path}: the GGUF metadata has no {key!r}")
        return default
    try:
        v = f.contents()
    except Exception as err:
        raise ValueError(f"{path}: cannot read GGUF metadata {key!r}: {err}") from None
    if kind is not None:
        ok = (isinstance(v, kind) and not isinstance(v, bool)) if kind is not bool else isinstance(v, bool)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise ValueError(f"{path}: GGUF metadata {key!r} must be {kind.__name__}, got {v!r}")
        if kind in (int, float) and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{path}: GGUF metadata {key!r} must be positive, got {v!r}")
    return v


def read_gguf(path: str | Path) -> GGUFModel:
    """Parse and check a GGUF file's metadata and tensor table (tensors are read by .tensors())."""
    path = Path(path)
    reader = _open(path)
    arch = _value(reader, "general.architecture", path, kind=str)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    model_type = ARCHITECTURES[arch]

    def key(k, default=..., kind=int):
        return _value(reader, f"{arch}.{k}", path, default, kind)

    tokens = _value(reader, "tokenizer.ggml.tokens", path, None)
    n_layers, hidden = key("block_count"), key("embedding_length")
    inter, heads = key("feed_forward_length"), key("attention.head_count")
    kv = key("attention.head_count_kv", heads)
    vocab = key("vocab_size", None) or (len(tokens) if tokens else None)
    if vocab is None:
        raise ValueError(f"{path}: the GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    head_dim = key("attention.key_length", None)
    rope_dim = key("rope.dimension_count", None)
    if head_dim is None:
        head_dim = rope_dim if arch == "llama" and rope_dim else hidden // heads
    config: dict[str, Any] = dict(
        model_type=model_type, architectures=[_HF_CLASS[model_type]], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, hidden_act="silu", max_position_embeddings=key("context_length", 2048),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5 if arch == "phi3" else 1e-6, float),
        rope_theta=key("rope.freq_base", 10000.0, float), torch_dtype="float32")
    if arch == "phi3":
        config["partial_rotary_factor"] = (rope_dim or head_dim) / head_dim
        config["sliding_window"] = key("attention.sliding_window", None)
    elif rope_dim is not None and rope_dim != head_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count ({rope_dim}) must equal the head dimension "
                         f"({head_dim}) for architecture {arch!r}")
    scaling = _value(reader, f"{arch}.rope.scaling.type", path, None)
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported (only plain RoPE and "
                         f"Llama 3's rope_freqs)")

    # The tensor table: names, shapes, what the config implies.
    names = {t.name: t for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    config["attention_bias"] = arch == "qwen2" or "blk.0.attn_q.bias" in names
    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    for long in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if long in names:
            raise ValueError(f"{path}: tensor {long!r}: LongRoPE (Phi-3 128k) is not supported")
    if "rope_freqs.weight" in names:
        config["rope_scaling"] = _llama3_scaling(path, np.asarray(names["rope_freqs.weight"].data, np.float32),
                                                 config["rope_theta"], head_dim)
    expected = _shapes(config, arch)
    hf_names: dict[str, str] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        hf = _hf_name(t.name, arch)
        if hf is None or hf not in expected:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a {arch} model with {n_layers} layers")
        shape = tuple(reversed([int(n) for n in t.shape]))
        if shape != expected[hf]:
            raise ValueError(f"{path}: tensor {t.name!r} has shape {list(shape)} (rows, columns), expected "
                             f"{list(expected[hf])} from the metadata ({_explain(arch)})")
        hf_names[t.name] = hf
    for hf, shape in expected.items():
        if hf not in hf_names.values() and not (hf == "lm_head.weight" and config["tie_word_embeddings"]) \
                and not hf.endswith(".bias"):
            gname = next((g for g in _gguf_names(hf, arch)), hf)
            raise ValueError(f"{path}: missing tensor {gname!r} (for {hf})")

    types = Counter(t.tensor_type.name for t in reader.tensors if t.name in hf_names)
    dtype = torch.bfloat16 if set(types) == {"BF16"} else torch.float32
    config["torch_dtype"] = "bfloat16" if dtype == torch.bfloat16 else "float32"

    tokenizer, tok_config = build_tokenizer(reader, path, arch)
    for name, k in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = _value(reader, f"tokenizer.ggml.{k}", path, None)
        if v is not None:
            config[name] = int(v)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return GGUFModel(path, arch, config, tokenizer, tok_config, generation, dict(types), dtype, reader, hf_names)


_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "phi3": "Phi3ForCausalLM"}


def _explain(arch: str) -> str:
    return ("heads * head_dim, kv heads * head_dim, embedding_length, feed_forward_length, vocabulary"
            if arch != "phi3" else "qkv rows = (heads + 2 * kv heads) * head_dim, ffn_up rows = 2 * feed_forward_length")


def _hf_name(name: str, arch: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = _BLK.match(name)
    if not m or m.group(2) not in _BLOCK:
        return None
    module = _BLOCK[m.group(2)]
    if arch == "phi3" and m.group(2) == "ffn_up":
        module = "mlp.gate_up_proj"
    return f"model.layers.{m.group(1)}.{module}.{m.group(3)}"


def _gguf_names(hf: str, arch: str):
    inv = {v: k for k, v in _TOP.items()}
    if hf in inv:
        yield inv[hf]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if m:
        for g, h in _BLOCK.items():
            if h == m.group(2) or (arch == "phi3" and g == "ffn_up" and m.group(2) == "mlp.gate_up_proj"):
                yield f"blk.{m.group(1)}.{g}.{m.group(3)}"


def _shapes(c: dict, arch: str) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, every tensor the metadata allows (biases optional)."""
    H, I, V, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.o_proj.weight": (H, q), p + "mlp.down_proj.weight": (H, I)})
        if arch == "phi3":
            s.update({p + "self_attn.qkv_proj.weight": (q + 2 * kv, H), p + "mlp.gate_up_proj.weight": (2 * I, H)})
            continue
        for proj, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            s[p + f"self_attn.{proj}.weight"] = (n, H)
            if c.get("attention_bias"):
                s[p + f"self_attn.{proj}.bias"] = (n,)
        if arch == "llama" and c.get("attention_bias"):
            s[p + "self_attn.o_proj.bias"] = (H,)
        if arch == "qwen3":
            s.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
            if c.get("attention_bias"):
                s[p + "self_attn.o_proj.bias"] = (H,)
        s.update({p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H)})
        if c.get("mlp_bias"):
            s.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,), p + "mlp.down_proj.bias": (H,)})
    return s


def _llama3_scaling(path: Path, freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """llama.cpp stores Llama 3.1's rope scaling as the tensor rope_freqs (a factor per frequency), not as
    metadata: find the llama3 parameters that give exactly these factors, or refuse."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if freqs.shape != inv.shape:
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' has {freqs.size} values, expected {inv.size}")
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096)):
            lw, hw = orig / low, orig / high
            out = []
            for f in inv:
                wl = 2 * math.pi / f
                if wl < hw:
                    out.append(1.0)
                elif wl > lw:
                    out.append(factor)
                else:
                    smooth = (orig / wl - low) / (high - low)
                    out.append(1.0 / ((1 - smooth) / factor + smooth))
            if np.allclose(freqs, np.asarray(out, np.float32), rtol=1e-5, atol=0):
                return dict(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                            original_max_position_embeddings=orig)
    raise ValueError(f"{path}: tensor 'rope_freqs.weight' matches no Llama 3 rope scaling this runtime knows")


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer(reader, path: Path, arch: str):
    """(tokenizers.Tokenizer, tokenizer_config.json dict) from tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = _value(reader, "tokenizer.ggml.model", path, kind=str)
    if model not in TOKENIZER_MODELS:
        raise ValueError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: "
                         f"{', '.join(TOKENIZER_MODELS)})")
    tokens = _value(reader, "tokenizer.ggml.tokens", path)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens must be a non-empty list of strings")
    types = _value(reader, "tokenizer.ggml.token_type", path, None) or []
    merges = _value(reader, "tokenizer.ggml.merges", path, None)

    def token(k):
        i = _value(reader, f"tokenizer.ggml.{k}", path, None)
        if i is not None and not 0 <= int(i) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{k} {i} is not a token id (vocabulary of {len(tokens)})")
        return None if i is None else tokens[int(i)]

    bos, eos, unk, pad = (token(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    add_bos = _value(reader, "tokenizer.ggml.add_bos_token", path, None)
    vocab = {t: i for i, t in enumerate(tokens)}
    if model == "gpt2":
        if merges is None:
            raise ValueError(f"{path}: tokenizer.ggml.merges is required for tokenizer.ggml.model 'gpt2'")
        spelling = gpt2_byte_spelling()
        alphabet = set(spelling)
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = _SPLITS.get(_value(reader, "tokenizer.ggml.pre", path, None))
        tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                             pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=False)]))
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        add_bos = bool(add_bos)
        special_ok = alphabet
    else:
        if merges is not None:
            merge_list = [tuple(m.split(" ", 1)) for m in merges]
        else:
            scores = _value(reader, "tokenizer.ggml.scores", path, None)
            if scores is None or len(scores) != len(tokens):
                raise ValueError(f"{path}: tokenizer.ggml.scores (one per token) is required for "
                                 f"tokenizer.ggml.model 'llama' without merges")
            merge_list = _merges_from_scores(vocab, dict(zip(tokens, scores)))
        tok = Tokenizer(BPE(vocab=vocab, merges=merge_list, fuse_unk=True, byte_fallback=True, dropout=None,
                            unk_token=unk))
        if arch == "phi3":  # as transformers: the prefix space from a normalizer
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        add_bos = True if add_bos is None else bool(add_bos)
        special_ok = None
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == _CONTROL and (special_ok is None or set(t) <= special_ok)]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)
    if add_bos and bos is not None:
        bos_id = vocab.get(bos, tokens.index(bos))
        tok.post_processor = processors.Sequence(
            [p for p in (tok.post_processor,) if p is not None]
            + [processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, bos_id)])])
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(add_bos and bos),
                              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    for name, t in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if t is not None:
            config[name] = t
    template = _value(reader, "tokenizer.chat_template", path, None)
    if isinstance(template, str):
        config["chat_template"] = template
    return tok, config


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a scored vocabulary (transformers' generate_merges)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def gpt2_byte_spelling() -> list[str]:
    """GPT-2's printable spelling of each byte value 0..255 (byte-level BPE vocabularies spell bytes so)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    spelling = dict(zip(bs, map(chr, cs)))
    return [spelling[b] for b in range(256)]
