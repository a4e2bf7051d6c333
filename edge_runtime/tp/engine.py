"""The tensor-parallel generation loop: the master (rank 0) and the worker loop (ranks 1..N-1).

    # worker, on each peer device (its own shard folder only)
    run_worker("shards/rank1", make_collective(TPConfig(world_size=3, master="10.0.0.2:5555", curve_keys="keys/"), 1), window=2)

    # master: tokenizer, embeddings, final norm and LM head (streamed from its files when paging,
    # streamed_head.py); prompt and tokens never leave it
    with Master("shards/rank0", make_collective(TPConfig(world_size=3, master="0.0.0.0:5555", curve_keys="keys/"), 0), 2) as m:
        for tok in m.generate(m.encode("Hello"), max_new_tokens=32):   # streams token ids
            print(m.decode([tok]), end="", flush=True)
        print(m.finish())     # stats of every rank (gathered from the workers), workers stop

Per step the master embeds the new tokens, broadcasts STEP with the hidden states (B, T, C) and
the position start, then every rank runs layers 0..L-1 on its shards (two allreduces per layer,
parallelize.apply_tp; weights paged in, parallelize.apply_paging) with its own KV cache for its
heads; the master applies the head and samples (split.llama's Generation). Workers only ever see
hidden states. World size 1 is the same code with a LocalCollective.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from devices.telemetry import ResidentSet
from split.llama import Generation, KVCache, Llama, LlamaConfig, Sampling, Stop
from split.llama.quantize import handler_from_dict, kernel_state, weight_shells

from .budget import plan_windows
from .collective import RESET, SHUTDOWN, STATS, STEP, Collective, CollectiveError
from .kernel_layout import kernel_folder
from .pager import Pager
from .parallelize import apply_paging, apply_tp, exact_partials
from .plan import ShardPlan
from .prepare import block_order
from .streamed_head import attach_head
from .timeline import timeline_for

STATS_FIELDS = ("peak_rss", "baseline_rss", "bytes_sent", "bytes_received", "pager_loads", "pager_max_resident",
                "pager_load_us", "pager_wait_us", "pager_bytes_loaded")


class Shard:
    """What every rank holds: its slice of the layers (weights paged), its KV cache, its pager.
    Weights are held as stored: int8 / int4 when the plan says so (quantized kernels with bf16
    activations), else float in `dtype`; norms, the residual stream and the allreduce stay float32."""

    def __init__(self, rank_dir: str | Path, collective: Collective, window: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.dir = Path(rank_dir)
        self.rank = collective.rank
        self.config = LlamaConfig.from_dir(self.dir)
        self.plan = ShardPlan.load(self.dir / "plan.json")
        self.plan.check(self.config, self.rank)
        if self.plan.world_size != collective.world_size:
            raise ValueError(f"plan world_size is {self.plan.world_size} but the collective has "
                             f"{collective.world_size} ranks")
        self.rss = ResidentSet()  # before any weight is loaded: the peak covers this rank's work only
        self.collective = collective
        with torch.device("meta"):
            self.model = Llama(self.config, with_embed=False, with_head=False)  # layers only, no memory
        self.window = plan_windows(self.plan)[self.rank] if window is None else window  # None: the plan's
        self.format = handler_from_dict(self.plan.extra.get("quantize"))  # None: float weights
        order = block_order(self.config.num_hidden_layers)
        self.pager = Pager(kernel_folder(self.dir, order), order, self.window, dtype=dtype,
                           transform=kernel_state if self.format is not None else None)
        self._threads = torch.get_num_threads()  # restored by close()
        if not self.pager.keep_all and self._threads > 1:
            # The loader reads while the layers compute: leave it a core. OpenMP's spinning barriers
            # collapse when one of their cores is taken (1.1B int4, window 4, 2 cores: 1198 ms/token
            # with 2 compute threads, 224 with 1).
            torch.set_num_threads(self._threads - 1)
        try:
            apply_tp(self.model, self.plan, collective)
            weight_shells(self.model, self.format, dtype)
            if self.format is not None or dtype == torch.bfloat16:  # partials rounded to bf16: fixed units
                exact_partials(self.model, self.plan, self.rank, self.format)
            apply_paging(self.model, self.pager)
            if self.rank == 0:  # embeddings, final norm, LM head: streamed from the files whenever blocks are paged
                attach_head(self.model, self.dir, stream=not self.pager.keep_all, dtype=dtype)
        except BaseException:
            self.close()
            raise
        if self.pager.keep_all:  # every block resident: load them now, not inside the first request
            self.pager.wait_idle(self.pager.timeout_s * len(order))
        self.model.eval()
        self.cache = KVCache()
        self.L = self.config.num_hidden_layers
        self.timeline = timeline_for(collective)  # None unless EDGEFOLD_TP_TIMELINE is set (timeline.py)

    def layers(self, hidden: torch.Tensor, start: int, steps_from: int = -1) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        """The layers over `hidden` at positions start..; steps_from >= 0: rows from there on were decode
        steps, one id each (a re-prefill, group.py), attended as such (Attention.forward's chunks)."""
        T, chunks = hidden.shape[1], None
        if 0 <= steps_from < T:
            chunks = ([steps_from] if steps_from else []) + [1] * (T - steps_from)  # the lead chunk, then steps
        with torch.inference_mode():
            return self.model.forward_layers(hidden, 0, self.L, positions=start, cache=self.cache, chunks=chunks)

    def stats_json(self) -> bytes:
        """This rank's counters as JSON (what a gather carries)."""
        p, c = self.pager.stats, self.collective
        return json.dumps(dict(peak_rss=self.rss.peak(), baseline_rss=self.rss.baseline, bytes_sent=c.bytes_sent,
                               bytes_received=c.bytes_received, pager_loads=p.loads,
                               pager_max_resident=p.max_resident, pager_load_us=int(1e6 * p.load_seconds),
                               pager_wait_us=int(1e6 * p.wait_seconds), pager_bytes_loaded=p.bytes_loaded)).encode()

    def close(self) -> None:
        self.pager.close()
        torch.set_num_threads(self._threads)
        if getattr(self, "timeline", None) is not None:
            self.timeline.close()


def stats_rows(blobs: list[bytes]) -> list[dict]:
    """Every rank's stats (gathered JSON, in rank order) as dicts; a malformed one names its rank."""
    rows = []
    for rank, blob in enumerate(blobs):
        try:
            row = json.loads(blob)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not all(type(row.get(f)) is int for f in STATS_FIELDS):
            raise CollectiveError(f"rank {rank} sent malformed stats: {bytes(blob[:200])!r}")
        rows.append(dict(rank=rank, **{f: row[f] for f in STATS_FIELDS}))
    return rows


def run_worker(rank_dir: str | Path, collective: Collective, window: int | None = None, log=print,
               dtype: torch.dtype = torch.float32) -> int:
    """Serve the master until SHUTDOWN (returns 0) or until it is gone or aborts (returns 3)."""
    try:
        shard = Shard(rank_dir, collective, window, dtype)
    except BaseException:
        collective.close()  # the master learns at once that this rank is gone
        raise
    try:
        while True:
            command, tensor = collective.broadcast(0)
            if command == STEP:
                if (tl := shard.timeline) is not None:
                    tl.begin()
                shard.layers(tensor, collective.last_step, collective.last_steps_from)
                if tl is not None:
                    tl.mark("layers")
                    tl.end()
            elif command == RESET:
                shard.cache.reset()
            elif command == STATS:
                collective.gather(shard.stats_json())
            elif command == SHUTDOWN:
                return 0
            else:
                raise CollectiveError(f"rank {collective.rank}: unknown command {command} from the master")
    except CollectiveError as err:
        log(f"worker rank {collective.rank}: {err}; exiting")
        return 3
    finally:
        shard.close()
        collective.close()


class Master:
    """Rank 0: the tokenizer, the embeddings and the head, and the decode loop over every rank."""

    def __init__(self, rank_dir: str | Path, collective: Collective, window: int | None = None,
                 dtype: torch.dtype = torch.float32):
        if collective.rank != 0:
            raise ValueError(f"the master is rank 0, the collective is rank {collective.rank}")
        self.collective = collective
        try:
            self.shard = Shard(rank_dir, collective, window, dtype)
        except BaseException:
            collective.close()  # the workers learn at once that there is no master
            raise
        self.model, self.config, self.plan = self.shard.model, self.shard.config, self.shard.plan
        self.tokenizer = None
        tok_file = self.shard.dir / "tokenizer.json"
        if tok_file.is_file():
            try:
                from tokenizers import Tokenizer
                self.tokenizer = Tokenizer.from_file(str(tok_file))
            except ImportError:
                pass
        self.last: Generation | None = None
        self._closed = False

    # --- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer.json (or `tokenizers` is not installed); "
                             "pass token ids instead (--prompt-ids 1,2,3)")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(list(ids))

    # --- one forward pass over all ranks ----------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start: int, all_logits: bool = False, steps_from: int = -1) -> torch.Tensor:
        """tokens (1, T) at positions start.. -> logits (1, T or 1, vocab); extends every rank's cache.
        steps_from >= 0: tokens from there on are decode steps fed again (Shard.layers)."""
        if self._closed:
            raise RuntimeError("the master is closed (an earlier request failed or finish() was called)")
        try:
            with torch.inference_mode():
                if (tl := self.shard.timeline) is not None:
                    tl.begin()
                h = self.model.embed(tokens)  # (1, T, C)
                self.collective.broadcast(STEP, h, step=start, steps_from=steps_from)
                if tl is not None:
                    tl.mark("embed")
                h = self.shard.layers(h, start, steps_from)  # (1, T, C)
                if tl is not None:
                    tl.mark("layers")
                logits = self.model.head(h if all_logits else h[:, -1:])  # (1, T or 1, vocab)
                if tl is not None:
                    tl.mark("head")
                    tl.end()
                return logits
        except BaseException as err:
            if not isinstance(err, CollectiveError):
                self.close()  # the workers are mid-step: stop them rather than leave them waiting for a sum
            raise

    def reset(self) -> None:
        if self._closed:
            raise RuntimeError("the master is closed (an earlier request failed or finish() was called)")
        self.collective.broadcast(RESET)
        self.shard.cache.reset()

    def prefill_logits(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """(T, vocab) logits of the prompt (a fresh cache)."""
        self.reset()
        return self.forward(torch.as_tensor([list(prompt_ids)], dtype=torch.long), 0, all_logits=True)[0]

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling | None = None,
                 stop: Stop = Stop()) -> Generation:
        """The decode loop over every rank: iterate it for token ids as they are produced; it keeps
        the request's tokens, timings and finish reason (also as `self.last`)."""
        prompt = [int(t) for t in prompt_ids]
        V = self.config.vocab_size
        if any(not 0 <= t < V for t in prompt):
            raise ValueError(f"prompt ids must be in [0, {V}), got {[t for t in prompt if not 0 <= t < V][:5]}")

        def step(ids: list[int], start: int) -> torch.Tensor:  # -> (vocab,) logits of the last id
            if start == 0:
                self.reset()  # a new request: every rank drops the previous one's KV cache
            return self.forward(torch.tensor([ids]), start)[0, -1]

        self.last = Generation(step, prompt, max_new_tokens, sampling, stop)
        return self.last

    # --- the end -------------------------------------------------------------------------------
    def rank_stats(self) -> list[dict]:
        """Stats of every rank: the workers send theirs over the collective's gather."""
        self.collective.broadcast(STATS)
        return stats_rows(self.collective.gather(self.shard.stats_json()))

    def finish(self) -> list[dict]:
        """Collect every rank's stats, then stop the workers."""
        stats = self.rank_stats()
        self.close()
        return stats

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.collective.broadcast(SHUTDOWN)
        except CollectiveError:
            pass
        finally:
            self.shard.close()
            self.collective.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
