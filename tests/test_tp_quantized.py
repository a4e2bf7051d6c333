"""int8 / int4 weights through `tp prepare`, the pager and tensor parallelism, against the same model
quantized in one process by split.llama.quantize (itself tested against plain matmuls in test_quantize.py).

    .venv/bin/python -m pytest -q tests/test_tp_quantized.py

The checkpoint is a random-initialised tiny Llama written by transformers (8 query heads / 4 KV heads
of head_dim 16, intermediate 128, q/k/v/o and MLP biases, randomised norms). The reference quantizes
every projection with quantize_model, and the LM head and the embeddings as int8 rows, which is what
`tp prepare --quantize` stores. At world size 1 (window 0 and 2) and across ranks greedy tokens and
prefill logits are bitwise the reference's: the same kernels see the same tensors, and o_proj /
down_proj round the partial sums of the same fixed units (KV groups, MLP chunks) to bf16 wherever
they are held and add them exactly (float64, through the allreduce too).
"""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from hf_random import randomize_norms_and_biases
transformers = pytest.importorskip("transformers")

from edge_runtime import cli as edge_cli  # noqa: E402
from edge_runtime.tp import launch  # noqa: E402
from edge_runtime.tp.budget import block_bytes, pick_windows, rank_memory  # noqa: E402
from edge_runtime.tp.collective import LocalCollective  # noqa: E402
from edge_runtime.tp.engine import Master  # noqa: E402
from edge_runtime.tp.kernel_layout import kernel_folder, layout_fingerprint  # noqa: E402
from edge_runtime.tp.plan import ShardPlan  # noqa: E402
from edge_runtime.tp.prepare import block_order, make_format_plan, prepare  # noqa: E402
from split.llama import LlamaConfig, generate, load_llama  # noqa: E402
from split.llama.quantize import Int8, handler, quantize_model, quantized_state_dict, row_units  # noqa: E402
from test_tp_engine import PROMPT, Session, spawn_worker  # noqa: E402

N_NEW = 16
SCHEMES = ("int8", "int4")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=16, attention_bias=True,
                                   mlp_bias=True, max_position_embeddings=128, initializer_range=0.2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    randomize_norms_and_biases(hf)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def quantized_reference(path, scheme: str):
    """One process: quantize_model's projections, int8 LM head, int8-rounded embedding rows."""
    model = quantize_model(load_llama(path), scheme, 32)
    table = Int8()
    model.lm_head = table.module(table.quantize(model.lm_head.weight))
    model.embed_tokens.weight.copy_(table.dequantize(table.quantize(model.embed_tokens.weight)))
    return model


