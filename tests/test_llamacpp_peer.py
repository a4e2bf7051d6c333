"""scripts/llamacpp_peer.py and llamacpp_build.py, the parts that need no llama.cpp build and no network: the tokenizer folder that
convert_hf_to_gguf.py needs beside a random checkpoint, and the prompt ids every engine gets."""
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peer():
    """The two scripts' names in one namespace (llamacpp_peer imports its sibling, as when run by path)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return types.SimpleNamespace(**{**vars(_load("llamacpp_build")), **vars(_load("llamacpp_peer"))})
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def folder(peer, tmp_path_factory):
    return peer.write_tokenizer(tmp_path_factory.mktemp("tok"), 1000)


def test_tokenizer_json_is_the_bpe_the_converter_accepts(folder):
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    # gguf-py's LlamaHfVocab: a BPE with byte fallback and a Sequence decoder (WordLevel is rejected)
    assert model["type"] == "BPE" and model["byte_fallback"] and model["ignore_merges"] and model["merges"] == []
    assert spec["decoder"]["type"] == "Sequence"
    assert [d["type"] for d in spec["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]


def test_vocab_size_and_one_id_per_token(peer, folder):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    assert tok.get_vocab_size(with_added_tokens=True) == 1000 == len(vocab)
    assert sorted(vocab.values()) == list(range(1000))            # every id is one token, no gaps
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    ids = peer.prompt_ids(1000, 16)
    assert len(ids) == 16 and ids[0] == 1 and all(peer.N_FIXED <= i < 1000 for i in ids[1:])
    words = ids[1:]
    text = tok.decode(words)
    assert tok.encode(text, add_special_tokens=False).ids == words  # each word decodes and encodes to its id
    assert tok.encode("\u00e9").tokens == ["<0xE2>", "<0x96>", "<0x81>", "<0xC3>", "<0xA9>"]   # byte fallback


def test_transformers_autotokenizer_loads_it(peer, folder):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.is_fast and len(tok) == 1000
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    words = peer.prompt_ids(1000, 16)[1:]
    assert tok(tok.decode(words), add_special_tokens=False).input_ids == words


def test_vocab_too_small_for_byte_fallback(peer):
    with pytest.raises(ValueError):
        peer.vocabulary(200)


def test_converter_input_links_the_checkpoint_and_leaves_it_alone(peer, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(vocab_size=300)))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    folder = peer.converter_input(ckpt)
    assert folder == ckpt / "gguf" / "hf"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "gguf", "model.safetensors"]
    assert (folder / "model.safetensors").is_symlink() and (folder / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]["\u2581w40"] == 299
    assert peer.converter_input(ckpt) == folder                      # idempotent
