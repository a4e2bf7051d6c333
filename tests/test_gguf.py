"""`--model FILE.gguf` (issue 22 item 3): a GGUF file as a small cached model folder whose tensors are read
straight from the file and dequantized by the `gguf` package, against the `gguf` package and transformers'
own GGUF loader.

    .venv/bin/python -m pytest -q tests/test_gguf.py

(q4_0 / q8_0 integers kept as they are: tests/test_gguf_kept.py; the files: tests/gguf_files.py)

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
  tokenizer metadata: a ValueError naming it.
"""
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from edge_runtime.tp.gguf_source import model_folder  # noqa: E402
from gguf_files import (FILES, TEXTS, generate, gguf_dequantized, hf_of, reference_greedy,  # noqa: E402
                        tiny_hf, write_gguf)
from split.llama import Source  # noqa: E402
from split.llama.gguf_checkpoint import read_gguf  # noqa: E402


@pytest.mark.parametrize("key", [(arch, qtype.name) for arch, qtype, _ in FILES])
def test_tensors_read_from_the_gguf_equal_its_dequantization(gguf_files, tmp_path, key):
    """The model folder holds no weights, only config / tokenizer files and the tensor index (a few KiB); every
    tensor read through it (tensor_source) is the gguf package's dequantization of the file's tensor, for F32,
    F16, BF16, Q8_0 and Q4_0, Qwen3's q_norm / k_norm and Phi-3's fused qkv / gate_up included."""
    from split.llama.checkpoint import tensor_source
    from split.llama.gguf_checkpoint import FOLDER_INDEX
    path, written = gguf_files[key]
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
def test_rows_and_columns_read_alone_equal_the_whole_tensor_sliced(gguf_files, tmp_path, key):
    """A read of rows [a, b) or columns [a, b) (not on block boundaries) takes only those from the file and equals
    the whole tensor sliced: llama's un-permuted q / k rows, a fused Phi-3 tensor's part (hf_source), a bias."""
    from split.llama import LlamaConfig, hf_source
    from split.llama.checkpoint import tensor_source
    path, _ = gguf_files[key]
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


def test_a_changed_or_missing_gguf_file_is_refused_by_its_folder(gguf_files, tmp_path):
    """The folder reads tensors from the file it indexed: a changed file (size or mtime) or a missing one is an
    error saying to open the .gguf again, and model_folder then makes a new folder (a new cache key); a folder
    of an older layout is made again; load_llama given the .gguf file itself says which folder to give."""
    from split.llama import load_llama
    from split.llama.checkpoint import tensor_source
    from split.llama.gguf_checkpoint import FOLDER_INDEX
    path, _ = gguf_files["qwen2", "F16"]
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
def test_generate_matches_transformers_on_the_same_gguf(gguf_files, tmp_path, capsys, key):
    path, _ = gguf_files[key]
    want, _ = reference_greedy(path)
    result, err = generate(path, tmp_path, capsys)
    assert result["token_ids"] == want
    assert "GGUF tensor types" in err and key[1] in err and "dequantized" in err


def test_generate_world_size_2_with_a_worker(gguf_files, tmp_path, capsys):
    path, _ = gguf_files["qwen2", "Q8_0"]
    want, _ = reference_greedy(path)
    result, _ = generate(path, tmp_path, capsys, world=2)
    assert result["token_ids"] == want and result["world_size"] == 2


@pytest.mark.parametrize("key", [("llama", "F32"), ("qwen2", "F16"), ("qwen3", "F16"), ("phi3", "F32")])
def test_tokenizer_matches_transformers(gguf_files, tmp_path, key):
    from tokenizers import Tokenizer
    path, _ = gguf_files[key]
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



# --------------------------------------------------------------------------- bad input

def test_truncated_file(gguf_files, tmp_path):
    path, _ = gguf_files["llama", "Q8_0"]
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


