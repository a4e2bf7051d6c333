"""Per-rank memory budgets: the window each rank can afford, and what a rank will hold.

    edge-runtime tp prepare --model HF_DIR --world-size 4 --max-rank-memory 512MiB --out shards/
    windows = pick_windows(config, plan, 512 << 20)      # [w0, w1, ...]; 0 = every block resident

A rank holds, above the process it runs in (the "baseline" that `tp generate --json` reports):
  * `window` weight blocks (the attention or the MLP of one layer, its rows and columns of the
    plan), or all of them when the window is 0: float weights counted as float32 (the largest
    compute dtype), int8 / int4 ones as stored (the plan's "quantize": weights, scales, zeros);
  * its KV cache: 2 x layers x its KV heads x head_dim x `context` tokens, float32;
  * rank 0 also the LM head: streamed from its file through a 4 MiB buffer when it has a window,
    resident (vocab x hidden, float32 or int8 rows with their scales) when it has none; the
    embeddings are always read row by row from their file;
  * OVERHEAD for activations, logits, the loader's spare buffer and allocator slack.
The window picked is the largest that fits (all resident when everything does); a budget that
not even one block fits is refused with the figures. A plan's windows and budget are kept in
plan.json (`extra`), so every rank finds its own.
"""
from __future__ import annotations

import re

from split.llama import LlamaConfig
from split.llama.quantize import handler_from_dict

from .plan import ShardPlan

FLOAT32 = 4
OVERHEAD = 48 << 20  # activations, logits, the loader's spare buffer, allocator slack
STREAM_CHUNK = 4 << 20  # streamed_head.CHUNK_BYTES
CONTEXT = 2048  # tokens of KV cache a budget leaves room for
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_bytes(text: str, what: str = "--max-rank-memory") -> int:
    """'512MiB', '1.5GiB', '800MB', '1073741824' -> bytes; a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{what}: expected a size such as 512MiB, 1.5GiB or 800MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def block_bytes(config: LlamaConfig, plan: ShardPlan, rank: int) -> list[int]:
    """Bytes of each of `rank`'s blocks in memory, in forward order (attention, MLP; layer by layer)."""
    hd, C = config.head_dim, config.hidden_size
    (qa, qb), (ka, kb), (ma, mb) = plan.q_heads(rank), plan.kv_heads[rank], plan.mlp[rank]
    q, kv, m = (qb - qa) * hd, (kb - ka) * hd, mb - ma
    fmt = handler_from_dict(plan.extra.get("quantize"))

    def weights(*shapes) -> int:  # (out, in) of projections
        return sum(FLOAT32 * o * i if fmt is None else fmt.kernel_bytes(o, i) for o, i in shapes)

    attn = weights((q, C), (C, q), (kv, C), (kv, C))  # q, o, k, v
    attn += FLOAT32 * (C + (q + 2 * kv) * config.attention_bias + C * (config.attention_out_bias and rank == 0)
                       + 2 * hd * config.qk_norm)  # input norm, biases, q/k norms
    mlp = weights((m, C), (m, C), (C, m)) + FLOAT32 * (C + (2 * m + C * (rank == 0)) * config.mlp_bias)
    return [attn, mlp] * config.num_hidden_layers


def rank_memory(config: LlamaConfig, plan: ShardPlan, rank: int, window: int, context: int = CONTEXT) -> int:
    """Bytes rank `rank` holds above its baseline with `window` blocks resident (0 = all)."""
    blocks = block_bytes(config, plan, rank)
    resident = sum(blocks) if window == 0 or window >= len(blocks) else window * max(blocks)
    ka, kb = plan.kv_heads[rank]
    kv_cache = 2 * config.num_hidden_layers * (kb - ka) * config.head_dim * context * FLOAT32
    head = 0
    if rank == 0:
        V, C = config.vocab_size, config.hidden_size
        table = V * C * FLOAT32 if "quantize" not in plan.extra else V * C + 2 * V  # int8 rows and scales
        head = STREAM_CHUNK if 0 < window < len(blocks) else table
    return resident + kv_cache + head + OVERHEAD


def pick_windows(config: LlamaConfig, plan: ShardPlan, budget: int, context: int = CONTEXT) -> list[int]:
    """The largest window per rank within `budget` bytes (0: everything fits resident)."""
    windows = []
    for rank in range(plan.world_size):
        n = len(block_bytes(config, plan, rank))
        if rank_memory(config, plan, rank, 0, context) <= budget:
            windows.append(0)
            continue
        fitting = [w for w in range(1, n) if rank_memory(config, plan, rank, w, context) <= budget]
        if not fitting:
            need = rank_memory(config, plan, rank, 1, context)
            raise ValueError(
                f"--max-rank-memory: rank {rank} needs {need / 2**20:.0f} MiB even with a window of one block "
                f"(largest block {max(block_bytes(config, plan, rank)) / 2**20:.0f} MiB, KV cache for {context} "
                f"tokens, {OVERHEAD >> 20} MiB overhead), over the budget of {budget / 2**20:.0f} MiB; "
                f"give more ranks, other --weights, or a larger budget")
        windows.append(max(fitting))
    return windows


def apply_budget(plan: ShardPlan, config: LlamaConfig, budget: int | None) -> ShardPlan:
    """Record in the plan the window each rank can afford within `budget` (None: no budget)."""
    if budget is not None:
        plan.extra.update(max_rank_memory=int(budget), windows=pick_windows(config, plan, budget))
    return plan


def plan_windows(plan: ShardPlan) -> list[int]:
    """Each rank's window from the plan (0, all resident, when it was prepared without a budget)."""
    return [int(w) for w in plan.extra.get("windows", [0] * plan.world_size)]
