"""The one decode loop (split/llama/generate.py) against transformers' generate on a tiny random
checkpoint: greedy, repetition penalty, EOS ids from generation_config.json, stop sequences.

    .venv/bin/python -m pytest -q tests/test_generate.py
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from hf_random import randomize_norms_and_biases
transformers = pytest.importorskip("transformers")

from split.llama import Generation, LlamaConfig, Sampling, Stop, generate, load_llama  # noqa: E402

PROMPT = [5, 17, 3, 99, 42, 7, 7, 64]
N = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                                   initializer_range=0.2, eos_token_id=1)
    hf = randomize_norms_and_biases(transformers.LlamaForCausalLM(cfg).eval())
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf


def hf_generate(hf, n=N, **kwargs) -> list[int]:
    prompt = torch.tensor([PROMPT])
    kwargs.setdefault("eos_token_id", [])  # [] : never stop early
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kwargs)
    return out[0, len(PROMPT):].tolist()


def test_greedy_and_repetition_penalty_match_transformers(ckpt):
    path, hf = ckpt
    model = load_llama(path)
    run = generate(model, PROMPT, N)
    assert list(run) == hf_generate(hf) and run.finish_reason == "length"
    penalised = list(generate(model, PROMPT, N, Sampling(repetition_penalty=1.5)))
    assert penalised == hf_generate(hf, repetition_penalty=1.5)
    assert penalised != run.tokens  # the penalty changed something, so the comparison means something


def test_eos_ids_come_from_generation_config(ckpt, tmp_path):
    path, hf = ckpt
    assert LlamaConfig.from_dir(path).eos_token_ids == (1,)
    ref = hf_generate(hf)
    eos = [ref[4], ref[9]]  # two tokens the model produces: it must stop at the first of them
    for f in path.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    config = LlamaConfig.from_dir(tmp_path)
    assert config.eos_token_ids == tuple(eos)
    run = generate(load_llama(tmp_path), PROMPT, N, stop=Stop.of(config))
    assert list(run) == hf_generate(hf, eos_token_id=eos)[:ref.index(eos[0]) + 1] == ref[:ref.index(eos[0]) + 1]
    assert run.finish_reason == "stop"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ValueError, match="eos_token_id"):
        LlamaConfig.from_dir(tmp_path)


def test_stop_sequences_end_after_the_whole_sequence(ckpt):
    path, hf = ckpt
    model = load_llama(path)
    ref = hf_generate(hf)
    seq = ref[6:9]
    run = generate(model, PROMPT, N, stop=Stop(sequences=[[ref[0], 10**6], seq]))  # the first never completes
    assert list(run) == ref[:9] and run.finish_reason == "stop"


def test_the_loop_with_a_step_function():
    """The loop alone: a step that makes token t+1 the argmax after token t, positions in order."""
    fed = []

    def step(ids, start):
        fed.append((list(ids), start))
        logits = torch.zeros(10)
        logits[(ids[-1] + 1) % 10] = 1.0
        return logits

    run = Generation(step, [3, 4], 5)
    assert list(run) == [5, 6, 7, 8, 9] and run.finish_reason == "length"
    assert fed == [([3, 4], 0), ([5], 2), ([6], 3), ([7], 4), ([8], 5)]  # the last token is not fed
    with pytest.raises(RuntimeError, match="runs once"):
        list(run)
    assert list(Generation(step, [3], 0)) == [] and Generation(step, [3], 4, stop=Stop(eos_ids=[5])).tokens == []
    stopped = Generation(step, [3], 4, stop=Stop(eos_ids=[5]))
    assert list(stopped) == [4, 5] and stopped.finish_reason == "stop"
    picked = Generation(step, [3], 3, choose=lambda logits, history: len(history))  # a chooser of its own
    assert list(picked) == [1, 2, 3]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            Generation(step, [3], bad)
    with pytest.raises(ValueError, match="prompt"):
        Generation(step, [], 3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        Sampling(repetition_penalty=0)
    with pytest.raises(ValueError, match="stop sequences"):
        Stop(sequences=[[]])


def test_seeded_sampling_repeats_and_seeds_differ(ckpt):
    model = load_llama(ckpt[0])
    s = Sampling(temperature=1.0, top_k=50, seed=11)
    a = list(generate(model, PROMPT, N, s))
    assert a == list(generate(model, PROMPT, N, s))
    assert a != list(generate(model, PROMPT, N, Sampling(temperature=1.0, top_k=50, seed=12)))
