"""split.llama against transformers itself, on tiny random checkpoints written by save_pretrained.

    .venv/bin/python -m pytest -q tests/test_llama_model.py

Tolerance: float32 logits agree with transformers within atol 1e-4 (measured: bit-identical, logits
of magnitude ~6); our own pieces (layer ranges, KV cache) agree with our full forward within atol
1e-4 (measured ~1e-5: the cached path runs SDPA on different shapes).
"""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_random import randomize_norms_and_biases
transformers = pytest.importorskip("transformers")

from split.llama import KVCache, Llama, LlamaConfig, Stop, generate, load_llama  # noqa: E402

ATOL_HF = 1e-4
ATOL_SELF = 1e-4
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# name -> (transformers class names, config kwargs, save_pretrained kwargs)
CHECKPOINTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, attention_bias=True, mlp_bias=True),
                    {}),
    "tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), {}),
    "sharded": ("LlamaConfig", "LlamaForCausalLM", {}, dict(max_shard_size="40KB")),
    # Qwen2: q/k/v biases; layers >= 1 use a 5-token sliding window
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(use_sliding_window=True, sliding_window=5, max_window_layers=1), {}),
    # Mistral: explicit head_dim (not hidden/heads) and a 6-token sliding window on every layer
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=8, sliding_window=6), {}),
    # Qwen3: q_norm/k_norm per head, explicit head_dim 24 (not 64/4), q/k/v/o biases, window 5 on layers >= 1
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, attention_bias=True, use_sliding_window=True,
                                                      sliding_window=5, max_window_layers=1), {}),
    # Phi-3: fused qkv_proj and gate_up_proj, RoPE on half of each head, a 6-token window on every layer,
    # tied embeddings, eos 2 (its default pad/eos ids 32000 lie outside this vocabulary)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.5, sliding_window=6,
                                                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=2), {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Build each checkpoint once (lazily): name -> (folder, transformers model in eval mode)."""
    built = {}

    def get(name):
        if name not in built:
            cfg_cls, model_cls, kwargs, save_kwargs = CHECKPOINTS[name]
            torch.manual_seed(0)
            cfg = getattr(transformers, cfg_cls)(**BASE, **kwargs)
            hf = getattr(transformers, model_cls)(cfg).eval()
            randomize_norms_and_biases(hf)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path, safe_serialization=True, **save_kwargs)
            built[name] = (path, hf)
        return built[name]

    return get


def tokens(B=2, T=14, seed=1):
    return torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_transformers(checkpoints, name):
    path, hf = checkpoints(name)
    model = load_llama(path)
    x = tokens()  # T=14 is longer than the sliding windows, so window masks are exercised
    with torch.no_grad():
        ref = hf(x).logits
        out = model(x)
    diff = (out - ref).abs().max().item()
    print(f"{name}: max |logits - transformers| = {diff:.2e}")
    assert diff < ATOL_HF, f"{name}: max abs logit difference {diff:.2e} >= {ATOL_HF}"


def test_checkpoint_layouts(checkpoints):
    tied_path, _ = checkpoints("tied")
    assert not any("lm_head" in k for k in load_file(tied_path / "model.safetensors"))
    model = load_llama(tied_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    sharded_path, _ = checkpoints("sharded")
    assert (sharded_path / "model.safetensors.index.json").is_file()
    assert len(list(sharded_path.glob("model-*-of-*.safetensors"))) > 1
    cfg = LlamaConfig.from_dir(checkpoints("llama3_rope")[0])
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    assert LlamaConfig.from_dir(checkpoints("qwen2")[0]).attention_out_bias is False
    # Phi-3's checkpoint holds fused tensors; the plain model holds q/k/v and gate/up apart
    phi3_path, phi3 = checkpoints("phi3")
    names = set(load_file(phi3_path / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    model = load_llama(phi3_path)
    fused = phi3.model.layers[0].self_attn.qkv_proj.weight  # rows: 4 q heads, 2 k heads, 2 v heads of 16
    a = model.layers["0"].self_attn
    assert torch.equal(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), fused)
    assert model.config.rotary_dim == 8 and model.lm_head.weight is model.embed_tokens.weight
    q3 = load_llama(checkpoints("qwen3")[0]).layers["2"].self_attn
    assert q3.q_norm.weight.shape == (24,) and q3.o_proj.bias is not None and q3.window == 5


@pytest.mark.parametrize("name", ["llama", "tied", "sharded"])
def test_layer_range_composition(checkpoints, name):
    path, _ = checkpoints(name)
    L, k = BASE["num_hidden_layers"], 1
    full = load_llama(path)
    device = load_llama(path, layers=range(0, k), with_head=False)
    cloud = load_llama(path, layers=range(k, L), with_embed=False)
    assert device.lm_head is None and device.norm is None and set(device.layers) == {"0"}
    assert cloud.embed_tokens is None and set(cloud.layers) == {str(i) for i in range(k, L)}
    assert not any(n.startswith(("layers.0.", "embed_tokens")) for n in cloud.state_dict())
    x = tokens()
    with torch.no_grad():
        h = device.forward_layers(device.embed(x), 0, k, positions=0)
        logits = cloud.head(cloud.forward_layers(h, k, L, positions=0))
        torch.testing.assert_close(logits, full(x), atol=ATOL_SELF, rtol=0)
    with pytest.raises(ValueError, match="not all held"):
        cloud.forward_layers(h, 0, L, positions=0)
    with pytest.raises(RuntimeError, match="with_embed=False"):
        cloud.embed(x)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_kv_cache_prefill_decode_matches_full_forward(checkpoints, name):
    path, _ = checkpoints(name)
    L, k = BASE["num_hidden_layers"], 2
    model = load_llama(path)
    x = tokens(T=13)
    P = 4
    with torch.no_grad():
        ref = model(x)  # (B, T, V), no cache
        # prefill P tokens, then one token at a time
        cache = KVCache()
        steps = [model(x[:, :P], cache=cache)]
        steps += [model(x[:, t:t + 1], positions=torch.tensor([t]), cache=cache)
                  for t in range(P, x.shape[1])]
        torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=ATOL_SELF, rtol=0)
        # chunked prefill (T_query = 3 < T_kv) into a fixed-size cache
        cache = KVCache(max_len=x.shape[1])
        chunks = [model(x[:, t:t + 3], positions=t, cache=cache) for t in range(0, x.shape[1], 3)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), ref, atol=ATOL_SELF, rtol=0)
        # the split: device cache for layers [0, k), cloud cache for [k, L), decode step by step
        dev_cache, cloud_cache = KVCache(), KVCache()
        outs = []
        for t0, t1 in [(0, 5)] + [(t, t + 1) for t in range(5, x.shape[1])]:
            h = model.forward_layers(model.embed(x[:, t0:t1]), 0, k, positions=t0, cache=dev_cache)
            outs.append(model.head(model.forward_layers(h, k, L, positions=t0, cache=cloud_cache)))
        assert set(dev_cache.lengths) == set(range(k)) and set(cloud_cache.lengths) == set(range(k, L))
        torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=ATOL_SELF, rtol=0)
        # a cache that starts at position 100: positions are explicit, not implied by the cache
        shifted = model(x, positions=torch.arange(100, 100 + x.shape[1]))
        cache = KVCache()
        steps = [model(x[:, :P], positions=100, cache=cache)]
        steps += [model(x[:, t:t + 1], positions=100 + t, cache=cache) for t in range(P, x.shape[1])]
        torch.testing.assert_close(torch.cat(steps, dim=1), shifted, atol=ATOL_SELF, rtol=0)
        full_cache = KVCache(max_len=x.shape[1])
        model(x, cache=full_cache)
        with pytest.raises(ValueError, match="KVCache is full"):
            model(x[:, :1], cache=full_cache)


@pytest.mark.parametrize("name", ["llama3_rope", "qwen2", "qwen3", "phi3"])
def test_greedy_generation_matches_transformers(checkpoints, name):
    path, hf = checkpoints(name)
    model = load_llama(path)
    prompt = tokens(B=1, T=7, seed=3)
    n = 12
    with torch.no_grad():  # eos_token_id=[]: never stop early (min_new_tokens would bend the eos logit)
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          eos_token_id=[], pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert len(ref) == n
    ours = list(generate(model, prompt[0].tolist(), max_new_tokens=n))
    assert ours == ref
    # stop_ids: with the checkpoint's eos ids we stop where transformers' default generate stops
    with torch.no_grad():
        ref_eos = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert list(generate(model, prompt[0], n, stop=Stop.of(model.config))) == ref_eos
    # a stop token is yielded, then generation ends
    assert list(generate(model, prompt[0], max_new_tokens=n, stop=Stop(eos_ids=[ref[0]]))) == ref[:1]


def test_tensor_parallel_sharding_by_replacing_weights(checkpoints):
    """A 2-way head/column split done from outside (as edge_runtime/tp/ will) sums to the full output."""
    path, _ = checkpoints("llama")
    model = load_llama(path)
    attn, mlp = model.layers["1"].self_attn, model.layers["1"].mlp
    x = torch.randn(2, 5, BASE["hidden_size"])
    cos, sin = model.rope(torch.arange(5), x.dtype)
    hd, W = attn.head_dim, 2
    with torch.no_grad():
        full_attn, full_mlp = attn(x, cos, sin, torch.arange(5)), mlp(x)
        attn_sum, mlp_sum = 0, 0
        for r in range(W):
            a, m = copy.deepcopy(attn), copy.deepcopy(mlp)
            nq, nkv = attn.n_local_heads // W, attn.n_local_kv_heads // W
            for proj, n in ((a.q_proj, nq), (a.k_proj, nkv), (a.v_proj, nkv)):
                proj.weight = torch.nn.Parameter(proj.weight[r * n * hd:(r + 1) * n * hd])
            a.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, r * nq * hd:(r + 1) * nq * hd])
            a.n_local_heads, a.n_local_kv_heads = nq, nkv
            h = m.gate_proj.out_features // W
            for proj in (m.gate_proj, m.up_proj):
                proj.weight = torch.nn.Parameter(proj.weight[r * h:(r + 1) * h])
            m.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, r * h:(r + 1) * h])
            attn_sum = attn_sum + a(x, cos, sin, torch.arange(5))
            mlp_sum = mlp_sum + m(x)
    torch.testing.assert_close(attn_sum, full_attn, atol=ATOL_SELF, rtol=0)
    torch.testing.assert_close(mlp_sum, full_mlp, atol=ATOL_SELF, rtol=0)


def test_bfloat16_matches_transformers_bfloat16(checkpoints):
    path, _ = checkpoints("llama3_rope")
    model = load_llama(path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.rope.inv_freq.dtype == torch.float32
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    x = tokens()
    with torch.no_grad():
        out, ref = model(x), hf(x).logits
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() < 1e-2  # measured: identical
    with pytest.raises(ValueError, match="dtype"):
        load_llama(path, dtype=torch.int8)


def hf_dict(**overrides):
    d = dict(model_type="llama", **BASE, rms_norm_eps=1e-6, rope_theta=10000.0)
    d.update(overrides)
    return d


@pytest.mark.parametrize("overrides, match", [
    (dict(model_type="gpt2"), "model_type must be one of"),
    (dict(num_key_value_heads=3),
     r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope_scaling.rope_type must be one of .*'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling.low_freq_factor is required"),
    (dict(hidden_size=65), r"hidden_size \(65\) must be divisible by num_attention_heads \(4\)"),
    (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(hidden_size=None), "hidden_size must be a positive integer"),
    # Phi-3 LongRoPE (and 'su' / 'yarn', which phi3 reads as longrope) is refused, naming the field
    (dict(model_type="phi3", rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
     r"rope_scaling.rope_type must be one of \('default',\) for model_type 'phi3', got 'longrope' \(.*LongRoPE"),
    (dict(model_type="phi3", rope_parameters={"rope_type": "su", "rope_theta": 1e4}), "got 'su'"),
    (dict(model_type="phi3", rope_scaling=LLAMA3_ROPE), r"for model_type 'phi3', got 'llama3'"),
    (dict(model_type="phi3", partial_rotary_factor=0.45), r"int\(head_dim \* partial_rotary_factor\) must be even"),
    (dict(model_type="phi3", partial_rotary_factor=1.5), r"partial_rotary_factor must be a number in \(0, 1\]"),
    (dict(model_type="qwen3", partial_rotary_factor=0.5), "partial_rotary_factor must be 1.0 for model_type 'qwen3'"),
    (dict(model_type="qwen3", head_dim=None), "head_dim must be a positive integer for model_type 'qwen3'"),
    (dict(model_type="qwen3", rope_scaling={"type": "yarn", "factor": 4.0}), "for model_type 'qwen3', got 'yarn'"),
])
def test_bad_config_gives_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(hf_dict(**overrides))


def test_config_from_hf_spellings():
    d = hf_dict()
    del d["vocab_size"]
    with pytest.raises(ValueError, match="missing the required field 'vocab_size'"):
        LlamaConfig.from_hf(d)
    # transformers-4 style: top-level rope_theta, rope_scaling with the old key "type"
    old = LlamaConfig.from_hf(hf_dict(rope_theta=5e5, rope_scaling={"type": "llama3", **{
        k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}))
    new = LlamaConfig.from_hf(hf_dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5}))
    assert old == new and old.rope_scaling["rope_type"] == "llama3"
    assert LlamaConfig.from_hf(hf_dict(rope_scaling={"type": "default"})).rope_scaling is None
    q = LlamaConfig.from_hf(hf_dict(model_type="qwen2"))
    assert q.attention_bias and not q.attention_out_bias and q.num_key_value_heads == 2


def test_family_config_fields():
    """Each family reads its own fields, with transformers' defaults where config.json leaves them out."""
    q3 = LlamaConfig.from_hf(hf_dict(model_type="qwen3", mlp_bias=True))
    assert q3.qk_norm and q3.head_dim == 128 and not (q3.attention_bias or q3.attention_out_bias or q3.mlp_bias)
    q3 = LlamaConfig.from_hf(hf_dict(model_type="qwen3", head_dim=8, attention_bias=True, use_sliding_window=True,
                                     sliding_window=4, max_window_layers=2))
    assert q3.attention_bias and q3.attention_out_bias and [q3.window_for(i) for i in range(3)] == [None, None, 4]
    assert LlamaConfig.from_hf(hf_dict(model_type="qwen3", sliding_window=4)).window_for(2) is None  # not used
    p3 = LlamaConfig.from_hf({k: v for k, v in hf_dict(model_type="phi3", attention_bias=True, mlp_bias=True,
                                                       sliding_window=7).items() if k != "rms_norm_eps"})
    assert p3.rms_norm_eps == 1e-5 and not (p3.attention_bias or p3.mlp_bias or p3.qk_norm)
    assert p3.window_for(0) == p3.window_for(2) == 7 and p3.rotary_dim == p3.head_dim == 16
    new = LlamaConfig.from_hf(hf_dict(model_type="phi3", rope_parameters={"rope_theta": 1e4, "rope_type": "default",
                                                                         "partial_rotary_factor": 0.5}))
    assert new.partial_rotary_factor == 0.5 and new.rotary_dim == 8 and new.rope_scaling is None
    m = LlamaConfig.from_hf(hf_dict(model_type="mistral", attention_bias=True, mlp_bias=True))
    assert not (m.attention_bias or m.mlp_bias)  # MistralConfig has neither field


def test_layer_range_argument_is_checked():
    cfg = LlamaConfig.from_hf(hf_dict())
    for bad in ([0, 2], range(2, 5), range(-1, 1)):
        with pytest.raises(ValueError, match="contiguous range inside"):
            Llama(cfg, layers=bad)
    with pytest.raises(RuntimeError, match="forward needs all 3 layers"):
        Llama(cfg, layers=range(0, 2))(tokens())


def test_missing_unexpected_or_misshapen_tensor_gives_clear_error(checkpoints, tmp_path):
    src, _ = checkpoints("llama")
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())

    def write(name, ts):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file(ts, d / "model.safetensors")
        return d

    missing = write("missing", {k: v for k, v in tensors.items() if k != "model.layers.2.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_llama(missing)
    load_llama(missing, layers=range(0, 2), with_head=False)  # a device part that does not need it loads fine
    extra = write("extra", {**tensors, "model.layers.7.self_attn.q_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"unexpected tensor.*model.layers.7.self_attn.q_proj.weight"):
        load_llama(extra)
    bad = write("bad", {**tensors, "model.norm.weight": torch.ones(63)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(63,\), expected \(64,\)"):
        load_llama(bad)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_llama(no_weights)


def test_fused_tensor_of_the_wrong_size_gives_clear_error(checkpoints, tmp_path):
    """Phi-3: a fused tensor of the wrong size is named with the size config.json implies; a Phi-3
    folder holding separate q/k/v tensors is not read as if it were fused."""
    src, _ = checkpoints("phi3")
    tensors = load_file(src / "model.safetensors")
    qkv = "model.layers.1.self_attn.qkv_proj.weight"  # (4 + 2 + 2 heads) * 16 rows

    def write(name, ts):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        save_file(ts, d / "model.safetensors")
        return d

    bad = write("bad_qkv", {**tensors, qkv: tensors[qkv][:-16].clone()})
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.qkv_proj.weight' has shape \(112, 64\), "
                                         r"expected \(128, 64\)"):
        load_llama(bad)
    separate = write("separate", {**{k: v for k, v in tensors.items() if "layers.0.self_attn.qkv_proj" not in k},
                                  "model.layers.0.self_attn.q_proj.weight": tensors[qkv][:64].clone()})
    with pytest.raises(ValueError, match=r"unexpected tensor.*model.layers.0.self_attn.q_proj.weight"):
        load_llama(separate)
