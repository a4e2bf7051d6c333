"""`--model FILE.gguf` (issue 22 item 3): a GGUF file as a small cached model folder whose tensors are read
straight from the file and dequantized by the `gguf` package, against the `gguf` package and transformers'
own GGUF loader.

    .venv/bin/python -m pytest -q tests/test_gguf.py

The GGUF files are written with gguf.GGUFWriter and gguf.quants.quantize (scripts/gguf_write.py, shared
with scripts/bench_gguf.py) from tiny random transformers models, under llama.cpp's tensor names and
with its q/k row permutation for "llama" (done there independently of split.llama.gguf_checkpoint):
Llama and Phi-3 files with a SentencePiece ("llama") tokenizer, Qwen2 and Qwen3 ones with a byte-level
BPE ("gpt2") tokenizer; Qwen3's q_norm / k_norm as attn_q_norm / attn_k_norm, Phi-3's fused qkv_proj /
gate_up_proj as attn_qkv / ffn_up, as llama.cpp's convert_hf_to_gguf writes them. Checks:
- the model folder holds no weights (config, tokenizer files and the tensor index only), and every
  tensor read through it equals gguf.quants.dequantize of the file's tensor (inverse permutation
  applied), for F32, F16, BF16, Q8_0 and Q4_0; a read of some rows or columns equals the whole tensor
  sliced; config values are the metadata's;
- a folder whose GGUF file changed or is gone refuses to read it, saying what to do;
- greedy generation of `tp generate --model tiny.gguf --json` equals transformers' greedy generation
  of AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (the same dequantized weights, fp32)
  token for token, for F32, F16 and Q8_0 files of the four architectures, world size 1 (and 2 with a
  real worker for one file);
- our tokenizer.json encodes and decodes like AutoTokenizer.from_pretrained(dir, gguf_file=...);
- a truncated file, an unknown architecture, a tensor shape that disagrees with the metadata, missing
  tokenizer metadata: a ValueError naming it;
- q4_0 kept: `tp prepare --model q4_0.gguf --quantize int4 --group-size 32` stores every Q4_0
  projection with the file's integer codes, scale d rounded fp16 -> bf16 and zero 0 (its dequantization
  within 8 * |d - bf16(d)| <= |d| / 32 of gguf's, per block), `tp generate --quantize int4` on it equals
  our one-process int4 model built from those tensors, and `--quantize int8` (or int4 g64) requantizes
  from the floats and says so;
- q8_0 kept: a Q8_0 projection reads as group-wise int8, group 32 (the file's int8 codes, scale d
  rounded fp16 -> bf16, within |q| * |d - bf16(d)| <= 127 * 2^-8 * |d| < |d| / 2 of gguf's
  dequantization per weight); `prepare` at world size 2 with the kept format takes every projection as
  stored (Phi-3's fused ones as their parts' rows), each rank's slice in whole groups; `tp generate
  --shards` on int8g shards (world size 1) equals our one-process int8g model built from the gguf
  package's dequantization, token for token; int8 (per channel) or int4 on a Q8_0 file, and int8g on a
  Q4_0 one, requantize from the floats.
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from edge_runtime import cli as edge_cli  # noqa: E402
from edge_runtime.tp.gguf_source import model_folder  # noqa: E402
from hf_random import randomize_norms_and_biases  # noqa: E402
from split.llama import Source  # noqa: E402
from split.llama.gguf_checkpoint import read_gguf  # noqa: E402

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


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(arch, qtype name) -> (gguf path, {gguf name: (stored array, type)}) for every FILES entry."""
    root = tmp_path_factory.mktemp("gguf")
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


# --------------------------------------------------------------------------- tests

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


