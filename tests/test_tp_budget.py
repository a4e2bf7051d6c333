"""Per-rank memory budgets (edge_runtime/tp/budget.py): the estimate against the blocks `tp prepare`
really writes, the window picked for a budget, a budget refused with its figures, and `tp generate
--max-rank-memory` running each rank with its own window and reporting its peak against the budget.

    .venv/bin/python -m pytest -q tests/test_tp_budget.py
"""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

from hf_random import randomize_norms_and_biases
transformers = pytest.importorskip("transformers")

from edge_runtime import cli as edge_cli  # noqa: E402
from edge_runtime.tp.blockfile import block_path  # noqa: E402
from edge_runtime.tp.budget import block_bytes, parse_bytes, pick_windows, plan_windows, rank_memory  # noqa: E402
from edge_runtime.tp.plan import ShardPlan, make_plan  # noqa: E402
from edge_runtime.tp.prepare import block_order, prepare  # noqa: E402
from split.llama import LlamaConfig  # noqa: E402

PROMPT = [5, 17, 3, 99, 42, 7, 64, 8]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Qwen3-shaped (q/k norms, biases: every kind of tensor the estimate counts), blocks of ~1-3 MB."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, attention_bias=True,
                                   max_position_embeddings=128)
    hf = randomize_norms_and_biases(transformers.Qwen3ForCausalLM(cfg).eval())
    path = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(path, safe_serialization=True)
    return path


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("800MB") == 800 * 10**6 and parse_bytes("4096") == 4096
    for bad in ("lots", "0MiB", "-1G", "12 parsecs"):
        with pytest.raises(ValueError, match="--max-rank-memory: expected a size"):
            parse_bytes(bad)


def test_block_estimate_is_what_prepare_writes(ckpt, tmp_path):
    plan = prepare(ckpt, 2, [1, 3], tmp_path / "shards", progress=False)
    config = LlamaConfig.from_dir(ckpt)
    for rank in range(2):
        written = []
        for block in block_order(config.num_hidden_layers):
            with safe_open(block_path(tmp_path / "shards" / f"rank{rank}", block), framework="pt") as f:
                written.append(sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys()))  # float32 bytes
        assert block_bytes(config, plan, rank) == written


def test_each_rank_gets_the_largest_window_that_fits_and_a_budget_too_small_is_refused(ckpt):
    config = LlamaConfig.from_dir(ckpt)
    plan = make_plan(config, 2, [1, 3])
    n = 2 * config.num_hidden_layers
    smallest = max(min(rank_memory(config, plan, r, w) for w in (0, 1)) for r in range(2))  # rank 0 of a tiny model: all resident is less than a streamed head
    everything = max(rank_memory(config, plan, r, 0) for r in range(2))
    assert pick_windows(config, plan, everything) == [0, 0]
    for budget in range(smallest, everything + 1, max(1, (everything - smallest) // 50)):
        for r, w in enumerate(pick_windows(config, plan, budget)):
            assert rank_memory(config, plan, r, w) <= budget
            bigger = 0 if w in (0, n - 1) else w + 1  # the next window up (all resident after n - 1)
            assert w == 0 or rank_memory(config, plan, r, bigger) > budget
    with pytest.raises(ValueError, match=r"rank \d needs \d+ MiB even with a window of one block .* over the "
                                         r"budget of \d+ MiB"):
        pick_windows(config, plan, smallest - 1)


def test_generate_runs_each_rank_with_its_windows_and_reports_the_budget(ckpt, tmp_path, capsys):
    config = LlamaConfig.from_dir(ckpt)
    plan = make_plan(config, 2, [1, 3])
    # rank 1 (3/4 of the weights) affords two blocks, not all; rank 0 fits somehow
    budget = max(rank_memory(config, plan, 1, 2), min(rank_memory(config, plan, 0, w) for w in (0, 1)))
    want = pick_windows(config, plan, budget)
    assert 2 <= want[1] < 2 * config.num_hidden_layers
    capsys.readouterr()
    code = edge_cli.main(["tp", "prepare", "--model", str(ckpt), "--world-size", "2", "--weights", "1,3",
                          "--max-rank-memory", str(budget), "--out", str(tmp_path / "shards")])
    assert code == 0 and json.loads(capsys.readouterr().out)["windows"] == want
    assert plan_windows(ShardPlan.load(tmp_path / "shards" / "rank1" / "plan.json")) == want
    code = edge_cli.main(["tp", "generate", "--shards", str(tmp_path / "shards"), "--prompt-ids",
                          ",".join(map(str, PROMPT)), "--max-new-tokens", "6", "--ignore-eos", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["windows"] == want and out["max_rank_memory_bytes"] == budget
    assert [w == 0 or p["max_resident"] <= w for p, w in zip(out["pager"], want)] == [True, True]
    assert out["within_budget"] == [True, True], (out["peak_rss_bytes"], out["baseline_rss_bytes"], budget)
    code = edge_cli.main(["tp", "prepare", "--model", str(ckpt), "--world-size", "2", "--max-rank-memory", "1MiB",
                          "--out", str(tmp_path / "tiny")])
    err = capsys.readouterr().err
    assert code == 2 and "even with a window of one block" in err and not (tmp_path / "tiny").exists()
