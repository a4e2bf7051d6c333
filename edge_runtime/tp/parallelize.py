"""Tensor parallelism and weight paging, each applied to a plain split.llama `Llama` on its own.

    with torch.device("meta"):
        model = Llama(config, with_embed=False, with_head=False)       # no weight memory
    apply_tp(model, plan, collective)      # this rank's heads and MLP columns; two allreduces per layer
    exact_partials(model, plan, rank, h)   # quantized weights (after weight_shells): plan-independent sums
    apply_paging(model, pager)             # block weights acquired before a block runs, released after
    attach_head(model, "shards/rank0", stream=True)                     # rank 0: streamed_head.py
    h = model.forward_layers(h, 0, L, positions=p, cache=cache)

apply_tp (the colwise/rowwise split of gpt-fast's tp.py): rank r keeps the query heads of its
KV-head groups (q/k/v rows, o_proj columns) and its slice of the MLP's intermediate dimension
(gate/up rows, down_proj columns); forward hooks sum the partial outputs of attention and MLP
through `collective.allreduce`. Qwen3's q_norm / k_norm normalise one head over head_dim with the
same weights for every head, so every rank keeps them whole. Phi-3's fused qkv / gate_up tensors
never reach this file: the model holds q/k/v and gate/up apart (tp prepare slices a rank's rows
out of the fused checkpoint tensors). apply_tp slices whatever weights the model holds: real ones
of a loaded model, or meta placeholders that then have this rank's shapes. Row-parallel biases stay on rank 0
only, so the allreduce adds them once. World size 1 leaves every shape as it is.

apply_paging: a block is the attention or the MLP of one layer, with the RMSNorm in front of it
(one file per block: `tp prepare` writes them, or a one-rank prepare for a single device). Its
weights are not stored in the model: a forward pre-hook on the norm acquires them from the pager
and binds them to the modules, a forward hook on the block unbinds and releases them before
anything else runs after it (the allreduce above included), so the pager loads the next block
while this rank communicates. Without apply_tp this runs a model larger than memory on one device.
Apply apply_tp first (either order works).
"""
from __future__ import annotations

import torch
from torch import nn

from split.llama import Llama
from split.llama.quantize import Format, row_units

from .collective import ATTN, MLP, Collective
from .plan import ShardPlan


# --------------------------------------------------------------------------- tensor parallelism

def _narrow(t: torch.Tensor, dim: int, a: int, b: int) -> nn.Parameter:
    """[a, b) of t along dim, as a parameter of its own. A meta placeholder gets a new one of the
    narrowed shape: cloning a strided meta view would load torch's Python meta kernels (+33 MiB RSS)."""
    if t.is_meta:
        shape = list(t.shape)
        shape[dim] = b - a
        return nn.Parameter(torch.empty(shape, dtype=t.dtype, device="meta"), requires_grad=False)
    return nn.Parameter(t.narrow(dim, a, b - a).clone(), requires_grad=False)


def _slice(linear: nn.Linear, dim: int, span: tuple[int, int], keep_bias: bool = True) -> None:
    """Keep rows (dim 0) or columns (dim 1) [a, b) of linear's weight; a row slice cuts the bias too,
    a column slice keeps the whole bias, or drops it (keep_bias False)."""
    a, b = span
    if linear.weight is not None:  # (out, in); None once apply_paging took the weights out of the model
        linear.weight = _narrow(linear.weight, dim, a, b)
    if dim == 0:
        linear.out_features = b - a
        if linear.bias is not None:
            linear.bias = _narrow(linear.bias, 0, a, b)
    else:
        linear.in_features = b - a
        if not keep_bias:
            linear.bias = None


