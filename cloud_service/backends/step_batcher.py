"""Continuous batching: the pending steps of every running stream or session, merged into one packed
forward (split.llama.packed).

Two kinds of callers share it. A stream (llm_stream) runs its own `Generation` on its own thread;
its step function calls `step()`, which queues the step and blocks until the packed forward that
carried it has run. A session's request (llm_continuation) is queued with `submit()`, which
returns at once a Future for its result, so one event loop can have hundreds in flight.

The batcher's thread takes the queued items when every running member has queued one (or
`gather_s` after the first arrived, so a slow member never stalls the others) and runs them as one
forward. Members are counted by join() / leave(): a stream joins for its whole life (it comes back
with its next step within a forward or two), a session's request from when it is queued until its
answer is back on the event loop. So with nobody else waiting or running an item runs at once, and
items that arrive while a forward runs ride together in the next one. A stream joins between two
steps (its prefill rides in the next forward beside the others' decode rows) and leaves after its
last token; nobody waits for a member that left.

Bound: a forward carries at most `max_rows` rows (an item's `rows`: prompt rows of a newcomer, one
per decoding stream, a session's new positions). Items that do not fit wait, first come first
served, for the next forward; a single item larger than the bound runs alone (so max_rows = 1 runs
every item alone: unbatched).
"""
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """What the packed forward that carried an item held."""
    streams: int       # segments (streams' steps or sessions' requests) in that forward
    rows: int          # rows in that forward
    compute_ns: int = 0   # how long it ran


class _Job:
    def __init__(self, item):
        self.item = item               # anything with `rows` (e.g. a split.llama.packed.Segment)
        self.future: Future = Future()   # (the forward's result for the item, StepInfo)


class BatcherClosed(RuntimeError):
    pass


class StepBatcher:
    def __init__(self, forward: Callable[[Sequence], list], max_rows: int, gather_s: float,
                 name: str = "step-batcher", on_step: Callable[[StepInfo, int], None] | None = None):
        """forward(items) -> one result per item, in order (an exception instance fails that item
        alone); on_step(info, compute_ns) after each forward."""
        self._forward, self.max_rows, self.gather_s, self._on_step = forward, max_rows, gather_s, on_step
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._running = 0            # members between join() and leave()
        self._closed = False
        self.steps = 0               # packed forwards run
        self.max_streams_per_step = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- the callers' side ---------------------------------------------------------------------
    def join(self) -> None:
        with self._cond:
            self._running += 1

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def submit(self, item) -> Future:
        """Queue one item; the Future gives (its result, StepInfo) once its forward has run."""
        job = _Job(item)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the model is being unloaded")
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def step(self, item):
        """Queue one item and wait for (its result, StepInfo), e.g. a step's (vocab,) logits."""
        return self.submit(item).result()   # resolved by the batcher thread, or by close()

    # --- the batcher's thread ------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._closed)
            if self._closed:
                return None
            deadline = time.monotonic() + self.gather_s   # wait for the running members' next items
            while len(self._pending) < self._running and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rows = [], 0
            while self._pending and (not batch or rows + self._pending[0].item.rows <= self.max_rows):
                job = self._pending.pop(0)
                batch.append(job)
                rows += job.item.rows
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            start = time.perf_counter_ns()
            try:
                results = self._forward([job.item for job in batch])
            except BaseException as err:   # every item in this forward gets the error
                for job in batch:
                    _resolve(job.future, err, None)
                continue
            ns = time.perf_counter_ns() - start
            info = StepInfo(len(batch), sum(job.item.rows for job in batch), ns)
            self.steps += 1
            self.max_streams_per_step = max(self.max_streams_per_step, info.streams)
            if self._on_step is not None:
                try:
                    self._on_step(info, ns)
                except Exception:   # statistics must never stop the forwards
                    log.exception("on_step callback failed")
            for job, out in zip(batch, results):
                _resolve(job.future, out, info)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            _resolve(job.future, BatcherClosed("the model is being unloaded"), None)
        self._thread.join(timeout=10)


def _resolve(future: Future, out, info: StepInfo | None) -> None:
    try:
        if isinstance(out, BaseException):
            future.set_exception(out)
        else:
            future.set_result((out, info))
    except InvalidStateError:   # the caller cancelled it (its client went away)
        pass
