"""The collaborative LLM end to end: the device side (edge_runtime.collab.device) against a real
cloud-service subprocess serving the llm_continuation backend, on a tiny random Llama with an
exit head after layer 2 of 4."""
import json

import grpc
import numpy as np
import pytest
import torch

from edge_runtime.collab.device import CollabLlm
from edge_runtime.client.oip_client import OipClient
from server_process import ServerProcess
from split.codec import decode, encode
from split.llama import generate, load_llama
from llm_models import K, L, make_model, write_model
from split.llama.exits import load_exit_heads

PROMPT = [5, 17, 3, 42, 8, 11]
N_NEW = 12


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ee_lm")
    make_model(model_dir)
    repo = tmp_path_factory.mktemp("llm_repo")
    write_model(repo, "llm", model_dir, K)
    write_model(repo, "llm_prop", model_dir, K, "propagated")
    write_model(repo, "llm_full", model_dir, 0)
    write_model(repo, "llm_tight", model_dir, K, max_state_bytes=50_000)  # one ~33 KB session fits, two do not
    write_model(repo, "llm_fp16", model_dir, K,
                extra='[[input]]\nname = "hidden_states"\ndata_type = "TYPE_FP16"\ndims = [-1, 64]\n')
    proc = ServerProcess(repo)
    yield model_dir, repo, proc
    proc.kill()


def edge(llm, **kw):
    model_dir, _, proc = llm
    kw.setdefault("mode", "collaborative")
    return CollabLlm(model_dir, cloud=proc.address, **kw)


@torch.no_grad()
def full_greedy(model_dir):
    return list(generate(load_llama(model_dir), PROMPT, N_NEW))


@torch.no_grad()
def prompt_confidences(model_dir) -> np.ndarray:
    """The exit head's max probability at each prompt position (computed here, independently)."""
    model, head = load_llama(model_dir, layers=range(K), with_head=False), load_exit_heads(model_dir)[K]
    h = model.forward_layers(model.embed(torch.tensor([PROMPT])), 0, K, 0)
    return torch.softmax(head(h)[0].double(), -1).max(-1).values.numpy()


@torch.no_grad()
def standalone_greedy(model_dir):
    """Layers [0, K) + exit head, recomputing the whole prefix each step (no KV cache)."""
    model, head = load_llama(model_dir, layers=range(K), with_head=False), load_exit_heads(model_dir)[K]
    toks = list(PROMPT)
    for _ in range(N_NEW):
        h = model.forward_layers(model.embed(torch.tensor([toks])), 0, K, 0)
        toks.append(int(head(h)[0, -1].argmax()))
    return toks[len(PROMPT):]


@torch.no_grad()
def int8_cut_greedy(model_dir, wire="int8"):
    """The full model with each layer-K state sent through the int8 per-row codec (or fp16), no KV cache."""
    model = load_llama(model_dir)
    toks = list(PROMPT)
    for _ in range(N_NEW):
        h = model.forward_layers(model.embed(torch.tensor([toks])), 0, K, 0)[0].numpy()
        if wire == "fp16":
            h = torch.from_numpy(h.astype(np.float16).astype(np.float32))[None]
        else:
            enc = encode(h, "int8", axis=0)
            h = torch.from_numpy(decode(enc.data, enc.parameters))[None]
        toks.append(int(model.head(model.forward_layers(h, K, L, 0))[0, -1].argmax()))
    return toks[len(PROMPT):]


def test_always_offload_is_the_full_model(llm):
    e = edge(llm, threshold=1.0, wire="fp32")
    r = e.generate(PROMPT, N_NEW)
    assert r.tokens == full_greedy(llm[0])
    assert set(r.sources) == {"cloud"} and r.counters.resends == 0
    # every position was sent exactly once: the prompt, then one new state per generated token
    assert r.counters.states_sent == len(PROMPT) + N_NEW - 1
    assert r.counters.cloud_layer_evals == (len(PROMPT) + N_NEW - 1) * (L - K)


