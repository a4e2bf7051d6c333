"""Tiny GGUF files for tests/test_gguf.py and tests/test_gguf_kept.py: random transformers models of the
four architectures written as GGUF with the `gguf` package (scripts/gguf_write.py, shared with
scripts/bench_gguf.py), the gguf package's own dequantization of what was written, transformers' greedy
reference on the same file, and `tp generate` on it. conftest.py's session fixture `gguf_files`
builds FILES once for both modules.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from edge_runtime import cli as edge_cli
from hf_random import randomize_norms_and_biases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gguf_write  # noqa: E402  (scripts/gguf_write.py: the GGUF writer shared with scripts/bench_gguf.py)

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tensors!",
          "Edge devices fold large language models into small pieces.", "naïve café — 12345 ümlaut"] * 4
TEXTS = ["Hello world", "The lazy fox, jumps!", " leading space", "café 42\nnew line"]
PROMPT = [5, 77, 31, 190, 2, 64, 123]
N_NEW = 10
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-5,
             rope_theta=5000.0)
BLOCK = gguf_write.BLOCK
SPM_ARCHS = ("llama", "phi3")  # SentencePiece vocabularies; qwen2 / qwen3: byte-level BPE


# --------------------------------------------------------------------------- building GGUF files

def spm_vocab():
    """A SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces from a BPE trained on CORPUS."""
    from tokenizers import SentencePieceBPETokenizer
    t = SentencePieceBPETokenizer()
    t.train_from_iterator(CORPUS, vocab_size=120, min_frequency=1, show_progress=False)
    pieces = [p for p, _ in sorted(t.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [p for p in pieces if p not in tokens]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def bpe_vocab():
    """A byte-level BPE vocabulary and merges trained on CORPUS, with <|endoftext|> as a control token."""
    from tokenizers import ByteLevelBPETokenizer
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False,
                          special_tokens=["<|endoftext|>"])
    model = json.loads(t._tokenizer.to_str())["model"]
    tokens = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if p == "<|endoftext|>" else 1 for p in tokens]
    return tokens, merges, types


def write_gguf(path, arch, hf, qtype, tokenizer=True, drop=(), shape_override=None, name="tiny"):
    """`hf` as GGUF `path` (scripts/gguf_write.py): every 2-D tensor `qtype`, norms and biases F32, the llama and
    phi3 archs with spm_vocab() (phi3 with a padding id, as its config has one) and the qwen2 / qwen3 ones with
    bpe_vocab() unless tokenizer is False. Returns {gguf name: (stored array, type)}."""
    tok = None
    if tokenizer and arch in SPM_ARCHS:
        tokens, scores, types = spm_vocab()
        tok = dict(model="llama", tokens=tokens, scores=scores, types=types, bos=1, eos=2, unk=0,
                   pad=0 if arch == "phi3" else None)
    elif tokenizer:
        tokens, merges, types = bpe_vocab()
        eot = tokens.index("<|endoftext|>")
        tok = dict(model="gpt2", pre="qwen2", tokens=tokens, types=types, merges=merges, eos=eot, bos=eot,
                   add_bos=False)
    if tok:
        tok["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return gguf_write.write_gguf(path, arch, hf.config.to_dict(), gguf_write.from_state_dict(hf.state_dict()), qtype,
                                 tokenizer=tok, drop=drop, shape_override=shape_override, name=name)


def tiny_hf(arch, vocab, tie=False, seed=0):
    """A tiny random transformers model of `arch`. Qwen3's head_dim is 128 (not hidden / heads = 16), so our
    reader takes it from attention.key_length; transformers' GGUF config for qwen3 reads no head size and
    takes Qwen3Config's default, 128, as real Qwen3 files have it. Phi-3 ids within the small vocabulary."""
    torch.manual_seed(seed)
    extra = {"qwen3": dict(head_dim=128),
             "phi3": dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, original_max_position_embeddings=256)}
    cls, cfg_cls = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"), "phi3": ("Phi3ForCausalLM", "Phi3Config")}[arch]
    hf = getattr(transformers, cls)(getattr(transformers, cfg_cls)(vocab_size=vocab, tie_word_embeddings=tie,
                                                                   **SHAPE, **extra.get(arch, {}))).eval()
    return randomize_norms_and_biases(hf)


FILES = (("llama", Q.F32, False), ("llama", Q.Q8_0, False), ("llama", Q.Q4_0, False),
         ("qwen2", Q.F16, True), ("qwen2", Q.Q8_0, True), ("qwen2", Q.BF16, True),
         ("qwen3", Q.F16, True), ("qwen3", Q.Q8_0, True), ("qwen3", Q.Q4_0, False),
         ("phi3", Q.F32, False), ("phi3", Q.Q8_0, False), ("phi3", Q.Q4_0, False))


def build_files(root: Path) -> dict:
    """(arch, qtype name) -> (gguf path, {gguf name: (stored array, type)}) for every FILES entry, under root."""
    out = {}
    n_spm, n_bpe = len(spm_vocab()[0]), len(bpe_vocab()[0])
    for arch, qtype, tie in FILES:
        hf = tiny_hf(arch, n_spm if arch in SPM_ARCHS else n_bpe, tie)
        d = root / f"{arch}-{qtype.name}"
        d.mkdir()
        path = d / "tiny.gguf"
        out[arch, qtype.name] = (path, write_gguf(path, arch, hf, qtype))
    return out


def reference_greedy(path, n_new=N_NEW):
    """transformers' greedy ids for the model in GGUF `path`: its config from AutoConfig(gguf_file=...), its
    weights from transformers' own GGUF loader (load_gguf_checkpoint: name map, un-permutation and
    gguf.quants.dequantize; AutoModelForCausalLM.from_pretrained(gguf_file=...) does the same, but needs
    `accelerate`)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict({k: torch.as_tensor(v).float() for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    hf.tie_weights()
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(n_new):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):], hf


def generate(path, tmp_path, capsys, world=1):
    argv = ["tp", "generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-new-tokens", str(N_NEW), "--ignore-eos", "--json", "--cache-dir", str(tmp_path / "cache"),
            "--world-size", str(world)]
    assert edge_cli.main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def hf_of(g, arch):
    """Our reading of GGUF tensor name `g` as a Hugging Face one (Phi-3's ffn_up is its fused gate_up_proj)."""
    if not g.startswith("blk."):
        return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}[g]
    _, i, mod, kind = g.split(".")
    inverse = {v: k for k, v in {**gguf_write.BLOCK, **gguf_write.BLOCK_QWEN3}.items()}
    if arch == "phi3":
        inverse.update({v: k for k, v in gguf_write.BLOCK_PHI3.items()})
    return f"model.layers.{i}.{inverse[mod]}.{kind}"


def gguf_dequantized(written, g, config):
    """The gguf package's dequantization of written tensor `g`, float32, llama.cpp's q / k permutation undone."""
    stored, qtype = written[g]
    want = dequantize(stored, qtype).astype(np.float32)
    module = g.split(".")[2] if g.startswith("blk.") else None
    n = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(module)
    return gguf_unpermute(want, n) if config["model_type"] == "llama" and n else want


def gguf_unpermute(a, n):
    d = a.shape[0] // n // 2
    return np.ascontiguousarray(a.reshape(n, d, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


