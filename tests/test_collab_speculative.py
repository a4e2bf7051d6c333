"""Speculative mode (issue 21, item 3) against a real cloud-service subprocess: the device drafts
with its exit head (or any drafter), the llm_continuation backend at first_layer 0 (`llm_full`,
no extra configuration) verifies a whole draft in one call. Greedy output equals cloud-only and
the local full model token for token; sampled output is distributed as the cloud model's."""
import json
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch

from cloud_service.backends.llm import verify_drafts
from edge_runtime.client.oip_client import OipClient
from edge_runtime.collab.device import CollabLlm
from edge_runtime.collab.speculative import Draft
from llm_models import K, make_model, write_model
from server_process import ServerProcess
from split.llama import Sampling, Stop, generate, load_llama
from split.llama.exits import load_exit_heads
from split.llama.sampling import distribution

PROMPT = [5, 17, 3, 42, 8, 11]
N_NEW = 12
V = 97
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}  # p = 0.001


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ee_lm")
    make_model(model_dir)
    repo = tmp_path_factory.mktemp("llm_repo")
    write_model(repo, "llm", model_dir, K)
    write_model(repo, "llm_full", model_dir, 0)
    write_model(repo, "llm_full_tight", model_dir, 0, max_state_bytes=100_000)  # one ~66 KB session fits, two do not
    proc = ServerProcess(repo)
    yield model_dir, proc
    proc.kill()


@pytest.fixture(scope="module")
@torch.no_grad()
def ref(llm):
    """The full model's greedy continuation of PROMPT, computed here."""
    return list(generate(load_llama(llm[0]), PROMPT, N_NEW + 8))


def spec(llm, **kw):
    return CollabLlm(llm[0], mode="speculative", cloud=llm[1].address, **kw)


def oracle(ref, wrong=False):
    """A drafter that proposes the full model's own greedy continuation (wrong: another id at every
    position, so no draft is ever accepted)."""
    def drafter(ctx, n):
        j = len(ctx.history) - len(PROMPT)
        return Draft([(t + 1) % V if wrong else t for t in ref[j:j + n]])
    return drafter


def rounds(n_tokens: int, gamma: int) -> int:
    """Verification calls for n_tokens when every draft is accepted."""
    calls = 0
    while n_tokens > 0:
        n_tokens -= min(gamma, n_tokens - 1) + 1
        calls += 1
    return calls


def test_cloud_only_is_the_full_model(llm, ref):
    r = CollabLlm(llm[0], mode="cloud-only", cloud=llm[1].address).generate(PROMPT, N_NEW)
    assert r.tokens == ref[:N_NEW]


@pytest.mark.parametrize("gamma", [1, 3, 8])
@pytest.mark.parametrize("drafter", ["exit_head", "all_accepted", "none_accepted"])
def test_greedy_speculative_is_the_full_models_greedy(llm, ref, gamma, drafter):
    draft = {"exit_head": None, "all_accepted": oracle(ref), "none_accepted": oracle(ref, wrong=True)}[drafter]
    r = spec(llm, gamma=gamma, drafter=draft).generate(PROMPT, N_NEW)
    c = r.counters
    assert r.tokens == ref[:N_NEW] and not r.degraded
    assert r.sources.count("draft") == c.accepted and r.sources.count("cloud") == c.cloud_tokens == c.requests
    assert c.accepted + c.cloud_tokens == N_NEW and c.resends == 0
    assert c.states_sent == len(PROMPT) + N_NEW - 1 + c.drafted - c.accepted   # every id once, plus rejected drafts
    assert c.cloud_layer_evals == c.states_sent * 4
    if drafter == "all_accepted":
        assert c.accepted == c.drafted and c.requests == rounds(N_NEW, gamma)
    elif drafter == "none_accepted":   # gamma adapts to 1 after the first rejection
        assert c.accepted == 0 and c.requests == N_NEW and c.drafted == min(gamma, N_NEW - 1) + N_NEW - 2
    else:
        assert c.drafted > 0