def test_always_offload_int8_matches_the_codec_reference(llm):
    r = edge(llm, threshold=1.0).generate(PROMPT, N_NEW)
    assert r.tokens == int8_cut_greedy(llm[0])
    per_state = r.counters.bytes_sent / r.counters.states_sent
    assert per_state < 64 + 48, per_state  # hidden_size bytes + per-row scale/zero point/flag + request fields


def test_fp16_wire_to_an_fp16_model(llm):
    r = edge(llm, threshold=1.0, wire="fp16", cloud_model="llm_fp16").generate(PROMPT, N_NEW)
    assert r.tokens == int8_cut_greedy(llm[0], "fp16")
    assert r.counters.bytes_sent == 2 * 64 * r.counters.states_sent + r.counters.requests * 8 + r.counters.states_sent


def test_threshold_zero_is_standalone(llm):
    want = standalone_greedy(llm[0])
    r = edge(llm, threshold=0.0).generate(PROMPT, N_NEW)
    assert r.tokens == want and set(r.sources) == {"edge"} and r.counters.requests == 0
    s = CollabLlm(llm[0], mode="standalone").generate(PROMPT, N_NEW)
    assert s.tokens == want


@pytest.mark.parametrize("model", ["llm", "llm_prop"])
def test_mixed_threshold_sends_each_state_once(llm, model):
    confs = edge(llm, threshold=0.0).generate(PROMPT, N_NEW).confidences
    threshold = float(np.median(confs))
    r = edge(llm, threshold=threshold, cloud_model=model).generate(PROMPT, N_NEW)
    assert "edge" in r.sources and "cloud" in r.sources
    c = r.counters
    last_cloud = max(i for i, s in enumerate(r.sources) if s == "cloud")
    assert c.states_sent == len(PROMPT) + last_cloud and c.resends == 0  # never a state twice
    n_exited = sum(1 for s in r.sources[:last_cloud] if s == "edge")
    n_exited += sum(prompt_confidences(llm[0])[:-1] >= threshold)   # confident prompt positions too
    if model == "llm":    # exact: every state through [K, L)
        assert c.cloud_layer_evals == c.states_sent * (L - K) and c.cloud_kv_evals == 0
    else:                 # propagated: exited tokens only get K/V projections
        assert c.cloud_kv_evals == n_exited * (L - K)
        assert c.cloud_layer_evals == (c.states_sent - n_exited) * (L - K)


def test_cloud_only_is_the_full_model(llm):
    r = edge(llm, mode="cloud-only").generate(PROMPT, N_NEW)
    assert r.tokens == full_greedy(llm[0]) and set(r.sources) == {"cloud"}
    assert r.counters.cloud_layer_evals == (len(PROMPT) + N_NEW - 1) * L


def test_eviction_resends_and_continues_identically(llm):
    want = edge(llm, threshold=1.0, cloud_model="llm_tight", wire="fp32").generate(PROMPT, N_NEW).tokens
    other = edge(llm, threshold=1.0, cloud_model="llm_tight", wire="fp32")

    def evict(step, token, source):
        if step == 4:   # another conversation pushes ours out of the 50 KB budget (LRU)
            other.generate([1, 2, 3], 2)

    e = edge(llm, threshold=1.0, cloud_model="llm_tight", wire="fp32", max_kept_states=2)
    r = e.generate(PROMPT, N_NEW, on_token=evict)
    assert r.tokens == want and not r.degraded
    assert r.counters.resends == 1 and r.counters.recomputed_states > 0