def apply_tp(model: Llama, plan: ShardPlan, collective: Collective) -> Llama:
    """Shard `model`'s layers for `collective.rank` of `plan` and sum the partial outputs of every
    attention and MLP over the ranks. Returns the model (changed in place)."""
    rank = collective.rank
    if collective.world_size != plan.world_size:
        raise ValueError(f"collective has {collective.world_size} ranks, plan needs {plan.world_size}")
    (qa, qb), (ka, kb) = plan.q_heads(rank), plan.kv_heads[rank]
    for name, layer in model.layers.items():
        attn, mlp = layer.self_attn, layer.mlp
        attn.n_local_heads, attn.n_local_kv_heads = qb - qa, kb - ka
        _slice(attn.q_proj, 0, plan.q_rows(rank))  # (local heads * head_dim, C)
        _slice(attn.k_proj, 0, plan.kv_rows(rank))  # (local KV heads * head_dim, C)
        _slice(attn.v_proj, 0, plan.kv_rows(rank))
        _slice(attn.o_proj, 1, plan.q_rows(rank), keep_bias=rank == 0)  # (C, local heads * head_dim)
        # attn.q_norm / attn.k_norm (head_dim,), when present: per head, whole on every rank
        for proj in (mlp.gate_proj, mlp.up_proj):
            _slice(proj, 0, plan.mlp[rank])  # (local columns, C)
        _slice(mlp.down_proj, 1, plan.mlp[rank], keep_bias=rank == 0)  # (C, local columns)

        def allreduce(i: int, kind: int):  # (B, T, C) summed, in the block input's dtype (exact_partials)
            return lambda module, args, output: collective.allreduce(output, i, kind).to(args[0].dtype)

        attn.register_forward_hook(allreduce(int(name), ATTN))
        mlp.register_forward_hook(allreduce(int(name), MLP))
    return model


def exact_partials(model: Llama, plan: ShardPlan, rank: int, h: Format | None) -> Llama:
    """Quantized weights (format `h`) or float weights held in bf16 (h None), after weight_shells:
    each o_proj / down_proj of `rank` sums its fixed units' partials (split.llama.quantize.row_units;
    set_units) in float64 and hands that to the allreduce, which sums float64 and casts once: exact
    sums of the same bf16 partials on every plan, so a re-plan, or one device, gives the same bits.
    Returns the model."""
    units = row_units(model.config, h)
    spans = {"self_attn.o_proj": plan.q_rows(rank), "mlp.down_proj": plan.mlp[rank]}
    for name, (a, b) in spans.items():
        local = [(u - a, v - a) for u, v in units[name] if a <= u and v <= b]
        if sum(v - u for u, v in local) != b - a:
            raise ValueError(f"rank {rank}'s {name} columns [{a}, {b}) are not whole units of {units[name]} "
                             f"(shards prepared by an older version, or for fp32 weights: prepare them again, "
                             f"with --dtype bf16 for bf16)")
        for layer in model.layers.values():
            layer.get_submodule(name).set_units(local, keep_float64=True)
    return model


# --------------------------------------------------------------------------- paging

_BLOCK = {"attn": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}


def _bind(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point the layer's parameters (keys like "self_attn.q_proj.weight") at the block's tensors; a
    quantized module (split.llama.quantize) holds its kernel tensors as buffers instead."""
    for key, t in tensors.items():
        path, _, name = key.rpartition(".")
        module = layer.get_submodule(path)
        if name in module._buffers:
            module._buffers[name] = t
        elif name in module._parameters:
            module._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            raise ValueError(f"block tensor {key!r} has no place in the model (a shard of another format?)")


def _unbind(layer: nn.Module, keys) -> None:
    """Drop the layer's references to a block so releasing it really frees the memory."""
    for key in keys:
        path, _, name = key.rpartition(".")
        module = layer.get_submodule(path)
        (module._buffers if name in module._buffers else module._parameters)[name] = None


def apply_paging(model: Llama, pager) -> Llama:
    """Take the block weights out of `model`'s layers; each block acquires them from `pager` (keys
    relative to the layer) when it starts and releases them when it ends. Returns the model."""
    for name, layer in model.layers.items():
        i = int(name)
        for kind, (norm, block) in _BLOCK.items():
            for module in (layer.get_submodule(norm), layer.get_submodule(block)):
                for sub in module.modules():
                    for table in (sub._parameters, sub._buffers):
                        for p in list(table):
                            table[p] = None  # the pager's tensors are bound in their place
            bound: list[str] = []  # the keys bound for the current use of the block

            def acquire(module, args, i=i, kind=kind, layer=layer, bound=bound):
                tensors = pager.acquire((i, kind))
                bound[:] = tensors
                _bind(layer, tensors)

            def release(module, args, output, i=i, kind=kind, layer=layer, bound=bound):
                _unbind(layer, bound)
                pager.release((i, kind))  # the pager may start on the next block while we communicate

            layer.get_submodule(norm).register_forward_pre_hook(acquire)
            layer.get_submodule(block).register_forward_hook(release, prepend=True)  # before any allreduce
    return model
