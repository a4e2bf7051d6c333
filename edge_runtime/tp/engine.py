"""The tensor-parallel generation loop: the master (rank 0) and the worker loop (ranks 1..N-1).

    # worker, on each peer device (its own shard folder only)
    run_worker("shards/rank1", make_collective("star", 1, 3, "10.0.0.2:5555"), window=2)

    # master: tokenizer, embeddings, final norm and LM head (streamed from its files when paging,
    # streamed_head.py); prompt and tokens never leave it
    with Master("shards/rank0", make_collective("star", 0, 3, "0.0.0.0:5555"), window=2) as m:
        for tok in m.generate(m.encode("Hello"), max_new_tokens=32):   # streams token ids
            print(m.decode([tok]), end="", flush=True)
        print(m.finish())     # stats of every rank (workers send theirs at the end), workers stop

Per step the master embeds the new tokens, broadcasts STEP with the hidden states (B, T, C) and
the position start, then every rank runs layers 0..L-1 on its shards (two allreduces per layer,
installed by parallelize.py) with its own KV cache for its heads; the master applies the head
and samples. Workers only ever see hidden states. World size 1 is the same code with a
LocalCollective.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from devices.telemetry import ResidentSet
from split.llama import KVCache, Llama, LlamaConfig

from .collective import RESET, SHUTDOWN, STEP, Collective, CollectiveError
from .parallelize import parallelize
from .plan import ShardPlan
from .prepare import block_order
from .streamed_head import attach_head

STATS = 4  # broadcast command: every worker sends its stats row (allreduce of a one-hot int64 table)
STATS_FIELDS = ("peak_rss", "baseline_rss", "bytes_sent", "bytes_received", "pager_loads", "pager_max_resident",
                "pager_load_us", "pager_wait_us", "pager_bytes_loaded")
_DIGITS = 8  # stats travel as base-127 digits so fp16 and int8 payloads carry them exactly


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One token from (vocab,) logits: argmax, or temperature -> top-k -> top-p -> multinomial."""
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


class Shard:
    """What every rank holds: the sharded layers (weights paged), its KV cache, its pager."""

    def __init__(self, rank_dir: str | Path, collective: Collective, window: int = 0,
                 dtype: torch.dtype = torch.float32, pager_timeout_s: float = 60.0):
        from .pager import Pager

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
        master = self.rank == 0
        with torch.device("meta"):
            self.model = Llama(self.config, with_embed=False, with_head=False)  # layers only, no memory
        self.pager = Pager(self.dir, block_order(self.config.num_hidden_layers), window, dtype=dtype,
                           **({"timeout_s": pager_timeout_s} if pager_timeout_s else {}))
        try:
            if master:  # embeddings, final norm, LM head: streamed from the files whenever blocks are paged
                attach_head(self.model, self.dir, dtype, stream=not self.pager.keep_all)
            parallelize(self.model, self.plan, self.rank, self.pager, collective)
        except BaseException:
            self.pager.close()
            raise
        self.model.eval()
        self.cache = KVCache()
        self.L = self.config.num_hidden_layers

    def layers(self, hidden: torch.Tensor, start: int) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        with torch.inference_mode():
            return self.model.forward_layers(hidden, 0, self.L, positions=start, cache=self.cache)

    def stats(self) -> dict:
        p = self.pager.stats if hasattr(self.pager, "stats") else self.pager
        c = self.collective
        return dict(peak_rss=self.rss.peak(), baseline_rss=self.rss.baseline, bytes_sent=c.bytes_sent,
                    bytes_received=c.bytes_received, pager_loads=int(getattr(p, "loads", 0)),
                    pager_max_resident=int(getattr(p, "max_resident", 0)),
                    pager_load_us=int(1e6 * getattr(p, "load_seconds", 0.0)),
                    pager_wait_us=int(1e6 * getattr(p, "wait_seconds", 0.0)),
                    pager_bytes_loaded=int(getattr(p, "bytes_loaded", 0)))

    def close(self) -> None:
        self.pager.close()