def test_malformed_hidden_states_are_rejected_and_the_session_survives(llm):
    _, _, proc = llm
    C = 64
    with OipClient(proc.address) as client:
        def call(h, start, exited, begin=False, params=None):
            return client.infer("llm", {"hidden_states": h, "start": np.array([start], np.int64),
                                        "exited": np.array(exited, np.uint8)},
                                parameters={"sequence_id": 777, **({"sequence_start": True} if begin else {})},
                                input_parameters=params)
        ok = call(np.zeros((3, C), np.float32), 0, [0, 0, 0], begin=True)
        assert ok["work"][4] == 3
        bad = [
            (np.zeros((1, C + 1), np.float32), 3, [0], None),           # wrong hidden size
            (np.zeros((1, C), np.float32), 5, [0], None),               # skips positions 3, 4
            (np.zeros((1, C), np.float32), 0, [0], None),               # resends seen positions
            (np.zeros((2, C), np.float32), 3, [0], None),               # exited has the wrong length
            (np.zeros((1, C), np.float32), 3, [1], None),               # the row to decide marked exited
            (np.full((1, C), np.nan, np.float32), 3, [0], None),        # NaN
            (np.zeros((1, C), np.uint8), 3, [0], {"hidden_states": {"codec": "int8", "scale": "1,2", "zero_point": "0,0", "axis": 0}}),
        ]
        for h, start, exited, params in bad:
            with pytest.raises(grpc.RpcError) as err:
                call(h, start, exited, params=params)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        after = call(np.zeros((1, C), np.float32), 3, [0])   # the session is intact
        assert after["work"][3] == 4 and after["work"][4] == 4
        with pytest.raises(grpc.RpcError) as err:
            client.infer("llm", {"hidden_states": np.zeros((1, C), np.float32), "start": np.array([0], np.int64),
                                 "exited": np.zeros(1, np.uint8)}, parameters={"sequence_id": 778})
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cloud_killed_mid_generation_degrades_then_resumes(llm, tmp_path):
    model_dir, repo, _ = llm
    proc = ServerProcess(repo)
    port = proc.port
    procs = [proc]
    e = CollabLlm(model_dir, mode="collaborative", cloud=proc.address, threshold=1.0, wire="fp32",
                  timeout_s=2.0, backoff_s=0.01, max_backoff_s=0.02)

    def chaos(step, token, source):
        if step == 2:
            procs[0].kill()
        if step == 6:
            procs.append(ServerProcess(repo, "--port", str(port)))
            grpc.channel_ready_future(e.client.channel).result(timeout=30)

    try:
        r = e.generate(PROMPT, 16, on_token=chaos)
    finally:
        for p in procs:
            p.kill()
    assert len(r.tokens) == 16 and r.degraded
    assert r.sources[:3] == ["cloud"] * 3
    assert "degraded" in r.sources[3:7] and r.sources[-1] == "cloud"
    assert r.counters.resends == 1            # the restarted cloud did not know the session
    json.dumps(r.counters.as_dict())


def test_cloud_only_without_cloud_degrades_to_the_exit_head(llm):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CollabLlm(llm[0], mode="cloud-only", cloud=f"127.0.0.1:{port}", timeout_s=1.0).generate(PROMPT, 4)
    assert r.sources == ["degraded"] * 4 and r.tokens == standalone_greedy(llm[0])[:4]


def test_cli_generate_json(llm):
    import subprocess
    import sys
    model_dir, _, proc = llm
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(model_dir),
                          "--mode", "collaborative", "--cloud", proc.address, "--threshold", "1.0", "--wire", "fp32",
                          "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(N_NEW), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["tokens"] == full_greedy(model_dir) and row["degraded"] is False and row["edge_fraction"] == 0
    bad = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(model_dir),
                          "--mode", "collaborative", "--threshold", "0.5", "--prompt-ids", "1,2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--cloud" in bad.stderr