@pytest.mark.parametrize("key", [(arch, qtype.name) for arch, qtype, _ in FILES])
def test_tensors_read_from_the_gguf_equal_its_dequantization(files, tmp_path, key):
    """The model folder holds no weights, only config / tokenizer files and the tensor index (a few KiB); every
    tensor read through it (tensor_source) is the gguf package's dequantization of the file's tensor, for F32,
    F16, BF16, Q8_0 and Q4_0, Qwen3's q_norm / k_norm and Phi-3's fused qkv / gate_up included."""
    from split.llama.checkpoint import tensor_source
    from split.llama.gguf_checkpoint import FOLDER_INDEX
    path, written = files[key]
    folder = model_folder(path, tmp_path, progress=False, log=lambda m: None)
    assert sorted(f.name for f in folder.iterdir()) == sorted(
        ["config.json", "generation_config.json", "gguf.json", FOLDER_INDEX, "tokenizer.json", "tokenizer_config.json"])
    assert sum(f.stat().st_size for f in folder.iterdir() if f.name != "tokenizer.json") < 32 * 1024
    source = tensor_source(folder)
    config = json.loads((folder / "config.json").read_text())
    assert set(source.names()) == {hf_of(g, key[0]) for g in written}
    for g in written:
        name = hf_of(g, key[0])
        got = source.read(Source(name))
        assert got.dtype == torch.float32  # norms are F32 in every file here: float32 throughout
        assert torch.equal(got, torch.from_numpy(gguf_dequantized(written, g, config))), name
    assert config["model_type"] == key[0] and config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["rope_theta"] == 5000.0 and config["rms_norm_eps"] == pytest.approx(1e-5)
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] == (key in TIED)
    assert config["max_position_embeddings"] == 256 and config["intermediate_size"] == 128
    assert config["head_dim"] == (128 if key[0] == "qwen3" else 16)
    if key[0] == "phi3":  # llama.cpp writes sliding_window 0 for none
        assert config["sliding_window"] is None and config["partial_rotary_factor"] == 1.0


TIED = {(arch, qtype.name) for arch, qtype, tie in FILES if tie}


@pytest.mark.parametrize("key", [("llama", "Q4_0"), ("phi3", "Q8_0"), ("qwen3", "Q4_0"), ("qwen2", "BF16")])
def test_rows_and_columns_read_alone_equal_the_whole_tensor_sliced(files, tmp_path, key):
    """A read of rows [a, b) or columns [a, b) (not on block boundaries) takes only those from the file and equals
    the whole tensor sliced: llama's un-permuted q / k rows, a fused Phi-3 tensor's part (hf_source), a bias."""
    from split.llama import LlamaConfig, hf_source
    from split.llama.checkpoint import tensor_source
    path, _ = files[key]
    folder = model_folder(path, tmp_path, progress=False, log=lambda m: None)
    source, config = tensor_source(folder), LlamaConfig.from_dir(folder)
    names = ["layers.1.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight", "layers.1.mlp.up_proj.weight",
             "layers.0.self_attn.o_proj.weight", "lm_head.weight" if key not in TIED else "embed_tokens.weight"]
    names += ["layers.1.self_attn.k_proj.bias"] if key[0] == "qwen2" else []
    for name in names:
        src = hf_source(config, name)
        whole = source.read(src)
        if key[0] == "phi3" and "proj" in name and "o_proj" not in name:  # rows of the fused tensor
            assert src.rows is not None and torch.equal(whole, source.read(Source(src.name))[slice(*src.rows)])
        for rows in ((3, 29), (0, whole.shape[0]), (whole.shape[0] - 5, whole.shape[0])):
            assert torch.equal(source.read(src, rows=rows), whole[slice(*rows)]), (name, rows)
        if whole.ndim == 2:
            for cols in ((5, 45), (32, 64), (0, 1)):
                assert torch.equal(source.read(src, cols=cols), whole[:, slice(*cols)]), (name, cols)


