"""A llama.cpp GGUF file read as a Hugging Face checkpoint: config.json, HF-named tensors, tokenizer.

    g = read_gguf("model.gguf")          # GGUFModel: metadata parsed and checked, no tensor read yet
    g.config                             # the config.json dict (model_type llama / qwen2 / qwen3 / phi3)
    g.tokenizer                          # a tokenizers.Tokenizer built from tokenizer.ggml.* metadata
    g.tokenizer_config, g.generation_config
    g.types                              # {"Q8_0": 14, "F32": 5}: the GGUF tensor types found
    source = g.source()                  # GGUFTensors: a split.llama.checkpoint TensorSource
    source.read(Source("model.layers.0.self_attn.q_proj.weight"), rows=(0, 64))   # float32, dequantized
    source.read_stored(src, Int4(32))    # a Q4_0 projection's integers as they are (see KEPT)
    source.write_index(folder)           # FOLDER_INDEX: what tensor_source(folder) reads the file by

Architectures ("general.architecture"): "llama" (also Mistral: llama.cpp writes it as llama; read as
model_type "llama", i.e. without a sliding window, as llama.cpp runs it), "qwen2", "qwen3", "phi3".
GGUFTensors reads one tensor at a time straight from the file (only the rows asked for; columns in
whole blocks), and dequantizes it with the `gguf` package's own `gguf.quants.dequantize` to float32
(bfloat16 where the file holds only BF16 tensors, exactly as stored): no float copy of the model is
written anywhere, and memory holds about one tensor. llama.cpp's converter permutes the rows of the q
and k projections of "llama" models for its RoPE layout; the inverse permutation is applied here (as
transformers' GGUF loader does), by reading the rows in our order. Qwen3's attn_q_norm / attn_k_norm
are its q_norm / k_norm; Phi-3's fused attn_qkv / ffn_up are Hugging Face's qkv_proj / gate_up_proj
as they are (rows q | k | v, gate | up).

Two GGUF types also map onto a split.llama.quantize stored form keeping their integers (KEPT), so a
projection quantized by llama.cpp need not be requantized from its dequantized floats: Q4_0 onto
int4 group 32 (q4_0_as_int4) and Q8_0 onto group-wise int8, group 32 (int8g, q8_0_as_int8); Phi-3's
fused tensors too, a part's rows read on their own. The one difference from llama.cpp's weights is
the scale d: fp16 in the file, bf16 for our kernels.

Tokenizers: gguf_tokenizer.py builds them from the tokenizer.ggml.* metadata.

Every problem is a ValueError naming the file and the key or tensor: not a GGUF or truncated, an
unknown architecture, a missing key, a tensor whose shape disagrees with the metadata, LongRoPE or
another rope scaling the model cannot run, a file changed since its folder index was written.
Nothing here imports transformers.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, KeysView

import numpy as np
import torch

from .families import Source
from .gguf_tokenizer import build_tokenizer

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}  # GGUF arch -> model_type
FOLDER_INDEX = "gguf_tensors.json"  # in a model folder: its tensors are read from this GGUF file (GGUFTensors)

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



@dataclass
class GGUFModel:
    path: Path
    arch: str
    config: dict  # config.json
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict
    generation_config: dict
    types: dict[str, int]  # GGUF tensor type name -> how many tensors have it
    dtype: torch.dtype  # what its tensors are read as
    _reader: Any = field(repr=False, default=None)
    _names: dict[str, str] = field(repr=False, default_factory=dict)  # GGUF tensor name -> HF name

    def source(self) -> GGUFTensors:
        """Its tensors under Hugging Face names, each read from the file when asked for (from the
        reader's table: offsets, types and shapes; no tensor data is read here)."""
        heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.config["num_key_value_heads"]}
        entries = {}
        for t in self._reader.tensors:
            hf = self._names.get(t.name)
            if hf is None:
                continue
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
            entries[hf] = Entry(t.name, t.tensor_type.name, tuple(reversed([int(n) for n in t.shape])),
                                int(t.data_offset), int(t.n_bytes), heads.get(kind) if self.arch == "llama" else None)
        return GGUFTensors(self.path, entries, self.dtype)


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a GGUF file."""
    gguf: str  # llama.cpp's name, for messages
    type: str  # its GGUF type name: "Q4_0", "F32", ...
    shape: tuple[int, ...]  # (rows, columns) or (n,): torch's order, the file's reversed
    offset: int  # of its first byte in the file
    n_bytes: int
    heads: int | None = None  # llama's q / k: rows permuted by llama.cpp within this many heads


class GGUFTensors:
    """A GGUF file's tensors under Hugging Face names: a split.llama.checkpoint TensorSource. Each read
    opens the file, reads the rows asked for (one span) and dequantizes them, columns in whole blocks,
    with gguf.quants.dequantize; nothing stays mapped, so memory holds about what one read returns."""

    def __init__(self, file: str | Path, entries: dict[str, Entry], dtype: torch.dtype):
        self.where, self.entries, self.dtype = Path(file), entries, dtype

    @classmethod
    def from_folder(cls, folder: str | Path) -> GGUFTensors:
        """What write_index left in `folder`, checked against the file it names (the same size and mtime)."""
        folder = Path(folder)
        again = "open the .gguf file again for a new folder (edge_runtime.tp.gguf_source.model_folder; --model FILE.gguf)"
        try:
            info = json.loads((folder / FOLDER_INDEX).read_text())
            file = Path(info["file"])
            entries = {name: Entry(**{**e, "shape": tuple(e["shape"])}) for name, e in info["tensors"].items()}
        except (ValueError, KeyError, TypeError) as err:  # not JSON, a key missing or unknown
            raise ValueError(f"{folder / FOLDER_INDEX}: not a GGUF tensor index ({type(err).__name__}: {err}); "
                             f"{again}") from None
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: its tensors are read from {file}, which no longer exists; {again}")
        st = file.stat()
        if (st.st_size, st.st_mtime_ns) != (info["size"], info["mtime_ns"]):
            raise ValueError(f"{file}: changed (size or mtime) since {folder} indexed its tensors; {again}")
        if info["dtype"] not in ("float32", "bfloat16"):
            raise ValueError(f"{folder / FOLDER_INDEX}: dtype {info['dtype']!r} is not float32 or bfloat16")
        return cls(file, entries, getattr(torch, info["dtype"]))

    def write_index(self, folder: str | Path) -> None:
        """FOLDER_INDEX in `folder`: the file (its size and mtime, checked by from_folder) and every
        tensor's entry, a few lines each, which tensor_source(folder) reads instead of the GGUF header."""
        st = self.where.stat()
        info = {"file": str(self.where.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "dtype": str(self.dtype).removeprefix("torch."),
                "tensors": {name: asdict(e) for name, e in self.entries.items()}}
        (Path(folder) / FOLDER_INDEX).write_text(json.dumps(info, indent=1))

    def names(self) -> KeysView[str]:
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def read(self, src: Source, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Our parameter from tensor src.name (its rows src.rows in a fused one): all of it, or its rows
        [a, b) / columns [a, b), dequantized to float32 (self.dtype), llama's q / k rows un-permuted."""
        e = self._entry(src.name)
        span = src.span(*rows) if rows else src.rows
        order = self._order(e)
        if len(e.shape) == 1:  # a norm or a bias, one "row" in the file: read whole, then its elements
            w = self._dequantized(e, np.zeros(1, np.int64))[0][order]  # (n,)
            w = w[slice(*span)] if span else w
        else:
            w = self._dequantized(e, order[slice(*span)] if span else order, cols)  # (rows, columns)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(self.dtype)

    def kept(self, fmt) -> set[str]:
        """The projections (HF weight names) whose integers this file holds in the stored form of `fmt`
        (a split.llama.quantize handler, or None): its Q4_0 ones for int4 group 32, Q8_0 for int8g group 32."""
        qtype = kept_type(fmt)
        return {n for n, e in self.entries.items() if e.type == qtype and n.endswith("_proj.weight")}

    def read_stored(self, src: Source, fmt) -> dict[str, torch.Tensor]:
        """Our projection (rows src.rows of a fused tensor) in the stored form of `fmt`, its integers as
        the file has them (KEPT); llama's q / k rows un-permuted (whole rows move, blocks run along rows)."""
        e = self._entry(src.name)
        if src.name not in self.kept(fmt):
            raise ValueError(f"{self.where}: tensor {e.gguf!r} ({e.type}) holds no integers to keep as {fmt.name}")
        order = self._order(e)
        rows = order[slice(*src.rows)] if src.rows else order
        return KEPT[e.type][1](self._bytes(e, rows), len(rows), e.shape[1])

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise ValueError(f"{self.where}: no tensor {name!r} in this GGUF file")
        return self.entries[name]

    @staticmethod
    def _order(e: Entry) -> np.ndarray:
        """Our row i is the file's row order[i] (llama's q / k: llama.cpp's permutation undone)."""
        order = np.arange(e.shape[0])
        return unpermute(order, e.heads) if e.heads else order

    def _bytes(self, e: Entry, rows: np.ndarray) -> np.ndarray:
        """The file's bytes of rows `rows` of tensor e, in that order: (len(rows), bytes per row) uint8,
        read as the one span they lie in (for llama's q / k, within the same heads)."""
        row_bytes = e.n_bytes // (e.shape[0] if len(e.shape) == 2 else 1)
        if len(rows) == 0:
            return np.zeros((0, row_bytes), np.uint8)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        with open(self.where, "rb") as f:
            f.seek(e.offset + lo * row_bytes)
            raw = np.fromfile(f, np.uint8, (hi - lo) * row_bytes)
        if raw.size != (hi - lo) * row_bytes:
            raise ValueError(f"{self.where}: tensor {e.gguf!r} ends past the end of the file (truncated?)")
        raw = raw.reshape(hi - lo, row_bytes)
        return raw if np.array_equal(rows, np.arange(lo, hi)) else raw[rows - lo]

    def _dequantized(self, e: Entry, rows: np.ndarray, cols: tuple[int, int] | None = None) -> np.ndarray:
        """Columns [a, b) (default all) of rows `rows` of tensor e, float32 (len(rows), b - a): the bytes of
        the blocks that hold them, dequantized by gguf.quants.dequantize."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType[e.type]
        block, size = GGML_QUANT_SIZES[qtype]  # elements per block, bytes per block
        a, b = cols or (0, e.shape[-1])
        first, end = a // block, -(-b // block)  # the blocks holding columns [a, b)
        raw = self._bytes(e, rows)[:, first * size:end * size]
        if raw.shape[0] == 0:
            return np.zeros((0, b - a), np.float32)
        try:
            w = dequantize(np.ascontiguousarray(raw), qtype)
        except Exception as err:  # a type the package cannot dequantize, a short tensor: name it
            raise ValueError(f"{self.where}: cannot dequantize tensor {e.gguf!r} ({e.type}): {err}") from None
        return w[:, a - first * block:b - first * block]


def q4_0_as_int4(data: np.ndarray, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
    """A Q4_0 tensor's bytes (each row n_in/32 blocks of 18 bytes: fp16 d, then 16 bytes whose low
    nibbles are elements 0..15 and high nibbles 16..31; w = d * (q - 8)) in split.llama.quantize's int4
    stored form with group 32 (w = (q - 8) * scales + zeros, columns 2j / 2j+1 in a byte's low / high
    nibble): the same integers q, scales = d rounded to bf16 (the kernel's dtype), zeros = 0. The
    only difference from llama.cpp's weights is that rounding: at most 8 * |d - bf16(d)| <= |d| / 32."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(n_out, n_in // 32, 18)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # (out, in/32)
    qs = blocks[..., 2:]  # (out, in/32, 16): byte i holds elements i (low nibble) and 16 + i (high)
    even, odd = qs[..., 0::2], qs[..., 1::2]  # (out, in/32, 8) each
    # our byte j holds elements 2j (low) and 2j + 1 (high): j < 8 from low nibbles, j >= 8 from high ones
    packed = np.concatenate(((even & 15) | (odd << 4), (even >> 4) | (odd & 0xF0)), axis=-1)  # (out, in/32, 16)
    scales = torch.from_numpy(d.astype(np.float32)).to(torch.bfloat16)
    return {"weight": torch.from_numpy(packed.reshape(n_out, n_in // 2)), "scales": scales,
            "zeros": torch.zeros_like(scales)}


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


def kept_type(fmt) -> str | None:
    """The GGUF type whose integers `fmt` (a split.llama.quantize handler, or None) keeps as they are, if any."""
    d = fmt.to_dict() if fmt is not None else None
    return next((qtype for qtype, (scheme, _) in KEPT.items() if d == {"scheme": scheme, "group_size": 32}), None)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q / k rows (per head: interleaved -> halves); on
    np.arange(rows), the file's row behind each of ours."""
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
    """Parse and check a GGUF file's metadata and tensor table (tensors are read by .source())."""
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
        window = _value(reader, f"{arch}.attention.sliding_window", path, 0)
        if type(window) is not int or window < 0:
            raise ValueError(f"{path}: GGUF metadata '{arch}.attention.sliding_window' must be an integer >= 0, "
                             f"got {window!r}")
        config["sliding_window"] = window or None  # llama.cpp writes 0 for none (Phi-4, and Phi-3 without one)
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

    tokenizer, tok_config = build_tokenizer(lambda key, default=..., kind=None: _value(reader, key, path, default, kind),
                                            path, arch)
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
