"""Tensor-parallel LLM inference across peer devices, applied beside the plain model in split/llama.

    plan.py         ShardPlan: KV-head groups and MLP columns per rank, proportional to weights (JSON)
    prepare.py      HF folder -> per-rank, per-layer safetensors shards (`edge-runtime tp prepare`)
    parallelize.py  local shapes + hooks on a meta-built Llama: page block weights in, allreduce out
    engine.py       the master (tokens, embeddings, head, sampling) and the worker loop
    collective.py   the allreduce/broadcast interface; star.py (ZeroMQ) and gloo.py behind it
    pager.py        the sliding window of resident weight blocks
    cli.py          `edge-runtime tp prepare|worker|generate|keys`

Nothing here is imported by `edge_runtime.cli` until a `tp` command runs (torch stays unloaded).
"""