def test_a_changed_or_missing_gguf_file_is_refused_by_its_folder(files, tmp_path):
    """The folder reads tensors from the file it indexed: a changed file (size or mtime) or a missing one is an
    error saying to open the .gguf again, and model_folder then makes a new folder (a new cache key); a folder
    of an older layout is made again; load_llama given the .gguf file itself says which folder to give."""
    from split.llama import load_llama
    from split.llama.checkpoint import tensor_source
    from split.llama.gguf_checkpoint import FOLDER_INDEX
    path, _ = files["qwen2", "F16"]
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    folder = model_folder(copy, tmp_path / "cache", progress=False, log=lambda m: None)
    load_llama(folder)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / FOLDER_INDEX).write_text("{}")
    with pytest.raises(ValueError, match=f"{FOLDER_INDEX}: not a GGUF tensor index .*open the .gguf file again"):
        tensor_source(damaged)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"copy.gguf: changed \(size or mtime\) since .* open the .gguf file again"):
        tensor_source(folder)
    again = model_folder(copy, tmp_path / "cache", progress=False, log=lambda m: None)
    assert again != folder and torch.equal(load_llama(again).lm_head.weight, load_llama(again).embed_tokens.weight)
    info = json.loads((again / "gguf.json").read_text())
    (again / "gguf.json").write_text(json.dumps({**info, "layout": 3}))
    logged = []
    assert model_folder(copy, tmp_path / "cache", progress=False, log=logged.append) == again
    assert json.loads((again / "gguf.json").read_text())["layout"] == info["layout"] and "cached" not in logged[0]
    with pytest.raises(ValueError, match="copy.gguf: a GGUF file, not a model folder.*model_folder"):
        load_llama(copy)
    copy.unlink()
    with pytest.raises(FileNotFoundError, match="copy.gguf, which no longer exists; open the .gguf file again"):
        load_llama(again)


@pytest.mark.parametrize("key", [("llama", "F32"), ("qwen2", "F16"), ("llama", "Q8_0"), ("qwen2", "Q8_0"),
                                 ("qwen3", "Q8_0"), ("phi3", "Q8_0"), ("phi3", "F32")])
def test_generate_matches_transformers_on_the_same_gguf(files, tmp_path, capsys, key):
    path, _ = files[key]
    want, _ = reference_greedy(path)
    result, err = generate(path, tmp_path, capsys)
    assert result["token_ids"] == want
    assert "GGUF tensor types" in err and key[1] in err and "dequantized" in err


def test_generate_world_size_2_with_a_worker(files, tmp_path, capsys):
    path, _ = files["qwen2", "Q8_0"]
    want, _ = reference_greedy(path)
    result, _ = generate(path, tmp_path, capsys, world=2)
    assert result["token_ids"] == want and result["world_size"] == 2


@pytest.mark.parametrize("key", [("llama", "F32"), ("qwen2", "F16"), ("qwen3", "F16"), ("phi3", "F32")])
def test_tokenizer_matches_transformers(files, tmp_path, key):
    from tokenizers import Tokenizer
    path, _ = files[key]
    folder = model_folder(path, tmp_path, progress=False, log=lambda m: None)
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ref.eos_token_id


