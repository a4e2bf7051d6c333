"""Dynamic batching: merge concurrent requests to one model into one backend run.

Requests queue up; a worker takes the first, then keeps taking requests with the same
non-batch shapes until `max_batch_size` rows or `max_queue_delay` has passed, runs them
as one batch through the model's Runner and splits the outputs back per request. While a
batch runs, the next one forms, so under load batches grow without any delay at all.
"""
import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple                      # inputs that can share a batch have equal keys
    future: asyncio.Future
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]
    queue_ns: int
    compute_ns: int
    batch_size: int


def _key(inputs: dict[str, np.ndarray]) -> tuple:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


class DynamicBatcher:
    def __init__(self, run, max_batch_size: int, max_queue_delay_us: int, workers: int = 1, on_execution=None):
        self._run = run  # async: run(inputs) -> (outputs, compute_ns)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_queue_delay_us / 1e6
        self._on_execution = on_execution  # callback(batch_size, compute_ns, n_requests)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._carry: deque = deque()  # taken from the queue but did not fit the last batch
        self._workers = [asyncio.create_task(self._work()) for _ in range(workers)]

    async def submit(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        rows = next(iter(inputs.values())).shape[0]
        pending = _Pending(inputs, rows, _key(inputs), asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for pending in [*self._carry, *self._drain()]:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("model was unloaded"))

    def _drain(self):
        while not self._queue.empty():
            yield self._queue.get_nowait()

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _form_batch(self) -> list[_Pending]:
        first = await self._next(None)
        batch, rows, skipped = [first], first.rows, []
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_batch_size:
            item = await self._next(deadline - time.perf_counter())
            if item is None:
                break
            if item.key == first.key and rows + item.rows <= self.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                skipped.append(item)
                if len(skipped) > self.max_batch_size:
                    break
        self._carry.extendleft(reversed(skipped))
        return [p for p in batch if not p.future.cancelled()]

    async def _work(self) -> None:
        while True:
            batch = await self._form_batch()
            if not batch:
                continue
            start = time.perf_counter_ns()
            merged = {name: (np.concatenate([p.inputs[name] for p in batch]) if len(batch) > 1 else batch[0].inputs[name])
                      for name in batch[0].inputs}
            rows = sum(p.rows for p in batch)
            try:
                outputs, compute_ns = await self._run(merged)
            except Exception as err:  # the backend failed: every request in the batch learns why
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            if self._on_execution:
                self._on_execution(rows, compute_ns, len(batch))
            offset = 0
            for p in batch:
                part = {name: value[offset:offset + p.rows] for name, value in outputs.items()}
                offset += p.rows
                if not p.future.done():
                    p.future.set_result(BatchResult(part, start - p.enqueued_ns, compute_ns, rows))
