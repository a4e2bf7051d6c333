"""Shard plans and the shard folder written by `edge-runtime tp prepare`.

    .venv/bin/python -m pytest -q tests/test_tp_plan.py
"""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

from edge_runtime.tp.plan import ShardPlan, apportion, config_hash, make_plan, parse_weights
from edge_runtime.tp.prepare import block_order, prepare
from split.llama import LlamaConfig

transformers = pytest.importorskip("transformers")


def cfg(**kw):
    d = dict(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=3)
    d.update(kw)
    return LlamaConfig.from_hf(d)


@pytest.mark.parametrize("total, weights, expected", [
    (3, [1, 1], [2, 1]),            # ties go to the lower rank
    (3, [1, 2], [1, 2]),
    (4, [1, 1, 2], [1, 1, 2]),
    (8, [1, 1, 1], [3, 3, 2]),
    (100, [1, 1, 2], [25, 25, 50]),
    (100, [1, 2, 4], [14, 29, 57]),  # quotas 14.29, 28.57, 57.14
    (3, [100, 1, 1], [1, 1, 1]),     # minimum one each overrides proportionality
    (5, [10, 1, 1], [3, 1, 1]),
    (7, [1], [7]),
])
def test_apportion(total, weights, expected):
    got = apportion(total, weights)
    assert got == expected and sum(got) == total and min(got) >= 1


def test_apportion_is_largest_remainder_on_many_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 6, (1,), generator=g))
        total = int(torch.randint(n, 200, (1,), generator=g))
        w = (torch.rand(n, generator=g) * 5 + 0.1).tolist()
        a = apportion(total, w)
        assert sum(a) == total and min(a) >= 1
        quota = [total * x / sum(w) for x in w]
        if all(q >= 1 for q in quota):  # no minimum binding: every share within 1 of its quota
            assert all(abs(x - q) < 1 for x, q in zip(a, quota))


def test_plan_odd_heads_uneven_weights():
    c = cfg()  # 6 heads, 3 kv heads, 100 intermediate
    p = make_plan(c, 2, [1, 2])
    assert p.kv_heads == [(0, 1), (1, 3)]
    assert p.q_heads(0) == (0, 2) and p.q_heads(1) == (2, 6)
    assert p.q_rows(1) == (16, 48) and p.kv_rows(1) == (8, 24)
    assert p.mlp == [(0, 33), (33, 100)]  # finer than the head split
    p3 = make_plan(c, 3, [1, 1, 2])
    assert p3.kv_heads == [(0, 1), (1, 2), (2, 3)] and p3.mlp == [(0, 25), (25, 50), (50, 100)]
    assert make_plan(c, 1).kv_heads == [(0, 3)]
    q = ShardPlan.from_json(p3.to_json())
    assert q == p3
    q.check(c)


@pytest.mark.parametrize("world_size, weights, match", [
    (0, None, r"world_size must be an integer from 1 to num_key_value_heads=3"),
    (4, None, r"world_size must be an integer from 1 to num_key_value_heads=3"),
    ("2", None, "world_size must be"),
    (2, [1, 1, 1], r"weights must have world_size=2 entries, got 3"),
    (2, [1, 0], "weights must all be positive"),
    (2, [1, float("nan")], "weights must all be positive"),
])
def test_make_plan_errors(world_size, weights, match):
    with pytest.raises(ValueError, match=match):
        make_plan(cfg(), world_size, weights)


def test_parse_weights():
    assert parse_weights("1,1,2", 3) == [1, 1, 2] and parse_weights(None, 2) == [1, 1]
    with pytest.raises(ValueError, match="weights must be comma-separated numbers"):
        parse_weights("1,x", 2)


def test_check_rejects_other_model_and_broken_plans():
    c = cfg()
    p = make_plan(c, 3)
    with pytest.raises(ValueError, match=r"plan model.intermediate is 100 but config.json gives 128"):
        p.check(cfg(intermediate_size=128))
    with pytest.raises(ValueError, match=r"plan model.config_hash"):
        p.check(cfg(rope_theta=5e5))
    d = p.to_dict()
    d["kv_heads"] = [[0, 1], [2, 3], [3, 3]]
    with pytest.raises(ValueError, match=r"plan kv_heads\[1\] must be a non-empty range starting at 1"):
        ShardPlan.from_dict(d).check(c)
    d = p.to_dict()
    d["mlp"] = [[0, 30], [30, 60], [60, 90]]
    with pytest.raises(ValueError, match=r"plan mlp must cover \[0, 100\), it ends at 90"):
        ShardPlan.from_dict(d).check(c)
    d = p.to_dict()
    d["format_version"] = 99
    with pytest.raises(ValueError, match="plan format_version must be 1, got 99"):
        ShardPlan.from_dict(d)
    d = p.to_dict()
    del d["mlp"]
    with pytest.raises(ValueError, match="plan is missing the field 'mlp'"):
        ShardPlan.from_dict(d)
    with pytest.raises(ValueError, match="not valid JSON"):
        ShardPlan.from_json("{")
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\)"):
        p.check(c, rank=3)
    assert config_hash(c) == config_hash(cfg()) != config_hash(cfg(rms_norm_eps=1e-5))


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """Qwen2 (q/k/v biases), 6 heads / 3 kv heads, sharded into several files, with a tokenizer."""
    torch.manual_seed(0)
    c = transformers.Qwen2Config(hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=3, vocab_size=64,
                                 tie_word_embeddings=True)
    hf = transformers.Qwen2ForCausalLM(c).eval()
    path = tmp_path_factory.mktemp("qwen")
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    (path / "tokenizer.json").write_text("{}")
    return path, {k: v.detach().clone() for k, v in hf.state_dict().items()}


