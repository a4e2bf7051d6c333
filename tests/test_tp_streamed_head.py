"""Rank 0's streamed embeddings and LM head (edge_runtime/tp/streamed_head.py) against resident ones.

    .venv/bin/python -m pytest -q tests/test_tp_streamed_head.py

Embedding rows read from the file are bitwise those of nn.Embedding. Streamed logits are the same
dot products as the resident head's, summed by BLAS in an order that may depend on the matrix
shape, so they are held to the float32 bound for reordering a sum of K products: two orders differ
by at most 2 * gamma_K * sum_k |x_k w_k| (gamma_K = K u / (1 - K u), u = 2^-24). A real master
(world size 1) with window 2 streams both and still matches transformers, and its peak RSS above
baseline is below the all-resident master's by more than the LM head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edge_runtime.tp import streamed_head
from edge_runtime.tp.collective import LocalCollective
from edge_runtime.tp.engine import Master
from edge_runtime.tp.pager import PagerError
from edge_runtime.tp.prepare import prepare
from edge_runtime.tp.streamed_head import StreamedEmbedding, StreamedHead, TensorFile

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
V, C = 1001, 64  # a vocab that no chunk size divides


def write_table(path: Path, dtype=torch.float32, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """A head.safetensors as prepare.py writes it: (lm_head.weight (V, C), norm.weight (C,))."""
    g = torch.Generator().manual_seed(seed)
    table, norm = torch.randn(V, C, generator=g).to(dtype), torch.randn(C, generator=g)
    save_file({"norm.weight": norm, "lm_head.weight": table}, str(path))
    return table, norm


def reorder_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(…, V) bound on the difference of two float32 summation orders of x @ w.T."""
    u, k = 2.0 ** -24, x.shape[-1]
    gamma = k * u / (1 - k * u)
    return 2 * gamma * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_rows_are_bitwise_the_resident_ones(tmp_path, stored):
    table, _ = write_table(tmp_path / "head.safetensors", stored)
    emb = StreamedEmbedding(TensorFile(tmp_path / "head.safetensors", "lm_head.weight"), torch.float32)
    resident = torch.nn.Embedding.from_pretrained(table.float())
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[0, 0], ids[2, -1], ids[1, 4] = 0, V - 1, V - 1  # the first and last rows of the table
    got = emb(ids)
    assert got.shape == (3, 9, C) and got.dtype == torch.float32
    assert torch.equal(got, resident(ids))
    assert emb(torch.empty(1, 0, dtype=torch.long)).shape == (1, 0, C)
    with pytest.raises(IndexError, match=rf"token ids must be in \[0, {V}\), got \[{V}\]"):
        emb(torch.tensor([[3, V]]))


@pytest.mark.parametrize("chunk_rows", [16, 48, 512, 2048])  # 2048: one slice
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_streamed_logits_equal_the_resident_head(tmp_path, chunk_rows, stored):
    w = write_table(tmp_path / "head.safetensors", stored)[0].float()  # (V, C) as the resident head holds it
    head = StreamedHead(TensorFile(tmp_path / "head.safetensors", "lm_head.weight"), torch.float32,
                        chunk_bytes=chunk_rows * C * stored.itemsize)
    assert head.chunk_rows == min(V, chunk_rows)
    g = torch.Generator().manual_seed(2)
    for T in (1, 9):  # a decode step, a prefill
        x = torch.randn(2, T, C, generator=g)
        got, want = head(x), F.linear(x, w)
        assert got.shape == want.shape == (2, T, V)
        assert ((got - want).abs() <= reorder_bound(x, w)).all()
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_whole_tensors_and_bad_sources(tmp_path):
    _, norm = write_table(tmp_path / "head.safetensors")
    assert torch.equal(TensorFile(tmp_path / "head.safetensors", "norm.weight").read(torch.float32), norm)
    with pytest.raises(PagerError, match=r"head\.safetensors: no tensor 'embed_tokens\.weight'"):
        TensorFile(tmp_path / "head.safetensors", "embed_tokens.weight")
    with pytest.raises(PagerError, match="must be 2-D for an LM head"):
        StreamedHead(TensorFile(tmp_path / "head.safetensors", "norm.weight"), torch.float32)
    with pytest.raises(PagerError, match=r"'lm_head\.weight' must be shape \[1000, 64\] for an embedding"):
        StreamedEmbedding(TensorFile(tmp_path / "head.safetensors", "lm_head.weight"), torch.float32, (1000, 64))


