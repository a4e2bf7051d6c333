"""Tensor-parallel LLM inference across peer devices, applied beside the plain model in split/llama.

One token, in the order it meets the modules: cli.py -> launch.py -> engine.py (Master) ->
parallelize.py's hooks on each layer (pager.py, collective) -> back to engine.py for the head.

    cli.py           `edge-runtime tp prepare|worker|generate|keys`: argparse and printing only
    config.py        TPConfig: the one frozen object the CLI (or the agent's `tp` pipeline) hands down
    launch.py        free ports, the shard cache, local worker processes, starting rank 0 or joining a worker
    plan.py          ShardPlan: KV-head groups and MLP columns per rank, proportional to weights (JSON)
    prepare.py       HF folder -> per-rank, per-layer safetensors shards (`edge-runtime tp prepare`)
    engine.py        Shard (one rank's layers), Master (tokens, embeddings, head, decode loop), run_worker
    parallelize.py   apply_tp (shard + allreduce), exact_partials (quantized: plan-independent sums) and
                     apply_paging (weights from a pager), each alone
    pager.py         the sliding window of resident weight blocks, loaded by a background thread
    blockfile.py     safetensors block files read into owned memory (what the pager and the head read)
    streamed_head.py rank 0's embeddings and LM head read from their files instead of kept in memory
    collective.py    the allreduce/broadcast/gather interface, LocalCollective (world size 1)
    connect.py       make_collective(config, rank): the backend for a rank
    star.py          the star collective over ZeroMQ: protocol, deadlines, what both sides share
    star_master.py   StarMaster, rank 0 of the star;   star_worker.py  StarWorker, ranks 1..N-1
    fastpath.py      unix socket between local ranks, bounded busy-poll (machine-specific, optional)
    gloo.py          the same interface over torch.distributed's gloo, for comparison
    wire.py          the peer-to-peer message format (header frame + raw buffers, no pickle)
    curve.py         ZeroMQ CURVE keys (`edge-runtime tp keys`)

Nothing here is imported by `edge_runtime.cli` until a `tp` command runs (torch stays unloaded).
"""
