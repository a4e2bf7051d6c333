"""Tensor-parallel generation of Qwen2, Mistral, Qwen3 and Phi-3 against `transformers` itself, with real worker
processes on loopback (the harness of tests/test_tp_engine.py, which does the same for Llama;
tests/test_tp_plan.py checks a prepared Qwen2, tests/test_llama_model.py every family in one process).

    .venv/bin/python -m pytest -q tests/test_tp_families.py

Checkpoints are random-initialised tiny models written by transformers' save_pretrained, 6 query
heads / 3 KV heads, intermediate 100, randomised norms and biases:
- "qwen3": q_norm / k_norm over an explicit head_dim of 12 (hidden 48 / 6 heads would be 8),
  q/k/v/o biases (o_proj's on rank 0 only), a 4-token sliding window on layers >= 1;
- "qwen2": q/k/v biases, a 4-token sliding window on layers >= 1;
- "mistral": an explicit head_dim of 12, a 5-token sliding window on every layer;
- "phi3": fused qkv_proj and gate_up_proj (tp prepare cuts each rank's q, k, v heads and MLP
  columns out of them), RoPE on half of each head, a 5-token window on every layer, tied embeddings.
Greedy generation of 16 tokens after a 7-token prompt equals transformers' generate token for token
at world size 1 (in process, window 2), 2 (weights 1,2: one and two KV heads, all resident) and 3
(weights 1,1,2, window 2); prefill logits agree within 1e-4 (fp32).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_random import randomize_norms_and_biases
transformers = pytest.importorskip("transformers")

from edge_runtime.tp import launch  # noqa: E402
from edge_runtime.tp.collective import LocalCollective  # noqa: E402
from edge_runtime.tp.engine import Master  # noqa: E402
from edge_runtime.tp.plan import ShardPlan  # noqa: E402
from edge_runtime.tp.prepare import prepare  # noqa: E402
from split.llama import LlamaConfig  # noqa: E402
from test_tp_engine import PROMPT, Session, reference, spawn_worker  # noqa: E402

N_NEW = 16
ATOL = 1e-4
SHAPE = dict(vocab_size=256, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=3, max_position_embeddings=128, initializer_range=0.2)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=12, attention_bias=True, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=12, sliding_window=5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(partial_rotary_factor=0.5, sliding_window=5, tie_word_embeddings=True, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)),
}
# session -> (world size, weights, window); every family runs each
SESSIONS = {"w2": (2, [1, 2], 0), "w3": (3, [1, 1, 2], 2)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """family -> (folder, transformers model, reference greedy ids, reference logits over prompt + ids)."""
    out = {}
    for name, (cfg_cls, model_cls, kw) in FAMILIES.items():
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**SHAPE, **kw)).eval()
        randomize_norms_and_biases(hf)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path, safe_serialization=True)
        out[name] = (path, hf, *reference(hf, N_NEW))
    return out


@pytest.fixture(scope="module")
def sessions(ckpts, tmp_path_factory):
    """(family, session) -> Session; all worker processes start at once, masters join lazily."""
    made = {}
    for fam in FAMILIES:
        for name, (world, weights, window) in SESSIONS.items():
            shards = tmp_path_factory.mktemp(f"shards_{fam}_{name}")
            prepare(ckpts[fam][0], world, weights, shards, progress=False)
            port = launch.free_port()
            procs = {r: spawn_worker(shards / f"rank{r}", r, port, window) for r in range(1, world)}
            made[fam, name] = Session(shards, world, window, "fp32", "star", port, procs)
    yield made
    for s in made.values():
        s.close()


def check_generation(master: Master, ref_ids, ref_logits):
    assert list(master.generate(PROMPT, N_NEW)) == ref_ids
    diff = (master.prefill_logits(PROMPT) - ref_logits[:len(PROMPT)]).abs().max().item()
    assert diff < ATOL, f"prefill logits differ from transformers by {diff:.2e}"


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_world_size_1_paged_matches_transformers(ckpts, tmp_path, fam):
    path, _, ref_ids, ref_logits = ckpts[fam]
    prepare(path, 1, None, tmp_path, progress=False)
    with Master(tmp_path / "rank0", LocalCollective(), 2) as m:
        check_generation(m, ref_ids, ref_logits)
        assert m.rank_stats()[0]["pager_max_resident"] == 2


@pytest.mark.parametrize("fam", list(FAMILIES))
@pytest.mark.parametrize("name", list(SESSIONS))
def test_generation_matches_transformers(ckpts, sessions, fam, name):
    s = sessions[fam, name]
    _, _, ref_ids, ref_logits = ckpts[fam]
    check_generation(s.master, ref_ids, ref_logits)
    stats = s.master.rank_stats()
    assert [r["rank"] for r in stats] == list(range(s.world)) and all(r["bytes_sent"] > 0 for r in stats)
    if s.window:
        assert all(r["pager_max_resident"] <= s.window for r in stats)


def test_shards_hold_each_ranks_rows_of_the_fused_tensors(ckpts, sessions):
    """Phi-3 at world 2 (1 and 2 KV heads, 33 and 67 MLP columns): each rank's q, k, v and gate, up
    are its heads' and columns' rows of the fused checkpoint tensors, under the plain model's names;
    Qwen3's q_norm / k_norm are whole on every rank."""
    path = ckpts["phi3"][0]
    sd = load_file(path / "model.safetensors")
    qkv, gate_up = sd["model.layers.1.self_attn.qkv_proj.weight"], sd["model.layers.1.mlp.gate_up_proj.weight"]
    plan = ShardPlan.load(sessions["phi3", "w2"].shards / "plan.json")
    hd, nq, nkv, inter = 8, 6, 3, 100
    assert plan.kv_heads == [(0, 1), (1, 3)] and plan.mlp == [(0, 33), (33, 100)]
    for rank in range(2):
        d = sessions["phi3", "w2"].shards / f"rank{rank}"
        plan.check(LlamaConfig.from_dir(d), rank)
        attn, mlp = load_file(d / "layer001.attn.safetensors"), load_file(d / "layer001.mlp.safetensors")
        assert set(attn) == {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                             "self_attn.v_proj.weight", "self_attn.o_proj.weight"}
        (qa, qb), (ka, kb), (ma, mb) = plan.q_rows(rank), plan.kv_rows(rank), plan.mlp[rank]
        assert torch.equal(attn["self_attn.q_proj.weight"], qkv[qa:qb])
        assert torch.equal(attn["self_attn.k_proj.weight"], qkv[nq * hd + ka:nq * hd + kb])
        assert torch.equal(attn["self_attn.v_proj.weight"], qkv[(nq + nkv) * hd + ka:(nq + nkv) * hd + kb])
        assert torch.equal(mlp["mlp.gate_proj.weight"], gate_up[ma:mb])
        assert torch.equal(mlp["mlp.up_proj.weight"], gate_up[inter + ma:inter + mb])
    q3 = load_file(ckpts["qwen3"][0] / "model.safetensors")
    for rank in range(3):
        with safe_open(sessions["qwen3", "w3"].shards / f"rank{rank}" / "layer000.attn.safetensors", "pt") as f:
            for norm in ("q_norm", "k_norm"):
                assert torch.equal(f.get_tensor(f"self_attn.{norm}.weight"),
                                   q3[f"model.layers.0.self_attn.{norm}.weight"])
            assert ("self_attn.o_proj.bias" in f.keys()) == (rank == 0)
