"""Continuous batching for streamed generation: the decode steps of every running stream, merged
into one packed forward per step (split.llama.packed).

Each stream runs its own `Generation` on its own thread; its step function calls `step()`, which
queues the step and blocks until the packed forward that carried it has run. The batcher's thread
takes the queued steps when every running stream has queued one (or `gather_s` after the first
arrived, so a slow stream never stalls the others) and runs them as one forward. A stream joins
between two steps (its prefill rides in the next forward beside the others' decode rows) and
leaves after its last token; nobody waits for a stream that left.

Bound: a forward carries at most `max_rows` rows (prompt rows of newcomers + one per decoding
stream). Steps that do not fit wait, first come first served, for the next forward; a single step
larger than the bound (a long prompt) runs alone.
"""
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from split.llama.packed import Segment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """What the packed forward that carried a step held."""
    streams: int       # segments (streams) in that forward
    rows: int          # rows in that forward


class _Job:
    def __init__(self, segment: Segment):
        self.segment = segment
        self.done = threading.Event()
        self.logits: torch.Tensor | None = None
        self.info: StepInfo | None = None
        self.error: BaseException | None = None


class BatcherClosed(RuntimeError):
    pass


class StepBatcher:
    def __init__(self, forward: Callable[[Sequence[Segment]], list[torch.Tensor]], max_rows: int,
                 gather_s: float, name: str = "step-batcher", on_step: Callable[[StepInfo, int], None] | None = None):
        self._forward, self.max_rows, self.gather_s, self._on_step = forward, max_rows, gather_s, on_step
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._running = 0            # streams between join() and leave()
        self._closed = False
        self.steps = 0               # packed forwards run
        self.max_streams_per_step = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- the streams' side ---------------------------------------------------------------------
    def join(self) -> None:
        with self._cond:
            self._running += 1

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def step(self, segment: Segment) -> tuple[torch.Tensor, StepInfo]:
        """Queue one step and wait for its (vocab,) logits."""
        job = _Job(segment)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the model is being unloaded")
            self._pending.append(job)
            self._cond.notify_all()
        job.done.wait()   # set by the batcher thread for every job it takes, and by close() for the rest
        if job.error is not None:
            raise job.error
        return job.logits, job.info

    # --- the batcher's thread ------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._closed)
            if self._closed:
                return None
            deadline = time.monotonic() + self.gather_s   # wait for the running streams' next steps
            while len(self._pending) < self._running and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rows = [], 0
            while self._pending and (not batch or rows + len(self._pending[0].segment.ids) <= self.max_rows):
                job = self._pending.pop(0)
                batch.append(job)
                rows += len(job.segment.ids)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            info = StepInfo(len(batch), sum(len(job.segment.ids) for job in batch))
            start = time.perf_counter_ns()
            try:
                logits = self._forward([job.segment for job in batch])
            except BaseException as err:   # every stream in this forward gets the error
                for job in batch:
                    job.error = err
                    job.done.set()
                continue
            self.steps += 1
            self.max_streams_per_step = max(self.max_streams_per_step, info.streams)
            if self._on_step is not None:
                try:
                    self._on_step(info, time.perf_counter_ns() - start)
                except Exception:   # statistics must never stop the streams
                    log.exception("on_step callback failed")
            for job, out in zip(batch, logits):
                job.logits, job.info = out, info
                job.done.set()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            job.error = BatcherClosed("the model is being unloaded")
            job.done.set()
        self._thread.join(timeout=10)
