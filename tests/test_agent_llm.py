"""The agent's LLM pipelines in process: the `llm` kind (one device, the tp engine at world size 1)
and the token stream every LLM kind serves (what the OpenAI-compatible HTTP layer calls).

    .venv/bin/python -m pytest -q tests/test_agent_llm.py

Real components throughout: a tiny random-initialised Llama written by transformers (biases and
randomised norms) with a WordLevel tokenizer.json, prepared into a temporary tp cache.
"""
import os
import re
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from hf_random import randomize_norms_and_biases
transformers = pytest.importorskip("transformers")

from edge_runtime.agent.config import PipelineConfig, load_agent_config  # noqa: E402
from edge_runtime.agent.llm_pipelines import CollabPipeline, TensorParallelPipeline, TokenStream  # noqa: E402
from edge_runtime.agent.pipeline import Context, PipelineInputError  # noqa: E402
from edge_runtime.agent.pipeline_factory import open_pipeline  # noqa: E402
from edge_runtime.tp.collective import LocalCollective  # noqa: E402
from edge_runtime.tp.engine import Master  # noqa: E402
from edge_runtime.tp.launch import cached_shards  # noqa: E402
from edge_runtime.tp.prepare import prepare  # noqa: E402
from split.llama import Sampling, generate, load_llama  # noqa: E402
from split.llama.quantize import Int8  # noqa: E402
from test_tp_engine import _write_tokenizer  # noqa: E402
from test_tp_quantized import quantized_reference  # noqa: E402

PROMPT = [3, 17, 42, 5, 99, 7]
N = 12
CTX = Context(None, None, None, None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(folder, transformers' greedy ids after PROMPT, never stopping early)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                   mlp_bias=True, max_position_embeddings=64, initializer_range=0.2,
                                   eos_token_id=16)   # the third greedy token: infer stops there
    hf = randomize_norms_and_biases(transformers.LlamaForCausalLM(cfg).eval())
    path = tmp_path_factory.mktemp("llm")
    hf.save_pretrained(path, safe_serialization=True)
    _write_tokenizer(path, 128)
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, do_sample=False,
                          eos_token_id=[], pad_token_id=0)[0, len(PROMPT):].tolist()
    return path, ids


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-cache")


@pytest.fixture(scope="module")
def llm(ckpt, cache):
    """The `llm` kind as the agent opens it (pipeline_factory), fp32, every block resident."""
    spec = PipelineConfig("tiny", "llm", path=ckpt[0], options={"cache_dir": str(cache), "max_new_tokens": N})
    pipe = open_pipeline(spec, ckpt[0], CTX)
    yield pipe
    pipe.close()


def run_in_thread(stream):
    """Iterate a stream in another thread: (thread, its tokens so far)."""
    got = []
    t = threading.Thread(target=lambda: got.extend(stream), daemon=True)
    t.start()
    return t, got


def test_llm_kind_streams_what_split_llama_and_transformers_generate(ckpt, llm):
    folder, hf_ids = ckpt
    assert llm.kind == "llm" and llm.describe() == {"kind": "llm", "quantize": None, "window": 4, "dtype": "fp32"}
    assert llm.eos_ids == (16,) and llm.context_length == 64 and llm.vocab_size == 128 and llm.samples
    assert llm.model_folder == folder and llm.tokenizer.encode("t5 t9").ids == [5, 9]
    with torch.no_grad():
        reference = list(generate(load_llama(folder), PROMPT, N))
    s = llm.stream(PROMPT, N, Sampling(), stop_ids=())
    tokens = list(s)
    assert tokens == reference == hf_ids
    assert (s.finish_reason, s.prompt_tokens, s.completion_tokens, s.device_tokens) == ("length", 6, N, None)
    assert len(s.seconds) == N and s.queue_s is not None
    # OIP infer: the tp pipeline's tensors (text through the tokenizer), stopping at EOS
    out = llm.infer({"prompt": np.array([" ".join(f"t{i}" for i in PROMPT).encode()], dtype=object)},
                    {"max_new_tokens": N})
    stop_at = next((i + 1 for i, t in enumerate(reference) if t in llm.eos_ids), N)
    assert stop_at == 3 and list(llm.stream(PROMPT, N)) == reference[:3]    # EOS ends a stream by default
    assert out["tokens"].tolist() == reference[:stop_at]
    assert out["text"][0].decode() == " ".join(f"t{i}" for i in reference[:stop_at])