@pytest.mark.parametrize("stop", ["eos", "sequence"])
def test_stop_inside_an_accepted_draft_ends_the_turn_there(llm, ref, stop):
    j = next(i for i in range(2, N_NEW) if ref[i] not in ref[:i])   # the stop token first appears here
    cut = Stop(eos_ids=(ref[j],)) if stop == "eos" else Stop(sequences=((ref[j - 1], ref[j]),))
    e = spec(llm, gamma=8, drafter=oracle(ref))
    turn = e.turn(PROMPT, N_NEW, cut)
    tokens = list(turn)
    assert tokens == ref[:j + 1] and turn.finish_reason == "stop"   # nothing after the stop
    assert turn.result.sources == ["draft"] * (j + 1) and turn.result.counters.requests == 1
    # the cloud holds exactly what was emitted: the next turn continues the same session
    more = e.generate([7], 5, conversation=turn.result.conversation)
    assert more.tokens == list(generate(load_llama(llm[0]), PROMPT + ref[:j + 1] + [7], 5))
    assert more.counters.resends == 0


def test_eviction_resends_every_token_id(llm, ref):
    other = spec(llm, cloud_full_model="llm_full_tight")

    def evict(step, token, source):
        if step == 4:   # another conversation pushes ours out of the 100 KB budget
            other.generate([1, 2, 3], 2)

    r = spec(llm, gamma=3, cloud_full_model="llm_full_tight").generate(PROMPT, N_NEW, on_token=evict)
    assert r.tokens == ref[:N_NEW] and not r.degraded
    assert r.counters.resends == 1 and r.counters.recomputed_states == 0


def test_unreachable_cloud_degrades_to_the_exit_head(llm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CollabLlm(llm[0], mode="speculative", cloud=f"127.0.0.1:{port}", timeout_s=1.0).generate(PROMPT, 4)
    standalone = CollabLlm(llm[0], mode="standalone").generate(PROMPT, 4)
    assert r.sources == ["degraded"] * 4 and r.tokens == standalone.tokens


def test_medusa_heads_plug_in_as_a_drafter(llm, ref):
    from split.llama.medusa import MedusaHeads
    medusa = MedusaHeads.from_exit_head(load_exit_heads(llm[0])[K], 3, K)   # untrained: repeats the exit head
    r = spec(llm, gamma=4, drafter=lambda ctx, n: medusa.draft(ctx.h, n, ctx.sampling, ctx.gen)).generate(PROMPT, N_NEW)
    assert r.tokens == ref[:N_NEW] and r.counters.drafted > 0


# --- sampling -------------------------------------------------------------------------------
def chi_square(counts: dict, probs: dict, n: int) -> float:
    assert set(counts) <= set(probs), "a sample the target model cannot produce"
    return sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in probs.items())


def test_verify_drafts_samples_the_target_distribution():
    """The acceptance rule alone, on a fixed p and a very different q: the output is p, never q."""
    s = Sampling(temperature=1.0)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0], [0.0, 0.0, 0.0, 0.0, 0.0]])   # (d + 1, vocab)
    q = torch.tensor([[0.05, 0.05, 0.1, 0.2, 0.6]])
    gen, n, counts = torch.Generator().manual_seed(0), 4000, {}
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=gen))
        accepted, token = verify_drafts(p_logits, [x], q, s, gen)
        first = x if accepted else token
        counts[first] = counts.get(first, 0) + 1
    p = distribution(p_logits[0], s)
    target = {i: float(p[i]) for i in range(5)}
    assert chi_square(counts, target, n) < CHI2_999[4]
    always_accepting = {i: n * float(q[0, i]) for i in range(5)}   # what accepting every draft would give
    assert chi_square(always_accepting, target, n) > 10 * CHI2_999[4]


