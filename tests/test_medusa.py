"""Medusa heads (split/llama/medusa.py) and their training (scripts/train_medusa_heads.py) on a tiny
early-exit LM trained by scripts/train_early_exit_lm.py: shapes, save/load, drafting, the acceptance
count, training, and an interrupted-then-resumed run equal to an uninterrupted one."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_early_exit_lm
import train_medusa_heads
from split.llama import Sampling, load_llama
from split.llama.exits import load_exit_heads
from split.llama.medusa import (MEDUSA_FILE, MEDUSA_JSON, MedusaHeads, acceptance, agreement,
                                load_medusa_heads, save_medusa_heads)

TINY = ["--hidden", "32", "--layers", "3", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
        "--exits", "1,2", "--vocab-size", "300", "--context", "32", "--batch", "4", "--threads", "1"]
MEDUSA = ["--exit-layer", "2", "--medusa-heads", "3", "--context", "32", "--batch", "4", "--threads", "1",
          "--lr", "0.02", "--save-every", "4"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(corpus, folder) of a 3-layer LM with exits after layers 1 and 2, trained 20 steps."""
    root = tmp_path_factory.mktemp("medusa")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"KING {i % 7}:\nWhat say you, lord {i}? I say thee nay.\n\n" for i in range(400)))
    threads = torch.get_num_threads()
    try:
        train_early_exit_lm.main(["--data", str(corpus), "--out", str(root / "lm"), "--steps", "20", *TINY])
    finally:
        torch.set_num_threads(threads)
    return corpus, root / "lm"


def copy_lm(lm, dest):
    shutil.copytree(lm[1], dest, ignore=shutil.ignore_patterns("checkpoint"))
    return dest


def train(lm, folder, steps):
    threads = torch.get_num_threads()
    try:
        return train_medusa_heads.main(["--model", str(folder), "--data", str(lm[0]), "--steps", str(steps), *MEDUSA])
    finally:
        torch.set_num_threads(threads)


def randomized(medusa: MedusaHeads, seed=0) -> MedusaHeads:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in medusa.heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return medusa


def test_shapes_and_fresh_heads_repeat_the_exit_head(lm):
    head = load_exit_heads(lm[1], [2])[2]
    medusa = MedusaHeads.from_exit_head(head, 3, 2)
    h = torch.randn(2, 5, 32)
    logits = medusa(h)
    assert logits.shape == (2, 5, 4, 300)
    for i in range(4):  # res = 0 and proj = the exit head's: every head starts as the exit head
        torch.testing.assert_close(logits[:, :, i], head(h))
    assert sum(p.numel() for p in medusa.heads.parameters()) == 3 * (32 * 32 + 32 + 300 * 32)
    assert not any(p.requires_grad for p in medusa.exit_head.parameters())


def test_save_load_round_trip_keeps_other_exit_layers(lm, tmp_path):
    folder = copy_lm(lm, tmp_path / "m")
    heads = load_exit_heads(folder)
    m2 = randomized(MedusaHeads.from_exit_head(heads[2], 3, 2), seed=1)
    m1 = randomized(MedusaHeads.from_exit_head(heads[1], 2, 1), seed=2)
    save_medusa_heads(folder, m2, {"note": "k2"})
    save_medusa_heads(folder, m1)
    meta = json.loads((folder / MEDUSA_JSON).read_text())
    assert meta["hidden_size"] == 32 and meta["vocab_size"] == 300
    assert meta["heads"]["2"] == {"num_heads": 3, "note": "k2"} and meta["heads"]["1"] == {"num_heads": 2}
    h = torch.randn(1, 4, 32)
    for k, m in ((2, m2), (1, m1)):
        loaded = load_medusa_heads(folder, k)
        assert loaded.exit_layer == k and loaded.num_heads == m.num_heads
        assert torch.equal(loaded(h), m(h).detach())
    assert sorted(load_file(str(folder / MEDUSA_FILE))) == sorted(
        f"medusa.{k}.{i}.{n}" for k, n_heads in ((1, 2), (2, 3)) for i in range(1, n_heads + 1)
        for n in ("res.weight", "res.bias", "proj.weight"))
    with pytest.raises(ValueError, match="no Medusa heads for exit layer 3"):
        load_medusa_heads(folder, 3)
    with pytest.raises(FileNotFoundError, match="medusa.json"):
        load_medusa_heads(lm[1], 2)