def hf_checkpoint(path: Path, tied: bool, vocab: int = 300, hidden: int = 48, layers: int = 3, inter: int = 100):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=6 if hidden == 48 else 4,
                                   num_key_value_heads=3 if hidden == 48 else 2, max_position_embeddings=128,
                                   initializer_range=0.2, tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_master_with_window_streams_and_matches_transformers(tmp_path, monkeypatch, tied):
    monkeypatch.setattr(streamed_head, "CHUNK_BYTES", 40 * 48 * 4)  # 32 rows a slice: 10 slices of a vocab of 300
    hf = hf_checkpoint(tmp_path / "hf", tied)
    prepare(tmp_path / "hf", 1, None, tmp_path / "shards", progress=False)
    prompt = [0, 17, 299, 5, 42]
    with torch.no_grad():
        ref_ids = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=0)[0, len(prompt):]
        ref_logits = hf(torch.tensor([prompt])).logits[0]  # (T, vocab)
    got = {}
    for window in (0, 2):
        with Master(tmp_path / "shards" / "rank0", LocalCollective(), window) as m:
            streamed = isinstance(m.model.lm_head, StreamedHead)
            assert streamed == (window == 2)
            assert isinstance(m.model.embed_tokens, StreamedEmbedding)  # rows read from their file, always
            if streamed:
                assert m.model.lm_head.chunk_rows == 32
                assert (m.model.embed_tokens.source is m.model.lm_head.source) == tied  # one source when tied
            assert (m.model.embed_tokens.source.name == "lm_head.weight") == tied
            got[window] = (m.prefill_logits(prompt), list(m.generate(prompt, 12)))
    assert got[2][1] == got[0][1] == ref_ids.tolist()
    assert (got[2][0] - ref_logits).abs().max() < 1e-4
    assert (got[2][0] - got[0][0]).abs().max() <= 1e-5 * got[0][0].abs().max()  # float32 reordering only


RANK0 = r"""
import json, sys, torch
from edge_runtime.tp.collective import LocalCollective
from edge_runtime.tp.engine import Master
torch.ones(8).sum()  # warm up torch before the baseline
with Master(sys.argv[1], LocalCollective(), int(sys.argv[2])) as m:
    ids = list(m.generate(list(range(1, 17)), 8))
    row = m.rank_stats()[0]
print(json.dumps({"above": row["peak_rss"] - row["baseline_rss"], "ids": ids}))
"""


def test_rank0_peak_rss_with_window_2_leaves_out_the_head(tmp_path):
    """Vocab 32000 x hidden 256 (a 31.25 MiB fp32 LM head, untied) over 8 small layers (~2.3 MiB each)."""
    hf_checkpoint(tmp_path / "hf", tied=False, vocab=32000, hidden=256, layers=8, inter=512)
    prepare(tmp_path / "hf", 1, None, tmp_path / "shards", progress=False)
    head_bytes = 32000 * 256 * 4
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {w: subprocess.Popen([sys.executable, "-c", RANK0, str(tmp_path / "shards" / "rank0"), str(w)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for w in (2, 0)}  # separate processes, side by side
    rows = {}
    for w, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        rows[w] = json.loads(out.strip().splitlines()[-1])
    small, full = rows[2]["above"], rows[0]["above"]
    print(f"\nrank 0 peak RSS above baseline: window 2 {small / 2**20:.1f} MiB, all resident {full / 2**20:.1f} MiB,"
          f" LM head {head_bytes / 2**20:.2f} MiB")
    assert rows[2]["ids"] == rows[0]["ids"]
    assert small < head_bytes  # neither the head nor the embedding table is in memory with a window
    assert full - small >= head_bytes  # the untied embedding is not resident in either mode