def test_stop_ids_max_tokens_sampling_and_bad_requests(ckpt, llm):
    _, reference = ckpt
    i = 4
    stop = reference[i]
    first = reference.index(stop)
    s = llm.stream(PROMPT, N, None, stop_ids=[stop])
    assert list(s) == reference[:first + 1] and s.finish_reason == "stop"
    s = llm.stream(PROMPT, 3, None, stop_ids=())
    assert list(s) == reference[:3] and s.finish_reason == "length"
    s = llm.stream(PROMPT, 0)
    assert list(s) == [] and s.finish_reason == "length"
    # seeded sampling: the same seed, the same tokens
    sampled = [list(llm.stream(PROMPT, 8, Sampling(temperature=1.0, top_p=0.9, seed=seed), ())) for seed in (1, 1)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 8
    for prompt, n, words in (([], 4, "at least one"), ([3, 500], 4, "[0, 128)"), (PROMPT, 60, "64 tokens")):
        with pytest.raises(PipelineInputError, match=re.escape(words)):
            llm.stream(prompt, n)
    with pytest.raises(PipelineInputError, match="6 in the prompt, 60 to generate"):
        llm.stream(PROMPT, 60)


def test_a_stream_holds_the_pipeline_and_closing_it_releases_it(ckpt, llm):
    _, reference = ckpt
    first = llm.stream(PROMPT, N, None, ())
    assert [next(first), next(first)] == reference[:2]
    second = llm.stream(PROMPT, N, None, ())
    t, got = run_in_thread(second)
    time.sleep(0.3)
    assert t.is_alive() and got == [], "a second generation ran while the first held the pipeline"
    first.close()                        # the client went away: no further token, the lock is free
    t.join(30)
    assert not t.is_alive() and got == reference and second.finish_reason == "length"
    assert first.finish_reason is None and first.tokens == reference[:2] and first.closed
    with pytest.raises(StopIteration):
        next(first)
    # dropped unfinished (no close): released at once
    dropped = llm.stream(PROMPT, N, None, ())
    next(dropped)
    del dropped
    assert list(llm.stream(PROMPT, 2, None, ())) == reference[:2]
    # closed from another thread while waiting for the pipeline: it ends without running
    holder = llm.stream(PROMPT, N, None, ())
    next(holder)
    waiting = llm.stream(PROMPT, N, None, ())
    t, got = run_in_thread(waiting)
    time.sleep(0.2)
    waiting.close()
    t.join(5)
    assert not t.is_alive() and got == [] and waiting.queue_s is None
    with holder:
        assert next(holder) == reference[1]
    assert list(llm.stream(PROMPT, 2, None, ())) == reference[:2]


def test_closed_from_another_thread_while_a_token_is_computed():
    """The consumer's thread is inside next(): it gets no further token once that step ends."""
    lock, computing, proceed = threading.Lock(), threading.Event(), threading.Event()

    def run(p):
        yield 1
        computing.set()
        proceed.wait(5)                    # the step another thread's close() lands in
        p.finish_reason = "length"
        yield 2

    s = TokenStream(lock, run, [0])
    assert next(s) == 1
    t, got = run_in_thread(s)
    assert computing.wait(5)
    s.close()                              # "generator already executing": the flag ends it
    proceed.set()
    t.join(5)
    assert not t.is_alive() and got == [] and s.tokens == [1] and s.finish_reason is None
    assert not lock.locked()


def test_int8_llm_is_the_tp_engines_world_one_int8(ckpt, cache):
    folder, _ = ckpt
    spec = PipelineConfig("tiny8", "llm", path=folder, options={"cache_dir": str(cache), "quantize": "int8",
                                                                  "window": 2})
    pipe = open_pipeline(spec, folder, CTX)
    try:
        assert pipe.describe() == {"kind": "llm", "quantize": "int8", "window": 2, "dtype": "fp32"}
        tokens = list(pipe.stream(PROMPT, N, None, ()))
    finally:
        pipe.close()
    shards = cached_shards(folder, 1, None, cache, False, None, Int8())
    with Master(shards / "rank0", LocalCollective(), 0) as m:
        engine = list(m.generate(PROMPT, N))
    with torch.no_grad():
        reference = list(generate(quantized_reference(folder, "int8"), PROMPT, N))
    assert tokens == engine == reference


def test_tp_pipeline_streams_what_it_infers(ckpt, tmp_path):
    folder, reference = ckpt
    prepare(folder, 2, [1.0, 1.0], tmp_path / "shards", progress=False)
    pipe = TensorParallelPipeline("big", tmp_path / "shards", {"max_new_tokens": N}, CTX)
    try:
        assert pipe.eos_ids == (16,) and pipe.context_length == 64 and pipe.tokenizer is not None
        s = pipe.stream(PROMPT, N, None, ())
        streamed = list(s)
        assert s.finish_reason == "length" and streamed == reference
        inferred = pipe.infer({"prompt_ids": np.array(PROMPT, np.int64)}, {"max_new_tokens": N})["tokens"].tolist()
        stop_at = next((i + 1 for i, t in enumerate(reference) if t in pipe.eos_ids), N)
        assert inferred == streamed[:stop_at]
        early = pipe.stream(PROMPT, N, None, ())
        next(early)
        early.close()                          # the workers are between steps: the next request runs
        assert list(pipe.stream(PROMPT, 3, None, ())) == reference[:3]
    finally:
        pipe.close()


def test_collab_llm_streams_its_generate(tmp_path):
    from edge_runtime.collab.device import CollabLlm
    from llm_models import make_model
    make_model(tmp_path / "lm")
    prompt = [5, 17, 3, 42, 8, 11]                                 # this model's vocabulary: 97
    pipe = CollabPipeline("chat", tmp_path / "lm", {"mode": "standalone", "max_new_tokens": 5}, CTX)
    try:
        assert not pipe.samples and pipe.context_length == 256 and pipe.tokenizer is None
        reference = CollabLlm(tmp_path / "lm", "standalone").generate(prompt, 6).tokens
        s = pipe.stream(prompt, 6, Sampling(temperature=1.0), ())
        assert list(s) == reference and s.finish_reason == "length"
        assert s.device_tokens == 6 and s.sources == ["edge"] * 6
        s = pipe.stream(prompt, 6, None, [reference[1]])
        assert list(s) == reference[:reference.index(reference[1]) + 1] and s.finish_reason == "stop"
        early = pipe.stream(prompt, 6, None, ())
        next(early)
        early.close()
        out = pipe.infer({"prompt_ids": np.array(prompt, np.int64)}, {})
        assert out["tokens"].tolist() == reference[:5] and out["sources"].tolist() == [b"edge"] * 5
    finally:
        pipe.close()


def test_agent_toml_accepts_the_llm_kind(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d"\n[[pipeline]]\nname = "chat"\nkind = "llm"\npath = "ckpt"\n'
                    'quantize = "int4"\nwindow = 2\n')
    spec = load_agent_config(path).pipelines[0]
    assert (spec.kind, spec.path, spec.options) == ("llm", tmp_path / "ckpt", {"quantize": "int4", "window": 2})
    with pytest.raises(ValueError, match="quantize"):
        open_pipeline(PipelineConfig("x", "llm", path=tmp_path, options={"quantize": "int3"}), tmp_path, CTX)


def test_close_lets_the_stream_in_flight_finish(ckpt, cache):
    """A replaced pipeline is closed while a client still streams from it: close() waits for that
    generation to end (up to close_wait_s), so the client gets every token."""
    spec = PipelineConfig("tiny", "llm", path=ckpt[0], options={"cache_dir": str(cache)})
    pipe = open_pipeline(spec, ckpt[0], CTX)
    stream = pipe.stream(PROMPT, N, None, ())
    assert next(stream) == ckpt[1][0]
    closer = threading.Thread(target=pipe.close, daemon=True)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for the stream
    assert [ckpt[1][0], *stream] == ckpt[1] and stream.finish_reason == "length"
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        list(pipe.stream(PROMPT, 2, None, ()))
