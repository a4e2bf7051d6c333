"""Apply tensor parallelism and weight paging to a plain split.llama `Llama`, beside the model code.

    with torch.device("meta"):
        model = Llama(config, with_embed=False, with_head=False)           # no weight memory
    parallelize(model, plan, rank, pager, collective)
    attach_head(model, "shards/rank0", stream=True)                   # master: streamed_head.py
    h = model.forward_layers(h, 0, L, positions=p, cache=cache)        # each layer: 2 allreduces

Per rank, attention keeps the query heads of its KV-head groups (q/k/v rows, o_proj columns) and
the MLP its slice of the intermediate dimension (gate/up rows, down_proj columns); the partial
outputs of o_proj and down_proj are summed by `collective.allreduce`. The weights of a block
(attention or MLP of one layer, including the RMSNorm in front of it) are not stored in the
model: forward pre-hooks acquire them from the pager and bind them to the modules, forward hooks
unbind and release them (so the pager can load the next block while this rank communicates)
and then allreduce the output. The norm in front of each block is where the block starts, so
its pre-hook does the acquiring. World size 1 with every block resident is the same code path.
"""

from __future__ import annotations

import torch
from torch import nn

from split.llama import Llama

from .collective import ATTN, MLP
from .plan import ShardPlan

_KIND = {"attn": ATTN, "mlp": MLP}


def _bind(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point the layer's parameters (keys like "self_attn.q_proj.weight") at the block's tensors."""
    for key, t in tensors.items():
        path, _, name = key.rpartition(".")
        layer.get_submodule(path)._parameters[name] = nn.Parameter(t, requires_grad=False)


def _unbind(layer: nn.Module, keys) -> None:
    """Drop the layer's references to a block so releasing it really frees the memory."""
    for key in keys:
        path, _, name = key.rpartition(".")
        layer.get_submodule(path)._parameters[name] = None


def _shard_shapes(model: Llama, plan: ShardPlan, rank: int) -> None:
    """Local head counts (read by Attention.forward) and meta placeholders with the local shapes."""
    (qa, qb), (ka, kb), (ma, mb) = plan.q_heads(rank), plan.kv_heads[rank], plan.mlp[rank]
    hd, C = plan.model["head_dim"], plan.model["hidden"]
    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        attn.n_local_heads, attn.n_local_kv_heads = qb - qa, kb - ka
        shapes = {attn.q_proj: ((qb - qa) * hd, C), attn.k_proj: ((kb - ka) * hd, C),
                  attn.v_proj: ((kb - ka) * hd, C), attn.o_proj: (C, (qb - qa) * hd),
                  mlp.gate_proj: (mb - ma, C), mlp.up_proj: (mb - ma, C), mlp.down_proj: (C, mb - ma)}
        for lin, (out_f, in_f) in shapes.items():
            lin.in_features, lin.out_features = in_f, out_f
            lin.weight = nn.Parameter(torch.empty(out_f, in_f, device="meta"), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(torch.empty(out_f, device="meta"), requires_grad=False)
        if rank != 0:  # row-parallel biases are added once, by rank 0
            attn.o_proj.bias = None
            mlp.down_proj.bias = None


def parallelize(model: Llama, plan: ShardPlan, rank: int, pager, collective) -> Llama:
    """Shard `model`'s layers for `rank` of `plan`, paging block weights through `pager` and summing
    partial outputs through `collective`. Returns the model (changed in place)."""
    if collective.world_size != plan.world_size or collective.rank != rank:
        raise ValueError(f"collective is rank {collective.rank} of {collective.world_size}, "
                         f"plan needs rank {rank} of {plan.world_size}")
    _shard_shapes(model, plan, rank)
    for name, layer in model.layers.items():
        i = int(name)
        keys: dict[str, list[str]] = {}  # kind -> the keys bound for the current use of the block

        def acquire(kind, i=i, layer=layer, keys=keys):
            def hook(module, args):
                tensors = pager.acquire((i, kind))
                keys[kind] = list(tensors)
                _bind(layer, tensors)
            return hook

        def reduce(kind, i=i, layer=layer, keys=keys):
            def hook(module, args, output):
                _unbind(layer, keys.pop(kind))
                pager.release((i, kind))  # the pager may start on the next block while we communicate
                return collective.allreduce(output, i, _KIND[kind])
            return hook

        layer.input_layernorm.register_forward_pre_hook(acquire("attn"))
        layer.self_attn.register_forward_hook(reduce("attn"))
        layer.post_attention_layernorm.register_forward_pre_hook(acquire("mlp"))
        layer.mlp.register_forward_hook(reduce("mlp"))
    return model
