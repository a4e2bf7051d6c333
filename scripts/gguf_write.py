"""Writing a Llama / Qwen2 / Qwen3 / Phi-3 checkpoint as a GGUF file with the `gguf` package
(gguf.GGUFWriter, gguf.quants.quantize), as llama.cpp's convert_hf_to_gguf.py lays it out: llama.cpp's
tensor names (gguf.constants.TENSOR_NAMES: Qwen3's q_norm / k_norm as attn_q_norm / attn_k_norm,
Phi-3's fused qkv_proj / gate_up_proj as attn_qkv / ffn_up, as they are), its q/k row permutation for
"llama" (LlamaModel.permute, done here independently of split.llama.gguf_checkpoint, so the tests check
one against the other), norms and biases F32, and its metadata per architecture (head_dim as
attention.key_length / value_length where the config has one, TextModel; Phi-3's rope dimension count
partial_rotary_factor * hidden / heads, its original context length and sliding window, 0 for none,
Phi3MiniModel).

    from gguf_write import write_gguf, from_state_dict, from_safetensors
    write_gguf(path, "llama", config_dict, from_state_dict(model.state_dict()), Q.Q8_0, tokenizer=...)

Used by tests/test_gguf.py (tiny random models, with `tests` importing it from scripts/) and by
scripts/bench_gguf.py (the 1.1B shape). Tensors are streamed: every tensor's type and size go into the
header first, then each is read, permuted, quantized and written on its own, so writing needs about one
tensor in memory (plus what `keep=True` returns).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from split.llama.gguf_tokenizer import gpt2_byte_spelling  # a fixed table: the tests check tokenizers against transformers

BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
BLOCK_QWEN3 = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
BLOCK_PHI3 = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # fused, rows as they are
ALL_BLOCK = {**BLOCK, **BLOCK_QWEN3, **BLOCK_PHI3}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}

# (Hugging Face name, shape, load() -> the tensor as a float numpy array)
Tensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def llama_permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, i, rest = hf_name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{ALL_BLOCK[module]}.{kind}"
    return TOP[hf_name]


def _order(hf_name: str):  # llama.cpp's order: token_embd, blk.0 .. blk.N-1, output_norm, output
    if hf_name.startswith("model.layers."):
        _, _, i, rest = hf_name.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        return (1, int(i), list(ALL_BLOCK).index(module), rest)
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(hf_name, 3), 0, 0, hf_name)


def from_state_dict(sd) -> list[Tensor]:
    """A torch state dict as write_gguf's tensors (float32 arrays)."""
    return [(k, tuple(t.shape), (lambda t=t: t.detach().float().numpy())) for k, t in sd.items()]


def from_safetensors(folder: str | Path) -> list[Tensor]:
    """A Hugging Face folder's *.safetensors as write_gguf's tensors, in llama.cpp's order; shapes from the
    headers, each tensor read (as float32) only when it is written."""
    from safetensors import safe_open
    out = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                def load(f=f, k=k):
                    with safe_open(f, framework="pt") as s:
                        return s.get_tensor(k).float().numpy()
                out.append((k, tuple(st.get_slice(k).get_shape()), load))
    return sorted(out, key=lambda t: _order(t[0]))


# --------------------------------------------------------------------------- tokenizer metadata

def minimal_gpt2_vocab(vocab_size: int) -> dict:
    """A byte-level BPE vocabulary of exactly vocab_size tokens: <|endoftext|> (control, bos = eos), the 256
    byte spellings, then two-byte tokens each made by one merge ("a b" -> "ab"), so every token is reachable."""
    alphabet = gpt2_byte_spelling()
    tokens = ["<|endoftext|>", *alphabet]
    n_pairs = vocab_size - len(tokens)
    if not 0 <= n_pairs <= 256 * 256:
        raise ValueError(f"a minimal byte-level vocabulary has 257 .. {257 + 65536} tokens, not {vocab_size}")
    order = [alphabet[ord(c)] if ord(c) < 256 else c for c in " etaoinsrhldcumfpgwybvkxjqz"] + alphabet
    order = list(dict.fromkeys(order))
    pairs = [(a, b) for a in order for b in order][:n_pairs]
    tokens += [a + b for a, b in pairs]
    return dict(model="gpt2", pre="default", tokens=tokens, types=[3] + [1] * (len(tokens) - 1),
                merges=[f"{a} {b}" for a, b in pairs], bos=0, eos=0, add_bos=False)