def test_calibrate_meets_its_target_and_is_used_by_generate(llm, tmp_path):
    import shutil
    from split.llama.calibrate import calibrate_threshold, sweep, teacher_forced
    model_dir = tmp_path / "m"
    shutil.copytree(llm[0], model_dir)
    ids = torch.randint(0, 97, (129,), generator=torch.Generator().manual_seed(3)).tolist()
    report = calibrate_threshold(model_dir, ids, max_ppl_increase=0.05, context=64, write=True)
    assert report["met"] and report["ppl_increase"] <= 0.05
    stats = teacher_forced(model_dir, ids, context=64)
    lo, hi = sweep(stats, [0.0, 1.01])
    assert lo["edge_fraction"] == 1.0 and hi["edge_fraction"] == 0.0 and hi["top1_agreement"] == 1.0
    meta = json.loads((model_dir / "exits.json").read_text())
    assert meta["threshold"]["max_prob"]["value"] == report["threshold"]
    # propagated catch-up changes only the cloud's (non-exited) predictions, and none at threshold > 1
    prop = teacher_forced(model_dir, ids, context=64, propagated_threshold=1.01)
    assert np.allclose(prop["full_logp"], stats["full_logp"], atol=1e-4)


def test_next_turn_continues_the_same_session(llm):
    e = edge(llm, threshold=1.0, wire="fp32")
    first = e.generate(PROMPT[:3], 4)
    turn = PROMPT[3:]
    second = e.generate(turn, N_NEW, conversation=first.conversation)
    # the same as one generation over the whole history, with no state sent twice
    history = PROMPT[:3] + first.tokens + turn
    want = list(generate(load_llama(llm[0]), history, N_NEW))
    assert second.tokens == want and second.counters.resends == 0
    assert first.counters.states_sent + second.counters.states_sent == len(history) + N_NEW - 1


@torch.no_grad()
def test_propagated_catch_up_is_kv_projection_of_the_exit_state(llm):
    """For exited rows, every deeper layer's cached K/V = that layer's norm + k/v projection (+ RoPE
    on K) of the exit-layer state; the non-exited rows run the layers as usual."""
    from split.llama import KVCache
    from split.llama.exits import continue_layers
    from split.llama.model import apply_rope
    model = load_llama(llm[0])
    h = torch.randn(1, 5, 64)
    exited = [False, True, True, False, False]
    cache = KVCache()
    out, idx, n_full, n_kv = continue_layers(model, h, exited, 0, cache, range(K, L))
    assert idx == [0, 3, 4] and (n_full, n_kv) == (3, 2) and out.shape == (1, 3, 64)
    pos = torch.arange(5)
    cos, sin = model.rope(pos, h.dtype)
    for i in range(K, L):
        layer = model.layers[str(i)]
        x = layer.input_layernorm(h[:, 1:3])
        k = layer.self_attn.k_proj(x).view(1, 2, 2, 16).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(1, 2, 2, 16).transpose(1, 2)
        assert torch.allclose(cache.k[i][:, :, 1:3], apply_rope(k, cos[1:3], sin[1:3]), atol=1e-6)
        assert torch.allclose(cache.v[i][:, :, 1:3], v, atol=1e-6)
        assert cache.pos[i][:5].tolist() == [0, 1, 2, 3, 4]
    # with nothing exited it is exactly forward_layers
    full = model.forward_layers(h, K, L, 0)
    out2, *_ = continue_layers(model, h, [False] * 5, 0, KVCache(), range(K, L))
    assert torch.equal(out2, full)


def test_end_frees_the_cloud_session(llm):
    e = edge(llm, threshold=1.0)
    first = e.generate(PROMPT, 4)
    conv = first.conversation
    e.end(conv)                              # sequence_end, no new states
    assert conv.begin                        # a later turn starts a fresh session
    rows = np.zeros((1, 64), np.float32)
    with pytest.raises(grpc.RpcError) as err:   # the cloud no longer holds the old one
        e._call_cloud(conv.seq_id, conv.acked, rows, np.zeros(1, np.uint8), begin=False)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    again = e.generate([3], 4, conversation=conv)   # continuing anyway resends everything, same tokens
    want = list(generate(load_llama(llm[0]), PROMPT + first.tokens + [3], 4))
    assert again.tokens == want and again.counters.resends == 0


