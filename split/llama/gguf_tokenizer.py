"""A GGUF file's tokenizer, built with `tokenizers` from its tokenizer.ggml.* metadata, as transformers'
GGUF loader builds it: "gpt2" (byte-level BPE: tokens + merges, the split regex from
`tokenizer.ggml.pre`) and "llama" (SentencePiece BPE: tokens + scores, merges from the file or derived
from the scores, byte fallback; Phi-3's prefix-space normalizer). Anything else is refused by name.

    tok, tokenizer_config = build_tokenizer(value, path, arch)   # gguf_checkpoint.read_gguf calls it
    gpt2_byte_spelling()                                       # the printable spelling of bytes 0..255
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_MODELS = ("gpt2", "llama")

# The split regex of a byte-level vocabulary, by tokenizer.ggml.pre (as transformers' GGUF loader has them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def build_tokenizer(value, path: Path, arch: str):
    """(tokenizers.Tokenizer, tokenizer_config.json dict) from tokenizer.ggml.* metadata; value(key,
    default=..., kind=None) reads one key of the file (a missing key without a default is a ValueError)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = value("tokenizer.ggml.model", kind=str)
    if model not in TOKENIZER_MODELS:
        raise ValueError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: "
                         f"{', '.join(TOKENIZER_MODELS)})")
    tokens = value("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens must be a non-empty list of strings")
    types = value("tokenizer.ggml.token_type", None) or []
    merges = value("tokenizer.ggml.merges", None)

    def token(k):
        i = value(f"tokenizer.ggml.{k}", None)
        if i is not None and not 0 <= int(i) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{k} {i} is not a token id (vocabulary of {len(tokens)})")
        return None if i is None else tokens[int(i)]

    bos, eos, unk, pad = (token(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    add_bos = value("tokenizer.ggml.add_bos_token", None)
    vocab = {t: i for i, t in enumerate(tokens)}
    if model == "gpt2":
        if merges is None:
            raise ValueError(f"{path}: tokenizer.ggml.merges is required for tokenizer.ggml.model 'gpt2'")
        spelling = gpt2_byte_spelling()
        alphabet = set(spelling)
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = _SPLITS.get(value("tokenizer.ggml.pre", None))
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
            scores = value("tokenizer.ggml.scores", None)
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
    template = value("tokenizer.chat_template", None)
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