def test_draft_is_the_heads_argmax_chain(lm):
    medusa = randomized(MedusaHeads.from_exit_head(load_exit_heads(lm[1], [2])[2], 3, 2)).eval()
    h = torch.randn(32)
    logits = medusa(h.reshape(1, 1, 32))[0, 0].detach()  # (4, vocab)
    d = medusa.draft(h, n=10)
    assert d.ids == logits.argmax(-1).tolist() and len(set(d.ids)) > 1
    torch.testing.assert_close(torch.tensor(d.probs), logits.softmax(-1)[range(4), d.ids])
    assert torch.equal(d.dists, torch.nn.functional.one_hot(torch.tensor(d.ids), 300).float())
    assert medusa.draft(h[None], n=2).ids == d.ids[:2]  # n caps the length; (1, C) is accepted too
    # sampling: ids drawn from the tempered softmax, which dists is; top_k=1 is the greedy chain again
    s = Sampling(temperature=0.7, seed=3)
    a, b = medusa.draft(h, 4, s, s.generator()), medusa.draft(h, 4, s, s.generator())
    assert a.ids == b.ids
    torch.testing.assert_close(a.dists, (logits / 0.7).softmax(-1))
    assert medusa.draft(h, 4, Sampling(temperature=0.7, top_k=1), torch.Generator()).ids == d.ids
    with pytest.raises(ValueError, match="draft length"):
        medusa.draft(h, 0)
    with pytest.raises(ValueError, match="h_last must hold one layer-2 state of 32"):
        medusa.draft(torch.randn(2, 32), 3)


def test_agreement_counts_a_hand_made_case():
    full_top = np.array([5, 6, 7, 8, 9, 10])  # the full model's argmax at t: its guess for t+1
    drafts = np.array([[5, 6, 7],             # t=0: all three right
                       [6, 0, 8],             # t=1: t+1 right, t+2 wrong, t+3 right
                       [0, 8, 9],             # t=2: t+1 wrong, the Medusa heads right
                       [8, 9, 10],            # t=3: all right
                       [9, 10, 1], [10, 1, 1]])  # t=4, 5: drafts run past the window, not counted
    c = agreement(drafts, full_top)
    assert c["positions"] == 4
    assert c["agree"].tolist() == [3, 3, 4] and c["chain"].tolist() == [3, 2, 2]
    assert c["medusa_chain"].tolist() == [3, 3]
    assert agreement(drafts[:2], full_top[:2])["positions"] == 0


def test_acceptance_matches_a_direct_count(lm):
    model = load_llama(lm[1])
    medusa = randomized(MedusaHeads.from_exit_head(load_exit_heads(lm[1], [2])[2], 2, 2), seed=4).eval()
    ids = list(range(1, 60))
    stats = acceptance(model, medusa, ids, context=25)
    hits = []
    for s in range(0, len(ids) - 1, 25):
        x = torch.tensor([ids[s:s + 25]])
        with torch.no_grad():
            full = model(x)[0].argmax(-1).tolist()
            drafts = medusa(model.forward_layers(model.embed(x), 0, 2, 0))[0].argmax(-1).tolist()
        hits += [[drafts[t][j] == full[t + j] for j in range(3)] for t in range(len(full) - 2)]
    hits = np.array(hits)
    assert stats["positions"] == len(hits) == 23 + 23 + 7
    np.testing.assert_allclose(stats["agree"], hits.mean(0))
    np.testing.assert_allclose(stats["chain"], np.cumprod(hits, 1).mean(0))
    np.testing.assert_allclose(stats["medusa_chain"], np.cumprod(hits[:, 1:], 1).mean(0))
    assert stats["accepted_per_draft"] == pytest.approx(np.cumprod(hits, 1).mean(0).sum())


def test_training_lowers_the_loss_and_a_resumed_run_equals_an_uninterrupted_one(lm, tmp_path, monkeypatch):
    whole = copy_lm(lm, tmp_path / "whole")
    summary = train(lm, whole, 24)
    assert summary["train_steps"] == 24 and len(summary["acceptance"]["agree"]) == 4

    model = load_llama(whole)
    text = train_early_exit_lm.split_text(str(lm[0]))[1]
    from tokenizers import Tokenizer
    val = torch.tensor(Tokenizer.from_file(str(whole / "tokenizer.json")).encode(text).ids)
    x, y = val[None, :-1], val[None, 1:]
    with torch.no_grad():
        before = train_medusa_heads.medusa_losses(model, MedusaHeads.from_exit_head(
            load_exit_heads(whole, [2])[2], 3, 2), x, y)
        after = train_medusa_heads.medusa_losses(model, load_medusa_heads(whole, 2), x, y)
    assert all(after[n] < before[n] - 0.1 for n in before), (before, after)

    # the same run killed at step 6 (its last checkpoint: step 4), then rerun to the end
    cut = copy_lm(lm, tmp_path / "cut")
    real_batches, calls = train_early_exit_lm.batches, []

    def dying_batches(*a, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_batches(*a, **kw)
    monkeypatch.setattr(train_early_exit_lm, "batches", dying_batches)
    with pytest.raises(KeyboardInterrupt):
        train(lm, cut, 24)
    monkeypatch.setattr(train_early_exit_lm, "batches", real_batches)
    ckpt = cut / "checkpoint" / "medusa_k2_3heads"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4 and not (cut / MEDUSA_FILE).exists()
    assert train(lm, cut, 24)["train_steps"] == 24
    a, b = load_file(str(whole / MEDUSA_FILE)), load_file(str(cut / MEDUSA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    a = load_file(str(whole / "checkpoint" / "medusa_k2_3heads" / "state.safetensors"))
    b = load_file(str(ckpt / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_bad_exit_layer_is_named(lm):
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="--exit-layer.*no exit head after layer"):
            train_medusa_heads.main(["--model", str(lm[1]), "--data", str(lm[0]), "--exit-layer", "3", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
