"""A GGUF's Q4_0 / Q8_0 projections kept with their integers (issue 22 item 3), on tests/gguf_files.py's
files, against the `gguf` package's own dequantization.

    .venv/bin/python -m pytest -q tests/test_gguf_kept.py

- q4_0 kept: `tp prepare --model q4_0.gguf --quantize int4 --group-size 32` stores every Q4_0
  projection with the file's integer codes, scale d rounded fp16 -> bf16 and zero 0 (its dequantization
  within 8 * |d - bf16(d)| <= |d| / 32 of gguf's, per block), `tp generate --quantize int4` on it equals
  our one-process int4 model built from those tensors, and `--quantize int8` (or int4 g64) requantizes
  from the floats and says so;
- q8_0 kept: a Q8_0 projection reads as group-wise int8, group 32 (the file's int8 codes, scale d
  rounded fp16 -> bf16, within |q| * |d - bf16(d)| <= 127 * 2^-8 * |d| < |d| / 2 of gguf's
  dequantization per weight); `prepare` at world size 2 with the kept format takes every projection as
  stored (Phi-3's fused ones as their parts' rows), each rank's slice in whole groups; `tp generate
  --shards` on int8g shards (world size 1) equals our one-process int8g model built from the gguf
  package's dequantization, token for token; int8 (per channel) or int4 on a Q8_0 file, and int8g on a
  Q4_0 one, requantize from the floats.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from edge_runtime import cli as edge_cli  # noqa: E402
from edge_runtime.tp.gguf_source import model_folder  # noqa: E402
from gguf_files import BLOCK, N_NEW, PROMPT, gguf_unpermute, gguf_write  # noqa: E402


def q4_0_expected(stored, n_rows_heads=None):
    """What our int4 group-32 stored form of a Q4_0 tensor must be, from the gguf package: the integer codes
    q = dequantize(...) / d + 8 (exact: gguf computes d * (q - 8) in float32 from the fp16 d read here from
    each 18-byte block), scales = d rounded to bf16 (the int4 kernel's scale dtype), zeros = 0; packed two
    codes a byte, column 2j low; llama's q/k rows un-permuted (n_rows_heads). Also returns the gguf
    dequantization and d, un-permuted the same way."""
    want = dequantize(stored, Q.Q4_0).astype(np.float32)  # (out, in)
    n_out, n_in = want.shape
    d = np.ascontiguousarray(stored.reshape(n_out, n_in // 32, 18)[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if n_rows_heads:
        want, d = (gguf_unpermute(a, n_rows_heads) for a in (want, d))
    assert (d != 0).all()
    codes = want.reshape(n_out, n_in // 32, 32) / d[..., None]
    assert (codes == np.round(codes)).all() and codes.min() >= -8 and codes.max() <= 7
    q = torch.from_numpy((codes + 8).astype(np.uint8).reshape(n_out, n_in))
    scales = torch.from_numpy(d).to(torch.bfloat16)
    return ({"weight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales, "zeros": torch.zeros_like(scales)},
            torch.from_numpy(want), torch.from_numpy(d))


def q8_0_expected(stored, n_rows_heads=None):
    """What our int8g group-32 stored form of a Q8_0 tensor must be, from the gguf package: the integer codes
    q = dequantize(...) / d (exact: gguf computes q * d in float32 from the fp16 d read here from each 34-byte
    block, d first, gguf.quants.Q8_0), scales = d rounded to bf16 (the kernel's scale dtype), no zeros;
    llama's q/k rows un-permuted (n_rows_heads). Also returns the gguf dequantization and d, un-permuted."""
    want = dequantize(stored, Q.Q8_0).astype(np.float32)  # (out, in)
    n_out, n_in = want.shape
    d = np.ascontiguousarray(stored.reshape(n_out, n_in // 32, 34)[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if n_rows_heads:
        want, d = (gguf_unpermute(a, n_rows_heads) for a in (want, d))
    assert (d != 0).all()
    codes = want.reshape(n_out, n_in // 32, 32) / d[..., None]
    assert (codes == np.round(codes)).all() and codes.min() >= -127 and codes.max() <= 127
    q = torch.from_numpy(codes.astype(np.int8).reshape(n_out, n_in))
    return {"weight": q, "scales": torch.from_numpy(d).to(torch.bfloat16)}, torch.from_numpy(want), torch.from_numpy(d)


def projection_rows(module, config):
    """[(our projection, its rows [a, b))] of GGUF block tensor `module` ("attn_q", Phi-3's fused "attn_qkv"
    / "ffn_up": q | k | v and gate | up rows); [] for one that is not a projection (a norm)."""
    q = config["num_attention_heads"] * config["head_dim"]
    kv, inter = config["num_key_value_heads"] * config["head_dim"], config["intermediate_size"]
    if config["model_type"] == "phi3" and module in gguf_write.BLOCK_PHI3.values():
        return ([("self_attn.q_proj", (0, q)), ("self_attn.k_proj", (q, q + kv)), ("self_attn.v_proj", (q + kv, q + 2 * kv))]
                if module == "attn_qkv" else [("mlp.gate_proj", (0, inter)), ("mlp.up_proj", (inter, 2 * inter))])
    ours = {v: k for k, v in BLOCK.items()}.get(module, "")
    return [(ours, (0, None))] if ours.endswith("_proj") else []


def q4_0_projections(written, config, qtype=Q.Q4_0):
    """{our name "layers.i.self_attn.q_proj": (expected stored tensors, gguf dequantization, d)} for a Q4_0 file
    (or, with qtype Q8_0, a Q8_0 one); q/k rows un-permuted for llama, which llama.cpp permutes; Phi-3's fused
    tensors as their parts' rows."""
    expected = {Q.Q4_0: q4_0_expected, Q.Q8_0: q8_0_expected}[qtype]
    out = {}
    for g, (stored, t) in written.items():
        if t != qtype or not g.startswith("blk."):
            continue
        _, i, mod, _ = g.split(".")
        n = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(mod)
        for ours, (a, b) in projection_rows(mod, config):
            out[f"layers.{i}.{ours}"] = expected(stored[a:b], n if config["model_type"] == "llama" else None)
    return out


def test_prepare_int4_g32_keeps_the_q4_0_integers(gguf_files, tmp_path, capsys, monkeypatch):
    """Every projection of the prepared int4-g32 shards is the file's Q4_0 tensor with its integer codes
    as they are and scale d rounded fp16 -> bf16, zero 0: its dequantization is the gguf package's up to
    that rounding, |ours - gguf| <= 8 * |d - bf16(d)| <= |d| / 32 per block of 32 (bf16 keeps 8
    significant bits), and exactly codes * bf16(d)."""
    from edge_runtime.tp import gguf_source
    from split.llama.quantize import Int4
    monkeypatch.setattr(gguf_source, "DEFAULT_GGUF_CACHE", tmp_path / "cache" / "gguf")
    path, written = gguf_files["llama", "Q4_0"]
    out = tmp_path / "shards"
    assert edge_cli.main(["tp", "prepare", "--model", str(path), "--world-size", "1", "--quantize", "int4",
                          "--group-size", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Q4_0 projections keep their q4_0 integers" in err
    assert "int4-g32 weights taken as stored" in err and "self_attn.q_proj x2" in err and "mlp.down_proj x2" in err
    assert "quantized from floats: none" in err and "embeddings and LM head: int8 rows" in err
    config = json.loads((out / "rank0" / "config.json").read_text())
    expected = q4_0_projections(written, config)
    assert len(expected) == 14
    h = Int4(32)
    for name, (want_t, want, d) in expected.items():
        _, i, module = name.split(".", 2)
        block = load_file(out / "rank0" / f"layer{int(i):03d}.{'attn' if 'self_attn' in module else 'mlp'}.safetensors")
        got = {k: block[f"{module}.{k}"] for k in ("weight", "scales", "zeros")}
        for k in got:  # the same integer codes (and nibble order), bf16(d), zero 0
            assert torch.equal(got[k], want_t[k]), (name, k)
        w = h.dequantize(got).reshape(want.shape[0], -1, 32)
        bound = 8 * (d - d.to(torch.bfloat16).float()).abs()  # (out, in/32)
        assert ((w - want.reshape(w.shape)).abs() <= bound[..., None]).all(), name
        assert (bound <= d.abs() / 32).all()
        assert torch.equal(w, (want.reshape(w.shape) / d[..., None]) * d.to(torch.bfloat16).float()[..., None])


def test_generate_int4_q4_0_equals_our_one_process_model(gguf_files, tmp_path, capsys):
    """`tp generate --model q4_0.gguf --quantize int4` (world size 1) against our own one-process model whose
    projections are int4 modules built from the expected tensors (q4_0_expected: the gguf package's
    dequantization, not our mapping) and whose embeddings / LM head are int8 rows of the floats, as
    `tp prepare` stores them. Bitwise the same tensors through the same kernels, so token for token;
    transformers in fp32 would not do, as the int4 kernel multiplies bf16 activations."""
    from split.llama import generate as greedy
    from split.llama import load_llama
    from split.llama.quantize import Int4, Int8, use_row_units
    path, written = gguf_files["llama", "Q4_0"]
    folder = model_folder(path, tmp_path / "ref", progress=False, log=lambda m: None)
    model = load_llama(folder)
    h, table = Int4(32), Int8()
    for name, (t, _, _) in q4_0_projections(written, json.loads((folder / "config.json").read_text())).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, h.module(t))
    use_row_units(model, h)  # o_proj / down_proj sum their fixed units' partials, as every plan does
    with torch.no_grad():
        model.lm_head = table.module(table.quantize(model.lm_head.weight))
        model.embed_tokens.weight.copy_(table.dequantize(table.quantize(model.embed_tokens.weight)))
        want = list(greedy(model, PROMPT, N_NEW))
    argv = ["tp", "generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
            str(N_NEW), "--ignore-eos", "--json", "--cache-dir", str(tmp_path / "cache"), "--quantize", "int4"]
    assert edge_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["token_ids"] == want
    assert "int4-g32 weights taken as stored" in captured.err


@pytest.mark.parametrize("quantize, world", [(["int8"], 2), (["int4", "--group-size", "64"], 1)])
def test_prepare_other_formats_requantize_q4_0(gguf_files, tmp_path, capsys, monkeypatch, quantize, world):
    from edge_runtime.tp import gguf_source
    monkeypatch.setattr(gguf_source, "DEFAULT_GGUF_CACHE", tmp_path / "cache" / "gguf")
    path, _ = gguf_files["llama", "Q4_0"]
    out = tmp_path / "shards"
    assert edge_cli.main(["tp", "prepare", "--model", str(path), "--world-size", str(world), "--quantize", *quantize,
                          "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Q4_0" in err and "F32" in err and "dequantized" in err and "requantized" in err
    assert "taken as stored" not in err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["extra"]["quantize"]["scheme"] == quantize[0]
    assert (out / "rank0" / "tokenizer.json").is_file()
    assert (out / f"rank{world - 1}" / "layer001.mlp.safetensors").is_file()



# --------------------------------------------------------------------------- q8_0 kept (int8g, group 32)

def quiet_folder(path, cache):
    """model_folder of GGUF `path` under `cache`, and the notice it logged."""
    logged = []
    return model_folder(path, cache, progress=False, log=logged.append), "\n".join(logged)


@pytest.mark.parametrize("key", [("llama", "Q8_0"), ("phi3", "Q8_0")])
def test_q8_0_reads_as_int8g_g32_with_its_integers(gguf_files, tmp_path, key):
    """Every Q8_0 projection reads (read_stored) as the file's int8 codes with scale d rounded fp16 -> bf16
    (bf16 keeps 8 significant bits: |d - bf16(d)| <= 2^-8 |d|), so it dequantizes to the gguf package's
    weights within |q| * |d - bf16(d)| <= 127 * 2^-8 * |d| < |d| / 2 per weight (half a q8_0 step), and to
    exactly q * bf16(d); Phi-3's fused qkv / gate_up as each part's rows. Embeddings and LM head are not kept."""
    from split.llama import LlamaConfig, hf_source
    from split.llama.checkpoint import tensor_source
    from split.llama.quantize import Int4, Int8Group
    path, written = gguf_files[key]
    folder, notice = quiet_folder(path, tmp_path)
    n = sum(g.startswith("blk.") and t == Q.Q8_0 for g, (_, t) in written.items())  # 14 for llama, 8 fused phi3
    assert f"with --quantize int8g --group-size 32 its {n} Q8_0 projections keep their q8_0 integers" in notice
    assert "Q4_0" not in notice.split(";", 1)[1]  # no int4-g32 kept from a Q8_0 file
    info = json.loads((folder / "gguf.json").read_text())
    assert len(info["kept"]["int8-g32"]) == n and info["kept"]["int4-g32"] == []
    source, config = tensor_source(folder), LlamaConfig.from_dir(folder)
    assert source.kept(Int4(32)) == set() and len(source.kept(Int8Group(32))) == n
    expected = q4_0_projections(written, json.loads((folder / "config.json").read_text()), Q.Q8_0)
    assert len(expected) == 14
    h = Int8Group(32)
    for name, (want_t, want, d) in expected.items():
        got = source.read_stored(hf_source(config, f"{name}.weight"), h)
        assert got.keys() == {"weight", "scales"}
        for k in got:
            assert got[k].dtype == want_t[k].dtype and torch.equal(got[k], want_t[k]), (name, k)
        w = h.dequantize(got).reshape(want.shape[0], -1, 32)
        rounding = (d - d.to(torch.bfloat16).float()).abs()  # (out, in/32)
        assert (rounding <= d.abs() * 2**-8).all()
        codes = want.reshape(w.shape) / d[..., None]
        assert ((w - want.reshape(w.shape)).abs() <= codes.abs() * rounding[..., None]).all(), name
        assert ((w - want.reshape(w.shape)).abs() < d.abs()[..., None] / 2).all(), name
        assert torch.equal(w, codes * d.to(torch.bfloat16).float()[..., None])


def rank_blocks(out, world, layer):
    """{module: [rank 0's stored tensors, rank 1's, ...]} of layer `layer` of a prepared folder."""
    by_module = {}
    for r in range(world):
        for kind in ("attn", "mlp"):
            block = load_file(out / f"rank{r}" / f"layer{layer:03d}.{kind}.safetensors")
            for key, t in block.items():
                module, _, leaf = key.rpartition(".")
                if module.endswith("_proj") and leaf != "bias":
                    by_module.setdefault(module, [{} for _ in range(world)])[r][leaf] = t
    return by_module


@pytest.mark.parametrize("key, scheme", [(("llama", "Q8_0"), "int8g"), (("phi3", "Q4_0"), "int4"),
                                         (("qwen3", "Q8_0"), "int8g")])
def test_prepare_world_size_2_takes_the_integers_as_stored(gguf_files, tmp_path, capsys, key, scheme):
    """`prepare` at world size 2 with the kept format (int8g / int4, group 32) of a Q8_0 / Q4_0 file stores every
    projection as the file's integers (taken as stored, none requantized; Phi-3's fused qkv / gate_up as their
    parts' rows): each rank's slice is rows (q/k/v/gate/up) or whole groups of columns (o/down) of the expected
    tensors, and the slices put back together are them."""
    from edge_runtime.tp.prepare import prepare
    from split.llama.quantize import handler
    path, written = gguf_files[key]
    folder, _ = quiet_folder(path, tmp_path / "cache")
    out, fmt = tmp_path / "shards", handler(scheme, 32)
    plan = prepare(folder, 2, None, out, progress=False, quantize=fmt)
    err = capsys.readouterr().err
    assert f"{fmt.name} weights taken as stored" in err and "self_attn.q_proj x2" in err and "mlp.down_proj x2" in err
    assert "mlp.up_proj x2" in err and "quantized from floats: none" in err
    assert plan.extra["quantize"] == {"scheme": scheme, "group_size": 32}
    assert all(a % 32 == 0 and b % 32 == 0 for a, b in plan.mlp)
    expected = q4_0_projections(written, json.loads((folder / "config.json").read_text()), Q[key[1]])
    modules = rank_blocks(out, 2, 0).keys()
    assert len(modules) == 7
    for layer in (0, 1):
        for module, parts in rank_blocks(out, 2, layer).items():
            want = expected[f"layers.{layer}.{module}"][0]
            cols = module.endswith(("o_proj", "down_proj"))  # row-parallel: input columns per rank
            assert all(p.keys() == want.keys() for p in parts)
            for k in want:
                assert torch.equal(torch.cat([p[k] for p in parts], dim=1 if cols else 0), want[k]), (module, k)
            if cols:
                assert all(p["scales"].shape[1] * 32 == p["weight"].shape[1] * (2 if scheme == "int4" else 1)
                           for p in parts)


def one_process_int8g(folder, written, qtype=Q.Q8_0):
    """Our one-process model as `tp prepare` with int8g group 32 stores a Q8_0 file: projections as int8g
    modules built from q8_0_expected (the gguf package's dequantization, not our mapping), embeddings and
    LM head int8 rows of the floats."""
    from split.llama import load_llama
    from split.llama.quantize import Int8, Int8Group, use_row_units
    model = load_llama(folder)
    h, table = Int8Group(32), Int8()
    for name, (t, _, _) in q4_0_projections(written, json.loads((folder / "config.json").read_text()), qtype).items():
        parent, _, leaf = name.rpartition(".")
        bias = model.get_submodule(name).bias  # qwen2's q/k/v biases stay float
        setattr(model.get_submodule(parent), leaf, h.module(t, None if bias is None else bias.detach()))
    use_row_units(model, h)  # o_proj / down_proj sum their fixed units' partials, as every plan does
    with torch.no_grad():
        model.lm_head = table.module(table.quantize(model.lm_head.weight))
        model.embed_tokens.weight.copy_(table.dequantize(table.quantize(model.embed_tokens.weight)))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_generate_int8g_q8_0_equals_our_one_process_model(gguf_files, tmp_path, capsys, arch):
    """`tp generate --shards` on int8g group-32 shards of a Q8_0 file (world size 1) against our one-process
    model (one_process_int8g): bitwise the same tensors through the same kernels, so token for token; as for
    q4_0, not transformers in fp32, since the kernel multiplies bf16 activations."""
    from edge_runtime.tp.prepare import prepare
    from split.llama import generate as greedy
    from split.llama.quantize import handler
    path, written = gguf_files[arch, "Q8_0"]
    folder, _ = quiet_folder(path, tmp_path / "cache")
    with torch.no_grad():
        want = list(greedy(one_process_int8g(folder, written), PROMPT, N_NEW))
    prepare(folder, 1, None, tmp_path / "shards", progress=False, quantize=handler("int8g", 32))
    assert "int8-g32 weights taken as stored" in capsys.readouterr().err
    argv = ["tp", "generate", "--shards", str(tmp_path / "shards"), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-new-tokens", str(N_NEW), "--ignore-eos", "--json"]
    assert edge_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == want


@pytest.mark.parametrize("key, scheme, group, world", [
    (("llama", "Q8_0"), "int8", 32, 2), (("qwen2", "Q8_0"), "int4", 32, 2), (("llama", "Q4_0"), "int8g", 32, 2),
    (("llama", "Q8_0"), "int8g", 64, 1)])  # (64 columns of o_proj: a world size 2 slice is not a whole group)
def test_prepare_other_formats_requantize_q8_0(gguf_files, tmp_path, capsys, key, scheme, group, world):
    """Only the format a GGUF type maps onto takes its integers: per-channel int8 or int4 on a Q8_0 file,
    int8g on a Q4_0 one, int8g with another group size: all quantized from the dequantized floats."""
    from edge_runtime.tp.prepare import prepare
    from split.llama.quantize import handler, handler_of
    path, _ = gguf_files[key]
    folder, _ = quiet_folder(path, tmp_path / "cache")
    out = tmp_path / "shards"
    prepare(folder, world, None, out, progress=False, quantize=handler(scheme, group))
    assert "taken as stored" not in capsys.readouterr().err
    block = load_file(out / f"rank{world - 1}" / "layer001.mlp.safetensors")
    t = {k: block[f"mlp.down_proj.{k}"] for k in ("weight", "scales", "zeros") if f"mlp.down_proj.{k}" in block}
    assert handler_of("mlp.down_proj", t).name == handler(scheme, group).name