def q4_0_expected(stored, n_rows_heads=None):
    """What our int4 group-32 stored form of a Q4_0 tensor must be, from the gguf package: the integer codes
    q = dequantize(...) / d + 8 (exact: gguf computes d * (q - 8) in float32 from the fp16 d read here from
    each 18-byte block), scales = d rounded to bf16 (the int4 kernel's scale dtype), zeros = 0; packed two
    codes a byte, column 2j low; llama's q/k rows un-permuted (n_rows_heads). Also returns the gguf
    dequantization and d, un-permuted the same way."""
    want = dequantize(stored, Q.Q4_0).astype(np.float32)  # (out, in)
    n_out, n_in = want.shape
    d = np.ascontiguousarray(stored.reshape(n_out, n_in // 32, 18)[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if n_rows_heads:
        want, d = (gguf_unpermute(a, n_rows_heads) for a in (want, d))
    assert (d != 0).all()
    codes = want.reshape(n_out, n_in // 32, 32) / d[..., None]
    assert (codes == np.round(codes)).all() and codes.min() >= -8 and codes.max() <= 7
    q = torch.from_numpy((codes + 8).astype(np.uint8).reshape(n_out, n_in))
    scales = torch.from_numpy(d).to(torch.bfloat16)
    return ({"weight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales, "zeros": torch.zeros_like(scales)},
            torch.from_numpy(want), torch.from_numpy(d))


def gguf_unpermute(a, n):
    d = a.shape[0] // n // 2
    return np.ascontiguousarray(a.reshape(n, d, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


def q8_0_expected(stored, n_rows_heads=None):
    """What our int8g group-32 stored form of a Q8_0 tensor must be, from the gguf package: the integer codes
    q = dequantize(...) / d (exact: gguf computes q * d in float32 from the fp16 d read here from each 34-byte
    block, d first, gguf.quants.Q8_0), scales = d rounded to bf16 (the kernel's scale dtype), no zeros;
    llama's q/k rows un-permuted (n_rows_heads). Also returns the gguf dequantization and d, un-permuted."""
    want = dequantize(stored, Q.Q8_0).astype(np.float32)  # (out, in)
    n_out, n_in = want.shape
    d = np.ascontiguousarray(stored.reshape(n_out, n_in // 32, 34)[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if n_rows_heads:
        want, d = (gguf_unpermute(a, n_rows_heads) for a in (want, d))
    assert (d != 0).all()
    codes = want.reshape(n_out, n_in // 32, 32) / d[..., None]
    assert (codes == np.round(codes)).all() and codes.min() >= -127 and codes.max() <= 127
    q = torch.from_numpy(codes.astype(np.int8).reshape(n_out, n_in))
    return {"weight": q, "scales": torch.from_numpy(d).to(torch.bfloat16)}, torch.from_numpy(want), torch.from_numpy(d)


def projection_rows(module, config):
    """[(our projection, its rows [a, b))] of GGUF block tensor `module` ("attn_q", Phi-3's fused "attn_qkv"
    / "ffn_up": q | k | v and gate | up rows); [] for one that is not a projection (a norm)."""
    q = config["num_attention_heads"] * config["head_dim"]
    kv, inter = config["num_key_value_heads"] * config["head_dim"], config["intermediate_size"]
    if config["model_type"] == "phi3" and module in gguf_write.BLOCK_PHI3.values():
        return ([("self_attn.q_proj", (0, q)), ("self_attn.k_proj", (q, q + kv)), ("self_attn.v_proj", (q + kv, q + 2 * kv))]
                if module == "attn_qkv" else [("mlp.gate_proj", (0, inter)), ("mlp.up_proj", (inter, 2 * inter))])
    ours = {v: k for k, v in BLOCK.items()}.get(module, "")
    return [(ours, (0, None))] if ours.endswith("_proj") else []


def q4_0_projections(written, config, qtype=Q.Q4_0):
    """{our name "layers.i.self_attn.q_proj": (expected stored tensors, gguf dequantization, d)} for a Q4_0 file
    (or, with qtype Q8_0, a Q8_0 one); q/k rows un-permuted for llama, which llama.cpp permutes; Phi-3's fused
    tensors as their parts' rows."""
    expected = {Q.Q4_0: q4_0_expected, Q.Q8_0: q8_0_expected}[qtype]
    out = {}
    for g, (stored, t) in written.items():
        if t != qtype or not g.startswith("blk."):
            continue
        _, i, mod, _ = g.split(".")
        n = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(mod)
        for ours, (a, b) in projection_rows(mod, config):
            out[f"layers.{i}.{ours}"] = expected(stored[a:b], n if config["model_type"] == "llama" else None)
    return out


def test_prepare_int4_g32_keeps_the_q4_0_integers(files, tmp_path, capsys, monkeypatch):
    """Every projection of the prepared int4-g32 shards is the file's Q4_0 tensor with its integer codes
    as they are and scale d rounded fp16 -> bf16, zero 0: its dequantization is the gguf package's up to
    that rounding, |ours - gguf| <= 8 * |d - bf16(d)| <= |d| / 32 per block of 32 (bf16 keeps 8
    significant bits), and exactly codes * bf16(d)."""
    from edge_runtime.tp import gguf_source
    from split.llama.quantize import Int4
    monkeypatch.setattr(gguf_source, "DEFAULT_GGUF_CACHE", tmp_path / "cache" / "gguf")
    path, written = files["llama", "Q4_0"]
    out = tmp_path / "shards"
    assert edge_cli.main(["tp", "prepare", "--model", str(path), "--world-size", "1", "--quantize", "int4",
                          "--group-size", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Q4_0 projections keep their q4_0 integers" in err
    assert "int4-g32 weights taken as stored" in err and "self_attn.q_proj x2" in err and "mlp.down_proj x2" in err
    assert "quantized from floats: none" in err and "embeddings and LM head: int8 rows" in err
    config = json.loads((out / "rank0" / "config.json").read_text())
    expected = q4_0_projections(written, config)
    assert len(expected) == 14
    h = Int4(32)
    for name, (want_t, want, d) in expected.items():
        _, i, module = name.split(".", 2)
        block = load_file(out / "rank0" / f"layer{int(i):03d}.{'attn' if 'self_attn' in module else 'mlp'}.safetensors")
        got = {k: block[f"{module}.{k}"] for k in ("weight", "scales", "zeros")}
        for k in got:  # the same integer codes (and nibble order), bf16(d), zero 0
            assert torch.equal(got[k], want_t[k]), (name, k)
        w = h.dequantize(got).reshape(want.shape[0], -1, 32)
        bound = 8 * (d - d.to(torch.bfloat16).float()).abs()  # (out, in/32)
        assert ((w - want.reshape(w.shape)).abs() <= bound[..., None]).all(), name
        assert (bound <= d.abs() / 32).all()
        assert torch.equal(w, (want.reshape(w.shape) / d[..., None]) * d.to(torch.bfloat16).float()[..., None])


def test_generate_int4_q4_0_equals_our_one_process_model(files, tmp_path, capsys):
    """`tp generate --model q4_0.gguf --quantize int4` (world size 1) against our own one-process model whose
    projections are int4 modules built from the expected tensors (q4_0_expected: the gguf package's
    dequantization, not our mapping) and whose embeddings / LM head are int8 rows of the floats, as
    `tp prepare` stores them. Bitwise the same tensors through the same kernels, so token for token;
    transformers in fp32 would not do, as the int4 kernel multiplies bf16 activations."""
    from split.llama import generate as greedy
    from split.llama import load_llama
    from split.llama.quantize import Int4, Int8
    path, written = files["llama", "Q4_0"]
    folder = model_folder(path, tmp_path / "ref", progress=False, log=lambda m: None)
    model = load_llama(folder)
    h, table = Int4(32), Int8()
    for name, (t, _, _) in q4_0_projections(written, json.loads((folder / "config.json").read_text())).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, h.module(t))
    with torch.no_grad():
        model.lm_head = table.module(table.quantize(model.lm_head.weight))
        model.embed_tokens.weight.copy_(table.dequantize(table.quantize(model.embed_tokens.weight)))
        want = list(greedy(model, PROMPT, N_NEW))
    argv = ["tp", "generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
            str(N_NEW), "--ignore-eos", "--json", "--cache-dir", str(tmp_path / "cache"), "--quantize", "int4"]
    assert edge_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["token_ids"] == want
    assert "int4-g32 weights taken as stored" in captured.err


@pytest.mark.parametrize("quantize, world", [(["int8"], 2), (["int4", "--group-size", "64"], 1)])
def test_prepare_other_formats_requantize_q4_0(files, tmp_path, capsys, monkeypatch, quantize, world):
    from edge_runtime.tp import gguf_source
    monkeypatch.setattr(gguf_source, "DEFAULT_GGUF_CACHE", tmp_path / "cache" / "gguf")
    path, _ = files["llama", "Q4_0"]
    out = tmp_path / "shards"
    assert edge_cli.main(["tp", "prepare", "--model", str(path), "--world-size", str(world), "--quantize", *quantize,
                          "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Q4_0" in err and "F32" in err and "dequantized" in err and "requantized" in err
    assert "taken as stored" not in err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["extra"]["quantize"]["scheme"] == quantize[0]
    assert (out / "rank0" / "tokenizer.json").is_file()
    assert (out / f"rank{world - 1}" / "layer001.mlp.safetensors").is_file()


# --------------------------------------------------------------------------- bad input

def test_truncated_file(files, tmp_path):
    path, _ = files["llama", "Q8_0"]
    data = path.read_bytes()
    for cut in (len(data) - 100, 2000, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{bad.name}.*(truncated|damaged)"):
            read_gguf(bad)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(notgguf)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "gpt.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture 'gpt2' is not supported"):
        read_gguf(path)


def test_shape_mismatch_and_missing_tensor(tmp_path):
    hf = tiny_hf("qwen2", 300)
    path = tmp_path / "bad.gguf"
    write_gguf(path, "qwen2", hf, Q.F32, shape_override={"blk.1.attn_q.weight": 32})
    with pytest.raises(ValueError, match=r"bad.gguf: tensor 'blk.1.attn_q.weight' has shape \[32, 64\].*\[64, 64\]"):
        read_gguf(path)
    path = tmp_path / "missing.gguf"
    write_gguf(path, "qwen2", hf, Q.F32, drop={"blk.0.ffn_down.weight"})
    with pytest.raises(ValueError, match="missing tensor 'blk.0.ffn_down.weight'"):
        read_gguf(path)


def test_missing_tokenizer_metadata(tmp_path):
    hf = tiny_hf("llama", 300)
    path = tmp_path / "notok.gguf"
    write_gguf(path, "llama", hf, Q.F32, tokenizer=False)
    with pytest.raises(ValueError, match="notok.gguf: the GGUF metadata has no 'tokenizer.ggml.model'"):
        read_gguf(path)


# --------------------------------------------------------------------------- q8_0 kept (int8g, group 32)

def quiet_folder(path, cache):
    """model_folder of GGUF `path` under `cache`, and the notice it logged."""
    logged = []
    return model_folder(path, cache, progress=False, log=logged.append), "\n".join(logged)


@pytest.mark.parametrize("key", [("llama", "Q8_0"), ("phi3", "Q8_0")])
def test_q8_0_reads_as_int8g_g32_with_its_integers(files, tmp_path, key):
    """Every Q8_0 projection reads (read_stored) as the file's int8 codes with scale d rounded fp16 -> bf16
    (bf16 keeps 8 significant bits: |d - bf16(d)| <= 2^-8 |d|), so it dequantizes to the gguf package's
    weights within |q| * |d - bf16(d)| <= 127 * 2^-8 * |d| < |d| / 2 per weight (half a q8_0 step), and to
    exactly q * bf16(d); Phi-3's fused qkv / gate_up as each part's rows. Embeddings and LM head are not kept."""
    from split.llama import LlamaConfig, hf_source
    from split.llama.checkpoint import tensor_source
    from split.llama.quantize import Int4, Int8Group
    path, written = files[key]
    folder, notice = quiet_folder(path, tmp_path)
    n = sum(g.startswith("blk.") and t == Q.Q8_0 for g, (_, t) in written.items())  # 14 for llama, 8 fused phi3
    assert f"with --quantize int8g --group-size 32 its {n} Q8_0 projections keep their q8_0 integers" in notice
    assert "Q4_0" not in notice.split(";", 1)[1]  # no int4-g32 kept from a Q8_0 file
    info = json.loads((folder / "gguf.json").read_text())
    assert len(info["kept"]["int8-g32"]) == n and info["kept"]["int4-g32"] == []
    source, config = tensor_source(folder), LlamaConfig.from_dir(folder)
    assert source.kept(Int4(32)) == set() and len(source.kept(Int8Group(32))) == n
    expected = q4_0_projections(written, json.loads((folder / "config.json").read_text()), Q.Q8_0)
    assert len(expected) == 14
    h = Int8Group(32)
    for name, (want_t, want, d) in expected.items():
        got = source.read_stored(hf_source(config, f"{name}.weight"), h)
        assert got.keys() == {"weight", "scales"}
        for k in got:
            assert got[k].dtype == want_t[k].dtype and torch.equal(got[k], want_t[k]), (name, k)
        w = h.dequantize(got).reshape(want.shape[0], -1, 32)
        rounding = (d - d.to(torch.bfloat16).float()).abs()  # (out, in/32)
        assert (rounding <= d.abs() * 2**-8).all()
        codes = want.reshape(w.shape) / d[..., None]
        assert ((w - want.reshape(w.shape)).abs() <= codes.abs() * rounding[..., None]).all(), name
        assert ((w - want.reshape(w.shape)).abs() < d.abs()[..., None] / 2).all(), name
        assert torch.equal(w, codes * d.to(torch.bfloat16).float()[..., None])


def rank_blocks(out, world, layer):
    """{module: [rank 0's stored tensors, rank 1's, ...]} of layer `layer` of a prepared folder."""
    by_module = {}
    for r in range(world):
        for kind in ("attn", "mlp"):
            block = load_file(out / f"rank{r}" / f"layer{layer:03d}.{kind}.safetensors")
            for key, t in block.items():
                module, _, leaf = key.rpartition(".")
                if module.endswith("_proj") and leaf != "bias":
                    by_module.setdefault(module, [{} for _ in range(world)])[r][leaf] = t
    return by_module


@pytest.mark.parametrize("key, scheme", [(("llama", "Q8_0"), "int8g"), (("phi3", "Q4_0"), "int4"),
                                         (("qwen3", "Q8_0"), "int8g")])
def test_prepare_world_size_2_takes_the_integers_as_stored(files, tmp_path, capsys, key, scheme):
    """`prepare` at world size 2 with the kept format (int8g / int4, group 32) of a Q8_0 / Q4_0 file stores every
    projection as the file's integers (taken as stored, none requantized; Phi-3's fused qkv / gate_up as their
    parts' rows): each rank's slice is rows (q/k/v/gate/up) or whole groups of columns (o/down) of the expected
    tensors, and the slices put back together are them."""
    from edge_runtime.tp.prepare import prepare
    from split.llama.quantize import handler
    path, written = files[key]
    folder, _ = quiet_folder(path, tmp_path / "cache")
    out, fmt = tmp_path / "shards", handler(scheme, 32)
    plan = prepare(folder, 2, None, out, progress=False, quantize=fmt)
    err = capsys.readouterr().err
    assert f"{fmt.name} weights taken as stored" in err and "self_attn.q_proj x2" in err and "mlp.down_proj x2" in err
    assert "mlp.up_proj x2" in err and "quantized from floats: none" in err
    assert plan.extra["quantize"] == {"scheme": scheme, "group_size": 32}
    assert all(a % 32 == 0 and b % 32 == 0 for a, b in plan.mlp)
    expected = q4_0_projections(written, json.loads((folder / "config.json").read_text()), Q[key[1]])
    modules = rank_blocks(out, 2, 0).keys()
    assert len(modules) == 7
    for layer in (0, 1):
        for module, parts in rank_blocks(out, 2, layer).items():
            want = expected[f"layers.{layer}.{module}"][0]
            cols = module.endswith(("o_proj", "down_proj"))  # row-parallel: input columns per rank
            assert all(p.keys() == want.keys() for p in parts)
            for k in want:
                assert torch.equal(torch.cat([p[k] for p in parts], dim=1 if cols else 0), want[k]), (module, k)
            if cols:
                assert all(p["scales"].shape[1] * 32 == p["weight"].shape[1] * (2 if scheme == "int4" else 1)
                           for p in parts)


def one_process_int8g(folder, written, qtype=Q.Q8_0):
    """Our one-process model as `tp prepare` with int8g group 32 stores a Q8_0 file: projections as int8g
    modules built from q8_0_expected (the gguf package's dequantization, not our mapping), embeddings and
    LM head int8 rows of the floats."""
    from split.llama import load_llama
    from split.llama.quantize import Int8, Int8Group
    model = load_llama(folder)
    h, table = Int8Group(32), Int8()
    for name, (t, _, _) in q4_0_projections(written, json.loads((folder / "config.json").read_text()), qtype).items():
        parent, _, leaf = name.rpartition(".")
        bias = model.get_submodule(name).bias  # qwen2's q/k/v biases stay float
        setattr(model.get_submodule(parent), leaf, h.module(t, None if bias is None else bias.detach()))
    with torch.no_grad():
        model.lm_head = table.module(table.quantize(model.lm_head.weight))
        model.embed_tokens.weight.copy_(table.dequantize(table.quantize(model.embed_tokens.weight)))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_generate_int8g_q8_0_equals_our_one_process_model(files, tmp_path, capsys, arch):
    """`tp generate --shards` on int8g group-32 shards of a Q8_0 file (world size 1) against our one-process
    model (one_process_int8g): bitwise the same tensors through the same kernels, so token for token; as for
    q4_0, not transformers in fp32, since the kernel multiplies bf16 activations."""
    from edge_runtime.tp.prepare import prepare
    from split.llama import generate as greedy
    from split.llama.quantize import handler
    path, written = files[arch, "Q8_0"]
    folder, _ = quiet_folder(path, tmp_path / "cache")
    with torch.no_grad():
        want = list(greedy(one_process_int8g(folder, written), PROMPT, N_NEW))
    prepare(folder, 1, None, tmp_path / "shards", progress=False, quantize=handler("int8g", 32))
    assert "int8-g32 weights taken as stored" in capsys.readouterr().err
    argv = ["tp", "generate", "--shards", str(tmp_path / "shards"), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-new-tokens", str(N_NEW), "--ignore-eos", "--json"]
    assert edge_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == want


@pytest.mark.parametrize("key, scheme, group, world", [
    (("llama", "Q8_0"), "int8", 32, 2), (("qwen2", "Q8_0"), "int4", 32, 2), (("llama", "Q4_0"), "int8g", 32, 2),
    (("llama", "Q8_0"), "int8g", 64, 1)])  # (64 columns of o_proj: a world size 2 slice is not a whole group)
def test_prepare_other_formats_requantize_q8_0(files, tmp_path, capsys, key, scheme, group, world):
    """Only the format a GGUF type maps onto takes its integers: per-channel int8 or int4 on a Q8_0 file,
    int8g on a Q4_0 one, int8g with another group size: all quantized from the dequantized floats."""
    from edge_runtime.tp.prepare import prepare
    from split.llama.quantize import handler, handler_of
    path, _ = files[key]
    folder, _ = quiet_folder(path, tmp_path / "cache")
    out = tmp_path / "shards"
    prepare(folder, world, None, out, progress=False, quantize=handler(scheme, group))
    assert "taken as stored" not in capsys.readouterr().err
    block = load_file(out / f"rank{world - 1}" / "layer001.mlp.safetensors")
    t = {k: block[f"mlp.down_proj.{k}"] for k in ("weight", "scales", "zeros") if f"mlp.down_proj.{k}" in block}
    assert handler_of("mlp.down_proj", t).name == handler(scheme, group).name