def _read_all(file):
    with safe_open(file, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_prepare_writes_exactly_the_layout(qwen_checkpoint, tmp_path):
    src, sd = qwen_checkpoint
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "shards"
    plan = prepare(src, 2, [1, 2], out, progress=False)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    blocks = [f"layer{i:03d}.{k}.safetensors" for i, k in block_order(2)]
    expected = ["plan.json"] + sorted(
        [f"rank0/{f}" for f in ["plan.json", "config.json", "tokenizer.json", "generation_config.json",
                                "embed.safetensors", "head.safetensors", *blocks]]
        + [f"rank1/{f}" for f in ["plan.json", "config.json", *blocks]])
    assert files == sorted(expected)
    assert ShardPlan.load(out / "rank1") == plan == ShardPlan.load(out)
    assert json.loads((out / "rank1" / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    hd = 8
    for r, (qa, qb) in enumerate([(0, 2), (2, 6)]):
        ka, kb = plan.kv_heads[r]
        ma, mb = plan.mlp[r]
        attn = _read_all(out / f"rank{r}" / "layer001.attn.safetensors")
        p = "model.layers.1."
        assert set(attn) == {"input_layernorm.weight"} | {
            f"self_attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")} | {"self_attn.o_proj.weight"}
        assert torch.equal(attn["self_attn.q_proj.weight"], sd[p + "self_attn.q_proj.weight"][qa * hd:qb * hd])
        assert torch.equal(attn["self_attn.q_proj.bias"], sd[p + "self_attn.q_proj.bias"][qa * hd:qb * hd])
        assert torch.equal(attn["self_attn.v_proj.weight"], sd[p + "self_attn.v_proj.weight"][ka * hd:kb * hd])
        assert torch.equal(attn["self_attn.o_proj.weight"], sd[p + "self_attn.o_proj.weight"][:, qa * hd:qb * hd])
        assert torch.equal(attn["input_layernorm.weight"], sd[p + "input_layernorm.weight"])
        mlp = _read_all(out / f"rank{r}" / "layer001.mlp.safetensors")
        assert set(mlp) == {"post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                            "mlp.down_proj.weight"}
        assert torch.equal(mlp["mlp.up_proj.weight"], sd[p + "mlp.up_proj.weight"][ma:mb])
        assert torch.equal(mlp["mlp.down_proj.weight"], sd[p + "mlp.down_proj.weight"][:, ma:mb])
    head = _read_all(out / "rank0" / "head.safetensors")
    assert set(head) == {"norm.weight", "lm_head.weight"}
    assert torch.equal(head["lm_head.weight"], sd["model.embed_tokens.weight"])  # tied
    assert set(_read_all(out / "rank0" / "embed.safetensors")) == {"embed_tokens.weight"}


def test_prepare_row_parallel_biases_only_on_rank0(tmp_path):
    torch.manual_seed(0)
    c = transformers.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=32, attention_bias=True, mlp_bias=True)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(c).save_pretrained(src, safe_serialization=True)
    prepare(src, 2, None, tmp_path / "out", progress=False)
    a0, a1 = (_read_all(tmp_path / "out" / f"rank{r}" / "layer000.attn.safetensors") for r in (0, 1))
    m0, m1 = (_read_all(tmp_path / "out" / f"rank{r}" / "layer000.mlp.safetensors") for r in (0, 1))
    assert "self_attn.o_proj.bias" in a0 and "self_attn.o_proj.bias" not in a1
    assert "mlp.down_proj.bias" in m0 and "mlp.down_proj.bias" not in m1
    assert "mlp.gate_proj.bias" in m1 and m1["mlp.gate_proj.bias"].shape == (20,)


def test_prepare_leaves_no_partial_folder_and_names_what_is_wrong(qwen_checkpoint, tmp_path):
    """A checkpoint whose index names a tensor its files lack, or whose tensor has the wrong shape,
    fails naming the tensor, and neither `out` nor a half-written folder is left behind; a
    finished folder is replaced by a new prepare; a folder of something else is refused."""
    src, _ = qwen_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.up_proj.weight"
    index["weight_map"][victim + "_missing"] = index["weight_map"].pop(victim)
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=victim):
        prepare(broken, 2, None, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no out, no .shards.partial-*

    wrong = tmp_path / "wrong"  # a tensor of another shape than config.json says
    shutil.copytree(src, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' in .* has shape \[100, 48\], "
                                         r"expected \[96, 48\]"):
        prepare(wrong, 2, None, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "wrong"]

    plan = prepare(src, 2, None, out, progress=False)
    (out / "rank1" / "stale.txt").write_text("from an earlier run")
    assert prepare(src, 3, None, out, progress=False).world_size == 3 != plan.world_size
    assert not (out / "rank1" / "stale.txt").exists() and (out / "rank2" / "plan.json").is_file()
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="not a shard folder"):
        prepare(src, 2, None, other, progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]