@torch.no_grad()
def test_speculative_sampling_has_the_cloud_models_distribution(llm):
    """The first two sampled tokens over many seeds against the full model's exact joint distribution
    (top-k 3: 9 outcomes), a chi-square test at p = 0.001. The drafter draws the first token from a
    q that is 1/2 on p's likeliest token (always accepted) and 1/2 on one p never samples (always
    rejected: resampled from the residual). Accepting every draft would emit that token half of the
    time, and resampling from p instead of the residual would give the likeliest one 3/4 of the
    time instead of 1/2: both fail here (checked by breaking verify_drafts)."""
    s = Sampling(temperature=1.0, top_k=3)
    model = load_llama(llm[0])
    p1 = distribution(model(torch.tensor([PROMPT]))[0, -1], s)
    joint = {}
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = distribution(model(torch.tensor([PROMPT + [t1]]))[0, -1], s)
        joint.update({(t1, t2): float(p1[t1] * p2[t2]) for t2 in torch.nonzero(p2).flatten().tolist()})
    q = torch.zeros(V)
    q[[int(p1.argmax()), int(torch.nonzero(p1 == 0)[0])]] = 0.5

    def drafter(ctx, n):
        x = int(torch.multinomial(q, 1, generator=ctx.gen))
        return Draft([x], q[None])

    n, e = 200, spec(llm, gamma=1, drafter=drafter)   # the rarest outcome is expected 6 times
    counts, drafted, accepted = {}, 0, 0
    for seed in range(n):
        r = e.generate(PROMPT, 2, sampling=Sampling(temperature=1.0, top_k=3, seed=seed))
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        drafted, accepted = drafted + r.counters.drafted, accepted + r.counters.accepted
    assert chi_square(counts, joint, n) < CHI2_999[len(joint) - 1]
    assert drafted == n and 0.35 * n < accepted < 0.65 * n   # both the accept and the resample paths ran
    # seeded: the same seed (and a fresh gamma) gives the same tokens, here with the exit head drafting
    runs = [spec(llm, gamma=3).generate(PROMPT, 6, sampling=Sampling(temperature=1.0, seed=11)) for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and runs[0].counters.drafted > 0


# --- bad input ------------------------------------------------------------------------------
def test_malformed_drafts_are_rejected_and_the_session_survives(llm, ref):
    P = len(PROMPT)
    with OipClient(llm[1].address) as client:
        def call(ids, start, begin=False, exited=None, model="llm_full", **extra):
            inputs = {"input_ids": np.array(ids, np.int64), "start": np.array([start], np.int64),
                      "exited": np.array(exited if exited is not None else [0] * len(ids), np.uint8)}
            for name, value in extra.items():
                dtype = np.float32 if name in ("draft_probs", "temperature", "top_p") else np.int64
                inputs[name] = np.array(value if name == "draft_probs" else [value], dtype)
            return client.infer(model, inputs, parameters={"sequence_id": 4242, **({"sequence_start": True} if begin else {})})

        assert call(PROMPT, 0, begin=True)["next_token"][0] == ref[0]
        uniform = np.full((1, V), 1 / V)
        bad = [
            ("draft_len", dict(ids=[ref[0], 1], start=P, draft_len=2)),           # more drafts than rows allow
            ("draft_len", dict(ids=[ref[0], 1], start=P, draft_len=-1)),
            ("input_ids", dict(ids=[ref[0], V], start=P, draft_len=1)),           # out of vocabulary
            ("start", dict(ids=[ref[0], 1], start=P + 1, draft_len=1)),           # position mismatch
            ("start", dict(ids=[ref[0], 1], start=0, draft_len=1)),
            ("exited", dict(ids=[ref[0], 1], start=P, draft_len=1, exited=[1, 0])),  # a verified row marked exited
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0,
                                 draft_probs=np.full((2, V), 1 / V))),              # q of the wrong shape
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0,
                                 draft_probs=np.full((1, V + 1), 1 / (V + 1)))),
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0,
                                 draft_probs=2 * uniform)),                         # not a distribution
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0,
                                 draft_probs=np.where(np.arange(V) == 1, -0.5, 1.5 / (V - 1))[None])),
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0,
                                 draft_probs=np.where(np.arange(V) == 1, 0.0, 1 / (V - 1))[None])),  # q(draft) = 0
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0,
                                 draft_probs=np.full((1, V), np.nan))),
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0)),   # sampling needs q
            ("draft_probs", dict(ids=[ref[0], 1], start=P, draft_len=1, draft_probs=uniform)),  # greedy takes none
            ("top_p", dict(ids=[ref[0], 1], start=P, draft_len=1, temperature=1.0, top_p=0.0, draft_probs=uniform)),
            ("temperature", dict(ids=[ref[0]], start=P, temperature=-1.0)),
            ("seed", dict(ids=[ref[0]], start=P, temperature=1.0, seed=-3)),
        ]
        for name, kw in bad:
            with pytest.raises(grpc.RpcError) as err:
                call(**kw)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
            assert f"'{name}'" in err.value.details() or f"input {name}" in err.value.details(), (name, err.value.details())
        # the session is intact: verify two right drafts, then two wrong ones (the cache rolls back)
        out = call([ref[0], ref[1], ref[2]], P, draft_len=2)
        assert (out["accepted"][0], out["next_token"][0], out["work"][4]) == (2, ref[3], P + 3)
        out = call([ref[3], (ref[4] + 1) % V, ref[5]], P + 3, draft_len=2)
        assert (out["accepted"][0], out["next_token"][0], out["work"][4]) == (0, ref[4], P + 4)
        assert call([ref[4]], P + 4)["next_token"][0] == ref[5]
        with pytest.raises(grpc.RpcError) as err:   # a model that takes hidden states verifies nothing
            client.infer("llm", {"hidden_states": np.zeros((2, 64), np.float32), "start": np.array([0], np.int64),
                                 "exited": np.zeros(2, np.uint8), "draft_len": np.array([1], np.int64)},
                         parameters={"sequence_id": 4243, "sequence_start": True})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'draft_len'" in err.value.details()