def _stats_table(collective: Collective, own: dict) -> list[dict]:
    """Allreduce a (world, fields, digits) table in which each rank fills only its own row: every
    rank ends with all rows. Values are written as base-127 digits (0..126) with a 127 sentinel in
    each row, so the sums are exact under fp32, fp16 and per-row int8 payloads alike."""
    W, F = collective.world_size, len(STATS_FIELDS)
    table = torch.zeros(W, F, _DIGITS + 1)
    table[collective.rank, :, _DIGITS] = 127.0
    for f, name in enumerate(STATS_FIELDS):
        v = max(0, int(own[name]))
        for d in range(_DIGITS):
            v, table[collective.rank, f, d] = divmod(v, 127)
    total = collective.allreduce(table, -1, 0).round().to(torch.int64)
    weights = torch.tensor([127 ** d for d in range(_DIGITS)], dtype=torch.int64)
    values = (total[..., :_DIGITS] * weights).sum(-1)  # (W, F)
    return [dict(rank=r, **{n: int(values[r, f]) for f, n in enumerate(STATS_FIELDS)}) for r in range(W)]


def run_worker(rank_dir: str | Path, collective: Collective, window: int = 0,
               dtype: torch.dtype = torch.float32, log=print) -> int:
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
                shard.layers(tensor, collective.last_step)
            elif command == RESET:
                shard.cache.reset()
            elif command == STATS:
                _stats_table(collective, shard.stats())
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


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    time_to_first_token_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)  # decode steps after the first token


class Master:
    def __init__(self, rank_dir: str | Path, collective: Collective, window: int = 0,
                 dtype: torch.dtype = torch.float32):
        if collective.rank != 0:
            raise ValueError(f"the master is rank 0, the collective is rank {collective.rank}")
        self.collective = collective
        try:
            self.shard = Shard(rank_dir, collective, window, dtype)
        except BaseException:
            collective.close()  # the workers learn at once that there is no master
            raise
        self.model, self.config = self.shard.model, self.shard.config
        self.tokenizer = None
        tok_file = self.shard.dir / "tokenizer.json"
        if tok_file.is_file():
            try:
                from tokenizers import Tokenizer
                self.tokenizer = Tokenizer.from_file(str(tok_file))
            except ImportError:
                pass
        self.last = GenerationStats()
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
    def forward(self, tokens: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """tokens (1, T) at positions start.. -> logits (1, T or 1, vocab); extends every rank's cache."""
        if self._closed:
            raise RuntimeError("the master is closed (an earlier request failed or finish() was called)")
        try:
            with torch.inference_mode():
                h = self.model.embed(tokens)  # (1, T, C)
                self.collective.broadcast(STEP, h, step=start)
                h = self.shard.layers(h, start)
                return self.model.head(h if all_logits else h[:, -1:])
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
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yield up to max_new_tokens ids as they are produced; a stop id is yielded, then it ends."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        V = self.config.vocab_size
        if any(not 0 <= t < V for t in prompt):
            raise ValueError(f"prompt ids must be in [0, {V}), got {[t for t in prompt if not 0 <= t < V][:5]}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sampling = sampling or Sampling()
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(sampling.seed if sampling.seed is not None else int(time.time_ns() % 2**63))
        stop = {int(s) for s in stop_ids}
        self.last = stats = GenerationStats(prompt_tokens=len(prompt))
        if max_new_tokens == 0:
            return
        t0 = time.perf_counter()
        self.reset()
        logits = self.forward(torch.tensor([prompt]), 0)
        pos = len(prompt)
        for step in range(max_new_tokens):
            tok = sample(logits[0, -1], sampling, gen)
            now = time.perf_counter()
            if step == 0:
                stats.time_to_first_token_s = now - t0
            else:
                stats.token_latencies_s.append(now - t0)
            stats.token_ids.append(tok)
            yield tok
            if tok in stop or step == max_new_tokens - 1:
                return
            t0 = time.perf_counter()
            logits = self.forward(torch.tensor([[tok]]), pos)
            pos += 1

    # --- the end -------------------------------------------------------------------------------
    def rank_stats(self) -> list[dict]:
        """Stats of every rank (the workers send theirs through the collective)."""
        self.collective.broadcast(STATS)
        return _stats_table(self.collective, self.shard.stats())

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