# --- the device half from the tensor-parallel side's int8 / int4 blocks (issue 12) ---------------
@pytest.fixture(scope="module")
def qcache(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-shards")


@torch.no_grad()
def quantized_reference(model_dir, scheme):
    """Layers [0, K) quantized in this process, with the same int8 embedding rows."""
    from split.llama.quantize import Int8, quantize_model
    model = quantize_model(load_llama(model_dir, layers=range(K), with_head=False), scheme, 32)
    model.embed_tokens.weight.data = Int8().dequantize(Int8().quantize(model.embed_tokens.weight))
    return model


@torch.no_grad()
def prompt_states(model_dir):
    """The float model's layer-K states of the prompt."""
    model = load_llama(model_dir, layers=range(K), with_head=False)
    return model.forward_layers(model.embed(torch.tensor([PROMPT])), 0, K, 0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.no_grad()
def test_quantized_device_half_is_the_model_quantized_in_process(llm, qcache, scheme):
    from edge_runtime.tp.streamed_head import StreamedEmbedding
    e = CollabLlm(llm[0], mode="standalone", quantize=scheme, group_size=32, cache_dir=qcache)
    assert isinstance(e.model.embed_tokens, StreamedEmbedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in e.model.modules())  # no float projection
    ref, head = quantized_reference(llm[0], scheme), load_exit_heads(llm[0])[K]
    tokens = torch.tensor([PROMPT])
    h = e.model.forward_layers(e.model.embed(tokens), 0, K, 0)
    want = ref.forward_layers(ref.embed(tokens), 0, K, 0)
    assert torch.equal(h, want) and torch.equal(e.head(h), head(want))   # bitwise: the same kernels on the same bytes
    assert not torch.equal(h, prompt_states(llm[0]))                       # quantized, not the float model
    toks = list(PROMPT)                                # generation (KV cache) = recomputing the prefix each step
    for _ in range(N_NEW):
        toks.append(int(head(ref.forward_layers(ref.embed(torch.tensor([toks])), 0, K, 0))[0, -1].argmax()))
    assert e.generate(PROMPT, N_NEW).tokens == toks[len(PROMPT):]
    stamps = {p: p.stat().st_mtime_ns for p in qcache.glob("*/plan.json")}
    assert stamps
    CollabLlm(llm[0], mode="standalone", quantize=scheme, cache_dir=qcache)
    assert {p: p.stat().st_mtime_ns for p in qcache.glob("*/plan.json")} == stamps   # prepared once, cached


def test_cli_collaborative_generation_with_an_int4_device_half(llm, qcache, tmp_path):
    import os
    import subprocess
    import sys
    model_dir, _, proc = llm
    confs = CollabLlm(model_dir, mode="standalone", quantize="int4", cache_dir=qcache).generate(PROMPT, N_NEW).confidences
    env = dict(os.environ, EDGEFOLD_CACHE=str(tmp_path))      # the tp CLI's cache: $EDGEFOLD_CACHE/tp-shards
    cmd = [sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(model_dir), "--cloud", proc.address,
           "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(N_NEW), "--json"]
    out = subprocess.run(cmd + ["--quantize", "int4", "--group-size", "32", "--threshold", str(float(np.median(confs)))],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert len(row["tokens"]) == N_NEW and {"edge", "cloud"} <= set(row["sources"]) and not row["degraded"]
    assert len(list((tmp_path / "tp-shards").iterdir())) == 1
    bad = subprocess.run(cmd + ["--quantize", "int3"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "--quantize: invalid choice: 'int3'" in bad.stderr
    with pytest.raises(ValueError, match="quantize must be one of"):
        CollabLlm(model_dir, mode="standalone", quantize="fp4")
    with pytest.raises(ValueError, match="group_size must be one of"):
        CollabLlm(model_dir, mode="standalone", quantize="int4", group_size=48, cache_dir=qcache)