def vocab_from_tokenizer_json(path: str | Path) -> dict:
    """tokenizer.ggml.* metadata from a Hugging Face tokenizer.json with a BPE model: "llama" (SentencePiece
    BPE, scores -rank) if it falls back to <0xXX> byte tokens, else "gpt2" (byte-level BPE); added special
    tokens are control tokens. Only the vocabulary, merges and special ids carry over: a tokenizer.json whose
    pieces are reached without merges (ignore_merges) or that adds no BOS reads back tokenizing differently."""
    spec = json.loads(Path(path).read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: only a BPE tokenizer.json is written as GGUF metadata here, not {model.get('type')}")
    vocab = dict(model["vocab"])
    for t in spec.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    tokens = [t if t is not None else f"<unused{i}>" for i, t in enumerate(tokens)]
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    spm = bool(model.get("byte_fallback"))
    is_byte = [spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">") for t in tokens]
    types = [2 if t == "<unk>" else 3 if t in special else 6 if b else 1 for t, b in zip(tokens, is_byte)]
    out = dict(model="llama" if spm else "gpt2", tokens=tokens, types=types, merges=merges or None)
    if spm:
        out["scores"] = [0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)]
    else:
        out["pre"] = "default"
    for key, names in (("bos", ("<s>", "<|begin_of_text|>")), ("eos", ("</s>", "<|endoftext|>", "<|end_of_text|>")),
                       ("unk", ("<unk>",))):
        for n in names:
            if n in vocab:
                out[key] = vocab[n]
                break
    return out


def add_tokenizer(w, tok: dict) -> None:
    """tokenizer.ggml.* from a dict: model, tokens, types, scores / merges / pre (optional), bos / eos / unk / pad
    ids, add_bos, chat_template (optional)."""
    w.add_tokenizer_model(tok["model"])
    if tok.get("pre"):
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    if tok.get("scores") is not None:
        w.add_token_scores(tok["scores"])
    w.add_token_types(tok["types"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if tok.get(key) is not None:
            add(tok[key])
    if tok.get("add_bos") is not None:
        w.add_add_bos_token(tok["add_bos"])
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])


# --------------------------------------------------------------------------- the file

def add_hyperparameters(w, arch: str, cfg: dict) -> None:
    """{arch}.* metadata from a config.json dict, as convert_hf_to_gguf.py writes it for that architecture."""
    rope = cfg.get("rope_parameters") or {}
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "phi3":  # Phi3MiniModel
        rotary = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(rotary * cfg["hidden_size"]) // cfg["num_attention_heads"])
        w.add_rope_scaling_orig_ctx_len(cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"]))
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    elif arch == "qwen3":  # TextModel: the head size where the config has one, no rope dimension count
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    else:
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def write_gguf(path, arch: str, cfg: dict, tensors: Iterable[Tensor], qtype, tokenizer: dict | None = None,
               types: dict | None = None, drop=(), shape_override=None, name: str = "tiny", keep: bool = True,
               progress: bool = False) -> dict:
    """Write `tensors` (Hugging Face names) as GGUF `path` for `arch` (ARCHITECTURES). 1-D tensors are F32
    (as llama.cpp writes norms and biases); 2-D ones `types.get(gguf name, qtype)`. `tokenizer`: add_tokenizer's
    dict, or None for no tokenizer metadata ({arch}.vocab_size instead). drop / shape_override (gguf name ->
    rows kept): broken files for the tests. Returns {gguf name: (stored array, type)} if keep, else
    {gguf name: type}."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape, quantize
    from tqdm import tqdm

    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    types = types or {}
    tie = bool(cfg.get("tie_word_embeddings"))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    add_hyperparameters(w, arch, cfg)
    if tokenizer is not None:
        add_tokenizer(w, tokenizer)
    else:
        w.add_vocab_size(cfg["vocab_size"])

    plan = []  # (gguf name, load, permute heads, rows kept, type)
    for hf_name, shape, load in tensors:
        if hf_name == "lm_head.weight" and tie:
            continue
        g = gguf_name(hf_name)
        if g in drop:
            continue
        heads = None
        if arch == "llama" and ".attn_q." in g:
            heads = cfg["num_attention_heads"]
        elif arch == "llama" and ".attn_k." in g:
            heads = cfg["num_key_value_heads"]
        rows = (shape_override or {}).get(g)
        shape = (rows, *shape[1:]) if rows else tuple(shape)
        t = Q.F32 if len(shape) == 1 or qtype == Q.F32 else types.get(g, qtype)
        if t in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if t == Q.F32 else np.float16)
            w.add_tensor_info(g, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            w.add_tensor_info(g, shape, np.dtype(np.float32), int(np.prod(quant_shape_to_byte_shape(shape, t))),
                              raw_dtype=t)
        plan.append((g, load, heads, rows, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    written = {}
    for g, load, heads, rows, t in tqdm(plan, desc=f"write {Path(path).name}", unit="tensor", disable=not progress):
        a = load()
        if heads is not None:
            a = llama_permute(a, heads)
        if rows:
            a = a[:rows]
        a = np.ascontiguousarray(a)
        if t == Q.F32:
            data = a.astype(np.float32)
        elif t == Q.F16:
            data = a.astype(np.float16)
        else:
            data = quantize(a, t)
        w.write_tensor_data(data)
        written[g] = (data, t) if keep else t
        del a, data
    w.close()
    return written