@pytest.fixture(scope="module")
def references(ckpt):
    """scheme -> (greedy ids, logits over prompt + ids (T + N, vocab))."""
    out = {}
    for scheme in SCHEMES:
        model = quantized_reference(ckpt, scheme)
        with torch.inference_mode():
            ids = list(generate(model, PROMPT, N_NEW))
            out[scheme] = (ids, model(torch.tensor([PROMPT + ids]))[0])
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_blocks_hold_the_one_device_quantized_tensors(ckpt, tmp_path, scheme):
    """Each rank's blocks are slices of quantized_state_dict: rows for q/k/v/gate/up, whole groups
    of columns for o/down (int8 keeps the scales of the whole row), and the MLP split in groups."""
    plan = prepare(ckpt, 2, [1, 2], tmp_path, progress=False, quantize=handler(scheme, 32))
    assert plan.extra["quantize"] == handler(scheme, 32).to_dict()
    chunks = row_units(LlamaConfig.from_dir(ckpt), handler(scheme, 32))["mlp.down_proj"]  # 4 fixed chunks
    assert plan.mlp == [chunks[0], (chunks[1][0], chunks[3][1])]  # shares 1 : 2 in whole chunks
    whole = quantized_state_dict(load_llama(ckpt), scheme, 32)
    for rank in range(2):
        attn = load_file(tmp_path / f"rank{rank}" / "layer001.attn.safetensors")
        mlp = load_file(tmp_path / f"rank{rank}" / "layer001.mlp.safetensors")
        (qa, qb), (ma, mb) = plan.q_rows(rank), plan.mlp[rank]
        assert torch.equal(attn["self_attn.q_proj.weight"], whole["layers.1.self_attn.q_proj.weight"][qa:qb])
        assert torch.equal(mlp["mlp.up_proj.scales"], whole["layers.1.mlp.up_proj.scales"][ma:mb])
        down_w, down_s = whole["layers.1.mlp.down_proj.weight"], whole["layers.1.mlp.down_proj.scales"]
        if scheme == "int8":
            assert torch.equal(mlp["mlp.down_proj.weight"], down_w[:, ma:mb])
            assert torch.equal(mlp["mlp.down_proj.scales"], down_s)  # the whole row's scale
        else:
            assert torch.equal(mlp["mlp.down_proj.weight"], down_w[:, ma // 2:mb // 2])
            assert torch.equal(mlp["mlp.down_proj.zeros"], whole["layers.1.mlp.down_proj.zeros"][:, ma // 32:mb // 32])
        assert ("mlp.down_proj.bias" in mlp) == (rank == 0)  # added once by the allreduce
    head = load_file(tmp_path / "rank0" / "head.safetensors")
    assert head["lm_head.weight"].dtype == torch.int8 and head["lm_head.scales"].shape == (256,)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("window", [0, 2])
def test_one_rank_equals_the_one_device_quantized_model_bitwise(ckpt, references, tmp_path, scheme, window):
    prepare(ckpt, 1, None, tmp_path, progress=False, quantize=handler(scheme, 32))
    ref_ids, ref_logits = references[scheme]
    with Master(tmp_path / "rank0", LocalCollective(), window) as m:
        assert list(m.generate(PROMPT, N_NEW)) == ref_ids
        assert torch.equal(m.prefill_logits(PROMPT), ref_logits[:len(PROMPT)])
        if window:
            assert m.rank_stats()[0]["pager_max_resident"] <= window
    kernel = tmp_path / "rank0" / f"kernel-{layout_fingerprint()}"
    assert kernel.is_dir() == (scheme == "int4")  # int4 blocks repacked once for this machine's kernel


@pytest.fixture(scope="module")
def sessions(ckpt, tmp_path_factory):
    """scheme -> a 3-rank group (weights 1,1,2, window 2, real worker processes, star backend)."""
    made = {}
    for scheme in SCHEMES:
        shards = tmp_path_factory.mktemp(f"shards_{scheme}")
        prepare(ckpt, 3, [1, 1, 2], shards, progress=False, quantize=handler(scheme, 32))
        port = launch.free_port()
        procs = {r: spawn_worker(shards / f"rank{r}", r, port, 2) for r in (1, 2)}
        made[scheme] = Session(shards, 3, 2, "fp32", "star", port, procs)
    yield made
    for s in made.values():
        s.close()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_three_ranks_with_window_2_match_the_one_device_quantized_model_bitwise(sessions, references, scheme):
    ref_ids, ref_logits = references[scheme]
    m = sessions[scheme].master
    assert list(m.generate(PROMPT, N_NEW)) == ref_ids
    assert torch.equal(m.prefill_logits(PROMPT), ref_logits[:len(PROMPT)])


def test_a_rank_whose_columns_are_not_whole_units_is_refused(ckpt):
    """Shards cut by an older plan (the MLP split mid-chunk) cannot sum the fixed units: refused, naming them."""
    from types import SimpleNamespace

    from edge_runtime.tp.parallelize import apply_tp, exact_partials
    from edge_runtime.tp.plan import make_plan
    from split.llama import Llama
    from split.llama.quantize import weight_shells
    config, h = LlamaConfig.from_dir(ckpt), handler("int8")  # 4 chunks of 32 MLP columns, in units of 16
    plan = make_plan(config, 2, [3, 5])  # MLP columns [0, 48), [48, 128): 48 is inside the chunk [32, 64)
    with torch.device("meta"):
        model = Llama(config, with_embed=False, with_head=False)
    weight_shells(apply_tp(model, plan, SimpleNamespace(rank=0, world_size=2)), h)  # rank 0's shapes
    with pytest.raises(ValueError, match=r"rank 0's mlp\.down_proj columns \[0, 48\) are not whole units"):
        exact_partials(model, plan, 0, h)


def test_bf16_float_weights_stay_close_to_fp32(ckpt, tmp_path):
    """--dtype bf16 holds and multiplies the float weights in bf16; norms, residual and allreduce stay
    float32. On this model the logits move by less than 2% of their range."""
    prepare(ckpt, 1, None, tmp_path, progress=False)
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        with Master(tmp_path / "rank0", LocalCollective(), 2, dtype) as m:
            got[dtype] = m.prefill_logits(PROMPT)
            assert m.model.lm_head.weight.dtype == dtype if hasattr(m.model.lm_head, "weight") else True
    scale = got[torch.float32].abs().max()
    assert 0 < (got[torch.bfloat16] - got[torch.float32]).abs().max() < 0.02 * scale


def test_kernel_layout_is_made_once_and_reused(ckpt, tmp_path):
    prepare(ckpt, 1, None, tmp_path, progress=False, quantize=handler("int4", 32))
    order = block_order(2)
    folder = kernel_folder(tmp_path / "rank0", order)
    stamp = (folder / "layer000.attn.safetensors").stat().st_mtime_ns
    assert kernel_folder(tmp_path / "rank0", order) == folder
    assert (folder / "layer000.attn.safetensors").stat().st_mtime_ns == stamp
    assert "self_attn.q_proj.scales_and_zeros" in load_file(folder / "layer000.attn.safetensors")
    assert not [p for p in (tmp_path / "rank0").iterdir() if p.name.startswith(".")]  # no partial folder left


def test_group_size_that_does_not_fit_a_rank_slice_is_refused_naming_the_tensor(ckpt, tmp_path):
    out = tmp_path / "shards"
    wide = dataclasses.replace(LlamaConfig.from_dir(ckpt), intermediate_size=1024)  # the MLP fits groups of 64
    with pytest.raises(ValueError, match=r"rank 0: layers\.\*\.self_attn\.o_proj\.weight: int4 group_size 64"):
        make_format_plan(wide, 4, None, handler("int4", 64))  # 2 heads of 16: 32 o_proj columns a rank
    with pytest.raises(ValueError, match=r"1 fixed chunk\(s\) over 2 ranks"):
        prepare(ckpt, 2, None, out, progress=False, quantize=handler("int4", 128))
    with pytest.raises(ValueError, match="group_size must be one of"):
        handler("int4", 48)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, not even a partial folder


def test_budget_counts_quantized_bytes(ckpt):
    config = LlamaConfig.from_dir(ckpt)
    plans = {s: make_format_plan(config, 2, None, handler(s, 32) if s else None) for s in (None, "int8", "int4")}
    fp32, int8, int4 = (sum(block_bytes(config, plans[s], 0)) for s in (None, "int8", "int4"))
    assert int8 < 0.3 * fp32 and int4 < 0.2 * fp32 and int4 < int8
    budget = max(rank_memory(config, plans["int4"], r, 0) for r in range(2))  # int4, all resident
    assert pick_windows(config, plans["int4"], budget) == [0, 0]
    assert all(rank_memory(config, plans[None], r, 0) > budget for r in range(2))  # fp32 resident does not fit


def test_cli_generate_quantized_across_two_ranks(ckpt, references, tmp_path, capsys):
    import json
    code = edge_cli.main((["tp", "generate", "--model", str(ckpt), "--world-size", "2", "--quantize", "int4",
                          "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(N_NEW),
                          "--ignore-eos", "--cache-dir", str(tmp_path), "--json"]))
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["quantize"] == {"scheme": "int4", "group_size": 32}
    assert result["token_ids"] == references["int4"][0]
    shards = next(tmp_path.iterdir())
    assert ShardPlan.load(shards / "plan.json").extra["quantize"]["scheme"] == "int4"



def test_phi3_fused_tensors_are_quantized_per_projection(tmp_path):
    """Phi-3's fused qkv_proj / gate_up_proj: tp prepare quantizes the q, k, v (gate, up) rows it cuts
    out of them, so the blocks equal the one-device model quantized after loading (bitwise)."""
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                                  partial_rotary_factor=0.5, tie_word_embeddings=True, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    randomize_norms_and_biases(hf)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = quantized_reference(tmp_path / "hf", "int4")
    with torch.inference_mode():
        ref_ids = list(generate(model, PROMPT, N_NEW))
        ref_logits = model(torch.tensor([PROMPT]))[0]
    prepare(tmp_path / "hf", 2, None, tmp_path / "shards", progress=False, quantize=handler("int4", 32))
    prepare(tmp_path / "hf", 1, None, tmp_path / "one", progress=False, quantize=handler("int4", 32))
    with Master(tmp_path / "one" / "rank0", LocalCollective(), 2) as m:
        assert list(m.generate(PROMPT, N_NEW)) == ref_ids
        assert torch.equal(m.prefill_logits(PROMPT), ref_logits)
    whole = quantized_state_dict(load_llama(tmp_path / "hf"), "int4", 32)
    (ka, kb) = ShardPlan.load(tmp_path / "shards" / "plan.json").kv_rows(1)
    attn = load_file(tmp_path / "shards" / "rank1" / "layer000.attn.safetensors")
    assert torch.equal(attn["self_attn.k_proj.weight"], whole["layers.0.self_attn.k_proj.weight"][ka:kb])
