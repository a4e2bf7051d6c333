"""Weight-only int8 / int8g / int4 (split/llama/quantize.py): round trips, the kernels against F.linear with
the dequantized weight, per-rank slices, handler selection (int8 stays per-channel whatever group size
comes with it), quantize_model end to end through generate, safetensors round trip, clear errors.
Correctness only: quality is judged on a trained model (scripts/eval_quantized_lm.py).

    .venv/bin/python -m pytest -q tests/test_quantize.py
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_random import randomize_norms_and_biases
transformers = pytest.importorskip("transformers")

from split.llama import Llama, LlamaConfig, generate, load_llama  # noqa: E402
from split.llama.quantize import (  # noqa: E402
    CastLinear, Int4, Int8, Int8Group, WeightOnlyInt4Linear, WeightOnlyInt8GroupLinear, WeightOnlyInt8Linear, handler,
    handler_from_dict, handler_of, kernel_state, linears, load_quantized, quantize_model, quantized_state_dict)

HANDLERS = [Int8(), Int8Group(32), Int8Group(64), Int4(32), Int4(64), Int4(128)]
MODULES = {Int8: WeightOnlyInt8Linear, Int8Group: WeightOnlyInt8GroupLinear, Int4: WeightOnlyInt4Linear}
# Measured: with bf16 activations the kernels' output differs from fp32 F.linear with the dequantized
# weight by at most 0.39% of the output's largest magnitude (bf16 rounding of x and y, 2^-8);
# we allow 1%. With fp32 activations the difference is float round-off (measured 1.6e-6).
TOL_BF16, TOL_FP32 = 1e-2, 1e-5
PROMPT = [5, 17, 3, 99, 42, 7, 7, 64]


def weight(n_out=64, n_in=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * torch.logspace(-3, 0, n_out)[:, None]  # rows of many scales
    w[3] = 0.0  # an all-zero row (zero range)
    w[5, :40] = 0.7  # a constant group
    return w


def close(y, ref, tol):
    return (y - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_int8_round_trip_within_half_a_step():
    w = weight()
    t = Int8().quantize(w)
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (64, 256)
    assert t["scales"].dtype == torch.bfloat16 and t["scales"].shape == (64,)
    assert t["weight"].abs().max() <= 127
    err = (Int8().dequantize(t) - w).abs()  # (out, in)
    assert (err <= 0.5 * t["scales"].float()[:, None] * (1 + 1e-6)).all()
    assert Int8().dequantize(t)[3].eq(0).all()
    assert torch.equal(Int8().quantize(w.bfloat16())["weight"], Int8().quantize(w.bfloat16().float())["weight"])


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group):
    w = weight()
    h = Int4(group)
    t = h.quantize(w)
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (64, 128)
    for k in ("scales", "zeros"):
        assert t[k].dtype == torch.bfloat16 and t[k].shape == (64, 256 // group)
    deq = h.dequantize(t)
    s, z = (t[k].float().repeat_interleave(group, dim=1) for k in ("scales", "zeros"))  # (out, in)
    # half a step, plus what rounding the zero point to bf16 may clip at the ends of a group's range
    assert ((deq - w).abs() <= 0.5 * s + z.abs() * 2**-8 + 1e-7).all()
    assert deq[3].abs().max() < 1e-6 and torch.allclose(deq[5, :32], torch.full((32,), 0.7), rtol=1e-2)


def test_int4_layout_is_the_documented_one():
    """Column 2j in the low nibble, 2j+1 in the high one; w = (q - 8) * scale + zero per group."""
    t = Int4(32).quantize(weight())
    p = t["weight"].to(torch.int64)
    q = torch.empty(64, 256, dtype=torch.int64)
    q[:, 0::2], q[:, 1::2] = p % 16, p // 16
    g = torch.arange(256) // 32
    manual = (q - 8) * t["scales"].float()[:, g] + t["zeros"].float()[:, g]
    assert torch.equal(manual, Int4(32).dequantize(t))


@pytest.mark.parametrize("group", [32, 64])
def test_int8g_round_trip_within_half_a_step(group):
    w = weight()
    h = Int8Group(group)
    t = h.quantize(w)
    assert t.keys() == {"weight", "scales"} and t["weight"].dtype == torch.int8 and t["weight"].shape == (64, 256)
    assert t["scales"].dtype == torch.bfloat16 and t["scales"].shape == (64, 256 // group)
    assert t["weight"].abs().max() <= 127
    s = t["scales"].float().repeat_interleave(group, dim=1)  # (out, in)
    deq = h.dequantize(t)
    assert ((deq - w).abs() <= 0.5 * s * (1 + 1e-6)).all()
    assert deq[3].eq(0).all() and torch.allclose(deq[5, :32], torch.full((32,), 0.7), rtol=1e-2)
    # finer than per-channel int8 on rows whose groups differ in range: the error follows each group's own scale
    w[:, :group] *= 100
    assert (h.dequantize(h.quantize(w)) - w)[:, group:].abs().max() < (Int8().dequantize(Int8().quantize(w))
                                                                      - w)[:, group:].abs().max() / 10


def test_int8g_layout_is_the_documented_one():
    """w[:, j] = weight[:, j] * scales[:, j // group], no zeros."""
    t = Int8Group(32).quantize(weight())
    g = torch.arange(256) // 32
    assert torch.equal(t["weight"].float() * t["scales"].float()[:, g], Int8Group(32).dequantize(t))


@pytest.mark.parametrize("group", [32, 128])
def test_int8g_kernel_reproduces_every_weight_exactly(group):
    """The two-nibble decomposition on the int4 kernel is exact: with fp32 activations, one-hot rows of x
    give back every dequantized weight bit for bit, over all 256 codes -128..127 (-128: a GGUF file may hold
    it) and scales of very different sizes; with bf16 activations, the bf16 rounding of it."""
    h = Int8Group(group)
    codes = (torch.arange(64 * 256) % 256 - 128).to(torch.int8).reshape(64, 256)  # every code in every row
    scales = (torch.logspace(-6, 2, 64 * 256 // group).reshape(64, -1)).bfloat16()  # (out, in/group)
    t = {"weight": codes, "scales": scales}
    eye = torch.eye(256)  # (in, in): y = W^T
    assert torch.equal(h.module(t, None, torch.float32)(eye), h.dequantize(t).t())
    assert torch.equal(h.module(t, None, torch.bfloat16)(eye), h.dequantize(t).t().bfloat16().float())


@pytest.mark.parametrize("h", HANDLERS, ids=lambda h: h.name)
def test_kernel_state_binds_into_the_shell(h):
    """kernel_state turns stored tensors into exactly the buffers shell() declares (a pager binds one into
    the other), passes its own output through unchanged, and kernel_bytes / stored_bytes count them."""
    t = h.quantize(weight(128, 256))
    stored = {f"lin.{k}": v for k, v in t.items()}
    kernel = kernel_state(stored)
    shell = h.shell(128, 256, bias=False)
    declared = {f"lin.{k}": v for k, v in shell.named_buffers() if v is not None}
    assert kernel.keys() == declared.keys() == {f"lin.{k}" for k in h.kernel_keys}
    for k, v in kernel.items():
        assert v.shape == declared[k].shape and v.dtype == declared[k].dtype, k
    assert kernel_state(kernel).keys() == kernel.keys()
    assert h.stored_bytes(128, 256) == sum(v.numel() * v.element_size() for v in t.values())
    assert h.kernel_bytes(128, 256) == sum(v.numel() * v.element_size() for v in kernel.values())


def test_handler_selection():
    """"int8" is per-channel with or without a group size (every caller passes --group-size's default along);
    group-wise int8 is its own scheme, "int8g"; plans and stored tensors read back to the same handler."""
    for h in (handler("int8"), handler("int8", None), handler("int8", 32), handler("int8", 64)):
        assert type(h) is Int8 and h.name == "int8" and h.to_dict() == {"scheme": "int8"}
    assert type(quantize_model(Llama(LlamaConfig.from_hf(SMALL)), "int8", 32).layers["0"].mlp.up_proj) \
        is WeightOnlyInt8Linear
    assert handler_from_dict({"scheme": "int8"}).name == "int8"
    assert handler_from_dict({"scheme": "int8", "group_size": 32}).name == "int8"  # as before: the group ignored
    for scheme, group, name in (("int8g", None, "int8-g32"), ("int8g", 32, "int8-g32"), ("int8g", 128, "int8-g128"),
                                ("int4", None, "int4-g32"), ("int4", 64, "int4-g64")):
        h = handler(scheme, group)
        assert h.name == name and h.to_dict() == {"scheme": scheme, "group_size": int(name.rsplit("g", 1)[1])}
        assert h.unit == h.group_size and handler_from_dict(h.to_dict()).name == name
        assert handler_of("x", h.quantize(weight(64, 256))).name == name
    assert handler_of("x", Int8().quantize(weight(64, 256))).name == "int8"
    assert handler_from_dict(None) is None
    with pytest.raises(ValueError, match=r"int8g group_size must be one of \(32, 64, 128, 256\)"):
        handler("int8g", 48)
    with pytest.raises(ValueError, match="quantize must be"):
        handler_from_dict({"scheme": "q8_0"})
    t = Int8Group(32).quantize(weight(64, 256))
    with pytest.raises(ValueError, match=r"x: int8 expects weight \(out, in\) with scales \(out,\), or \(out, "
                                         r"in/group\) for a group in \(32, 64, 128, 256\), got \(64, 256\) and \(64, 16\)"):
        handler_of("x", {"weight": t["weight"], "scales": t["scales"].repeat(1, 2)})  # group 16


@pytest.mark.parametrize("h", HANDLERS, ids=lambda h: h.name)
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_module_equals_linear_with_dequantized_weight(h, compute):
    w, b = weight(128, 256), torch.randn(128) * 0.1
    t = h.quantize(w)
    x = torch.randn(2, 5, 256)  # (B, T, in)
    ref = F.linear(x, h.dequantize(t), b)
    for bias in (b, None):
        mod = h.module(t, bias, compute)
        assert type(mod) is MODULES[type(h)]
        y = mod(x)
        assert y.shape == (2, 5, 128) and y.dtype == torch.float32
        r = ref if bias is not None else ref - b
        assert close(y, r, TOL_BF16 if compute == torch.bfloat16 else TOL_FP32)
    assert close(mod(x[:, -1:]), ref[:, -1:] - b, TOL_BF16 if compute == torch.bfloat16 else TOL_FP32)  # 1 token
    assert mod(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("h", HANDLERS, ids=lambda h: h.name)
def test_unaligned_tensors_are_safe(h):
    """The bf16 int8 kernel crashed on a weight or activation at an unaligned address (a tensor read from
    a safetensors file, a slice) once there were 4+ rows; the modules copy such tensors."""
    t = h.quantize(weight(128, 256))
    shifted = {}
    for k, v in t.items():
        buf = torch.empty(v.numel() + 3, dtype=v.dtype)
        shifted[k] = buf[3:].view(v.shape)
        shifted[k].copy_(v)
    xb = torch.randn(8 * 256 + 3).bfloat16()
    x = xb[3:].view(8, 256)
    y = h.module(shifted, None, torch.bfloat16)(x)
    assert close(y.float(), F.linear(x.float(), h.dequantize(t)), TOL_BF16)


@pytest.mark.parametrize("h", HANDLERS, ids=lambda h: h.name)
def test_stored_tensors_slice_per_rank(h):
    """Column-parallel: rows [a, b) of every tensor; row-parallel: input columns in whole groups."""
    w, x = weight(128, 256), torch.randn(3, 256)
    t = h.quantize(w)
    full = h.module(t, None, torch.float32)(x)  # (3, 128)
    rows = [{k: v[a:a + 64] for k, v in t.items()} for a in (0, 64)]
    assert torch.equal(torch.cat([h.module(r, None, torch.float32)(x) for r in rows], dim=-1), full)
    halves = []
    for a, b in ((0, 128), (128, 256)):
        if h.name == "int8":
            shard = {"weight": t["weight"][:, a:b], "scales": t["scales"]}
        elif isinstance(h, Int8Group):
            g = h.group_size
            shard = {"weight": t["weight"][:, a:b], "scales": t["scales"][:, a // g:b // g]}
        else:
            g = h.group_size
            shard = {"weight": t["weight"][:, a // 2:b // 2], "scales": t["scales"][:, a // g:b // g],
                     "zeros": t["zeros"][:, a // g:b // g]}
        for k in shard:  # what prepare stores per rank: narrow() gives the documented slices
            assert torch.equal(h.narrow(t, 1, a, b)[k], shard[k]) and torch.equal(h.narrow(t, 0, a // 2, b // 2)[k],
                                                                                 t[k][a // 2:b // 2])
        halves.append(h.module(shard, None, torch.float32)(x[:, a:b]))
    assert close(halves[0] + halves[1], full, TOL_FP32)
    if h.unit > 16:  # a column slice must be whole groups
        with pytest.raises(ValueError, match=rf"column slice \[16, 128\) is not in whole groups of {h.unit}"):
            h.narrow(t, 1, 16, 128)


@pytest.mark.parametrize("h", HANDLERS, ids=lambda h: h.name)
def test_unit_partials_do_not_depend_on_how_the_units_are_split_over_ranks(h):
    """A row-parallel projection with fixed units (QuantLinear.set_units): a unit's partial has the same
    bits whether one module holds every unit or a rank's column slice starting at that unit does, so
    every split of the units over ranks, their float64 partials summed in either order and cast
    once, gives the one-device output bitwise (bias on the first rank only, as prepare stores it)."""
    K, u = 512, max(h.unit, 64)
    units = [(0, u), (u, 3 * u), (3 * u, K)]  # uneven, in whole groups
    t, bias = h.quantize(weight(64, K)), torch.randn(64)
    x = torch.randn(5, K) * torch.logspace(-1, 1, K)  # 5 rows: a full block of the kernels' 4, and one more
    whole = h.module(t, bias)
    whole.set_units(units, keep_float64=True)
    want = whole(x)  # (5, 64) float64
    assert want.dtype == torch.float64
    whole.set_units(units)
    assert torch.equal(whole(x), want.float())
    for split in ([[0], [1, 2]], [[0, 1], [2]], [[0], [1], [2]]):
        parts = []
        for rank, held in enumerate(split):
            a, b = units[held[0]][0], units[held[-1]][1]
            shard = h.module(h.narrow(t, 1, a, b), bias if rank == 0 else None)
            shard.set_units([(units[i][0] - a, units[i][1] - a) for i in held], keep_float64=True)
            parts.append(shard(x[:, a:b]))
        assert torch.equal(sum(parts), want) and torch.equal(sum(reversed(parts)), want), split
    with pytest.raises(ValueError, match="units must tile"):
        whole.set_units([(0, u), (2 * u, K)])


@pytest.mark.parametrize("rows", [1, 16, 40])
def test_bf16_float_unit_partials_do_not_depend_on_the_split_either(rows):
    """The same for float weights held in bf16 (CastLinear.set_units), at decode (1 row) and prefill
    sizes. One matmul over a rank's columns (the code before) rounds another partial and differs
    from the one-device result at every size here; QuantLinear's masked rows differ from 16 rows on."""
    torch.manual_seed(0)
    K, out, units = 1408, 256, [(0, 352), (352, 704), (704, 1056), (1056, 1408)]
    w, bias = torch.randn(out, K) * 0.05, torch.randn(out)
    x = torch.randn(rows, K)

    def cast(w, b):
        m = CastLinear(w.shape[1], w.shape[0], bias=b is not None, dtype=torch.bfloat16)
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m

    whole = cast(w, bias)
    whole.set_units(units, keep_float64=True)
    want = whole(x)
    for split in ([[0], [1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2, 3]]):
        parts = []
        for rank, held in enumerate(split):
            a, b = units[held[0]][0], units[held[-1]][1]
            shard = cast(w[:, a:b], bias if rank == 0 else None)
            shard.set_units([(units[i][0] - a, units[i][1] - a) for i in held], keep_float64=True)
            parts.append(shard(x[:, a:b]))
        assert torch.equal(sum(parts), want), split
    whole.set_units(None)
    assert whole(x).dtype == torch.float32 and torch.allclose(whole(x), want.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_replaying_decode_steps_in_one_call_gives_each_row_its_bits(ckpt, compute):
    """Attention's `chunks`: a prompt and the decode steps after it, fed again in one call with chunks
    [len(prompt), 1, 1, ...], give every row the hidden state its own call gave, bitwise (what a
    tensor-parallel group's re-prefill relies on, group.replay): the quantized kernels' rows do not
    depend on how many rows share a call, and each row attends as its step did. One plain call
    does not: attention over many rows differs from one row's in the last bits, which fp32
    activations carry on (bf16 ones mostly round away on a model this small). (The float LM head's
    matmul is not row-independent either; the decode loop applies it to one row at a time.)"""
    from split.llama import KVCache
    for scheme in ("int8", "int4"):
        model = quantize_model(load_llama(ckpt), scheme, 32, compute_dtype=compute)
        L, cache, ids = model.config.num_hidden_layers, KVCache(), list(PROMPT)

        def layers(tokens, start, cache, chunks=None):  # (1, T) -> (1, T, C)
            return model.forward_layers(model.embed(torch.tensor([tokens])), 0, L, start, cache, chunks)
        with torch.inference_mode():
            rows = [layers(ids, 0, cache)]  # (1, P, C)
            for _ in range(12):
                ids.append(int(model.head(rows[-1][:, -1:])[0, -1].argmax()))
                rows.append(layers(ids[-1:], len(ids) - 1, cache))  # (1, 1, C)
            again = layers(ids, 0, KVCache(), [len(PROMPT)] + [1] * 12)
            plain = layers(ids, 0, KVCache())
        assert torch.equal(again, torch.cat(rows, dim=1)), scheme
        assert compute == torch.bfloat16 or not torch.equal(plain, again), scheme
    with pytest.raises(ValueError, match="chunks must be positive lengths summing to the 8 rows"):
        model(torch.tensor([PROMPT]), cache=KVCache(), chunks=[5, 2])


SMALL = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64).to_dict()


def tiny_checkpoint(path, tie=False, bias=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                   attention_bias=bias, tie_word_embeddings=tie, eos_token_id=1)
    hf = randomize_norms_and_biases(transformers.LlamaForCausalLM(cfg).eval())
    hf.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("q"))


def dequantized_reference(model: Llama, scheme, group, head) -> Llama:
    """The float model with every quantized weight replaced by its dequantized value."""
    h = handler(scheme, group)
    with torch.no_grad():
        for _, lin in linears(model, head):
            lin.weight.copy_(h.dequantize(h.quantize(lin.weight)))
    return model


@pytest.mark.parametrize("scheme,group", [("int8", 32), ("int8g", 32), ("int4", 32), ("int4", 128)])
def test_quantize_model_runs_generate(ckpt, scheme, group):
    tokens = torch.tensor([PROMPT])
    ref = dequantized_reference(load_llama(ckpt), scheme, group, head=True)(tokens)  # (1, T, vocab)
    for compute, tol in ((torch.float32, TOL_FP32 * 10), (torch.bfloat16, 5e-2)):
        model = quantize_model(load_llama(ckpt), scheme, group, head=True, compute_dtype=compute)
        kinds = {type(m) for _, m in model.named_modules()}
        assert torch.nn.Linear not in kinds and (WeightOnlyInt8Linear in kinds) == (scheme == "int8")
        assert close(model(tokens), ref, tol)  # the whole network, errors compounded over 2 layers
        run = generate(model, PROMPT, 8)
        assert len(list(run)) == 8 and run.finish_reason in ("length", "stop")
    assert isinstance(quantize_model(load_llama(ckpt), scheme, group).lm_head, torch.nn.Linear)  # head=False


@pytest.mark.parametrize("scheme,head,tie", [("int8", True, False), ("int8g", True, False), ("int4", False, False),
                                             ("int4", False, True), ("int4", True, True)])
def test_safetensors_round_trip_rebuilds_the_same_modules(tmp_path, scheme, head, tie):
    path = tiny_checkpoint(tmp_path / "ckpt", tie=tie, bias=not tie)
    tensors = quantized_state_dict(load_llama(path), scheme, 32, head=head)
    q = tensors["layers.0.mlp.down_proj.weight"]
    assert q.dtype == (torch.int8 if scheme.startswith("int8") else torch.uint8)
    assert tensors["layers.0.mlp.down_proj.scales"].ndim == (1 if scheme == "int8" else 2)
    save_file(tensors, str(tmp_path / "q.safetensors"))  # no shared tensors, nothing pickled
    loaded = load_file(str(tmp_path / "q.safetensors"))
    assert loaded.keys() == tensors.keys()

    expected = quantize_model(load_llama(path), scheme, 32, head=head)
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_dir(path))
    load_quantized(model, loaded)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for (n, a), (_, b) in zip(expected.named_modules(), model.named_modules()):
        assert type(a) is type(b), n
        for (bn, x), (_, y) in zip(a.named_buffers(recurse=False), b.named_buffers(recurse=False)):
            assert torch.equal(x, y), f"{n}.{bn}"
    if tie and not head:
        assert model.lm_head.weight is model.embed_tokens.weight
    tokens = torch.tensor([PROMPT])
    assert torch.equal(model(tokens), expected(tokens))
    assert list(generate(model, PROMPT, 6)) == list(generate(expected, PROMPT, 6))


def test_clear_errors():
    for g in (16, 48, 0):
        with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128, 256\)"):
            Int4(g)
    with pytest.raises(ValueError, match="scheme must be one of 'int8', 'int8g', 'int4', got 'int2'"):
        handler("int2")
    with pytest.raises(ValueError, match=r"x\.weight: int8g group_size 64 does not divide in_features 96"):
        Int8Group(64).check("x.weight", 64, 96)
    with pytest.raises(ValueError, match=r"x\.weight: int8g needs out_features divisible by 16.*\(40, 96\)"):
        Int8Group(32).check("x.weight", 40, 96)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        Int8().module(Int8().quantize(weight()), compute_dtype=torch.int32)
    d = transformers.LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=3,
                                 num_key_value_heads=3, vocab_size=64).to_dict()
    model = Llama(LlamaConfig.from_hf(d))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight: int4 group_size 64 does not "
                                         r"divide in_features 96 \(weight \(96, 96\)\)"):
        quantize_model(model, "int4", group_size=64)
    assert isinstance(model.layers["0"].self_attn.q_proj, torch.nn.Linear)  # nothing swapped before the error
    quantize_model(model, "int4", group_size=32)  # 32 divides 96 and 192
    with pytest.raises(ValueError, match=r"lm_head\.weight: int4 needs out_features divisible by 16.*\(40, 96\)"):
        Int4(32).check("lm_head.weight", 40, 96)
    with pytest.raises(ValueError, match=r"x\.weight: int8 needs in_features divisible by 16.*\(64, 100\)"):
        Int8().check("x.weight", 64, 100)


def test_load_quantized_rejects_mismatched_tensors(ckpt):
    tensors = quantized_state_dict(load_llama(ckpt), "int4", 32)
    name = "layers.0.mlp.up_proj"
    bad = dict(tensors, **{f"{name}.zeros": tensors[f"{name}.zeros"][:, :3]})
    with pytest.raises(ValueError, match=rf"{name}: int4 expects weight \(out, in/2\) with scales and zeros"):
        load_quantized(load_llama(ckpt), bad)
    bad = dict(tensors, **{f"{name}.weight": tensors[f"{name}.weight"][:128],
                           f"{name}.scales": tensors[f"{name}.scales"][:128],
                           f"{name}.zeros": tensors[f"{name}.zeros"][:128]})
    with pytest.raises(ValueError, match=rf"{name}: stored int4-g32 weight is \(128, 128\), the model expects "
                                         r"\(256, 128\)"):
        load_quantized(load_llama(ckpt), bad)
    bad = dict(tensors, **{f"{name}.weight": tensors[f"{name}.weight"].view(torch.int8)})
    with pytest.raises(ValueError, match=rf"{name}: not a quantized linear"):
        load_quantized(load_llama(ckpt), bad)