# --- bytes and the command line -------------------------------------------------------------
def test_each_further_token_adds_at_most_16_bytes(llm, ref):
    """What one more token id adds to a serialized verification request (the prompt and the fixed
    fields aside), against what one more int8 layer-k state adds to a collaborative one."""
    e = spec(llm, gamma=8)
    extra = {"draft_len": np.array([3], np.int64)}
    ids = [np.array(ref[:t], np.int64) for t in (8, 9)]
    grow = [e._request(2**60, 100, r, np.zeros(len(r), bool), False, extra)[0].ByteSize() for r in ids]
    assert grow[1] - grow[0] <= 16
    c = CollabLlm(llm[0], mode="collaborative", cloud=llm[1].address)
    states = [np.random.default_rng(0).normal(size=(t, 64)).astype(np.float32) for t in (8, 9)]
    grow_states = [c._request(2**60, 100, r, np.zeros(len(r), bool), False)[0].ByteSize() for r in states]
    assert grow_states[1] - grow_states[0] >= 64
    r = spec(llm, gamma=8, drafter=oracle(ref)).generate(PROMPT, N_NEW)   # ids sent per generated token
    assert (r.counters.states_sent - len(PROMPT)) * (grow[1] - grow[0]) / N_NEW <= 16


def test_cli_speculative_json(llm):
    model_dir, proc = llm
    cmd = [sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(model_dir), "--mode", "speculative",
           "--cloud", proc.address, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(N_NEW),
           "--gamma", "3", "--temperature", "0.8", "--top-k", "20", "--seed", "5", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    c = row["counters"]
    want = spec(llm, gamma=3).generate(PROMPT, N_NEW, sampling=Sampling(temperature=0.8, top_k=20, seed=5))
    assert row["tokens"] == want.tokens and row["sources"] == want.sources and set(row["sources"]) <= {"draft", "cloud"}
    assert (c["drafted"], c["accepted"]) == (want.counters.drafted, want.counters.accepted)
    assert c["accepted"] == row["sources"].count("draft") and c["drafted"] > 0
    assert c["round_trips"] == c["requests"] and c["bytes_received"] > 0 and c["request_bytes"] > 0
    with pytest.raises(ValueError, match="gamma"):
        spec(llm, gamma=0)
    with pytest.raises(ValueError, match="speculative"):
        CollabLlm(model_dir, mode="standalone").generate(PROMPT, 2, sampling=Sampling(temperature=1.0))
