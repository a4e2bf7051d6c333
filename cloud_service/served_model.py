"""One loaded model version: its backend, how requests reach it, and its statistics.

Three paths to the backend, chosen by config.toml:
- plain: each request runs through the model's Runner (inline when cheap, else on
  `instance_group.count` threads; see runner.py);
- [dynamic_batching]: concurrent requests are merged by the DynamicBatcher;
- [sequence_batching]: requests of one sequence_id run in order against that session's state.
  A backend with `submit(inputs, state) -> Future` (llm_continuation) batches concurrent
  sessions itself: it checks the request at once and answers it from its next packed forward,
  which it runs on a thread of its own (instance_group.count does not apply).
A decoupled model ([model_transaction_policy] decoupled = true, e.g. backend llm_stream) answers
through `stream()` instead: 0..N responses per request, produced on a thread of the request's own.
"""
import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np

from cloud_service.backends.base import Backend
from cloud_service.batcher import DynamicBatcher
from cloud_service.runner import Runner
from cloud_service.config import ModelConfig
from cloud_service.sessions import SequenceParams, SessionStore
from cloud_service.stats import ModelStats
from edgefold_proto.serving import InvalidArgument


@dataclass
class InferTiming:
    queue_ns: int
    compute_ns: int
    batch_size: int


class ServedModel:
    def __init__(self, name: str, version: str, config: ModelConfig, backend: Backend):
        self.name, self.version, self.config, self.backend = name, version, config, backend
        self.stats = ModelStats()
        self.runner = Runner(backend.infer, config.instance_count, f"{name}-{version}")
        self.batcher: DynamicBatcher | None = None
        self.sessions = (SessionStore(config.sequence_idle_us / 1e6, config.max_state_bytes)
                         if config.stateful else None)
        self._session_locks: dict = {}
        self._submit = getattr(backend, "submit", None) if self.sessions is not None else None

    def start(self) -> None:
        """Create what needs the running event loop (call from within it)."""
        if self.config.decoupled or self._submit:   # the backend's packed forwards are this model's executions
            loop = asyncio.get_running_loop()
            self.backend.on_step = lambda info, ns: loop.call_soon_threadsafe(
                self.stats.execution_done, info.streams, ns)
        if self.config.dynamic_batching:
            self.batcher = DynamicBatcher(self.runner, self.config.max_batch_size,
                                          self.config.max_queue_delay_us, self.config.instance_count,
                                          on_execution=self.stats.execution_done)

    async def close(self) -> None:
        if self.batcher:
            await self.batcher.close()
        self.runner.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self.backend.close)

    async def infer(self, inputs: dict[str, np.ndarray], seq: SequenceParams) -> tuple[dict, InferTiming]:
        if self.sessions is not None:
            return await self._infer_in_session(inputs, seq)
        if self.batcher is not None:
            result = await self.batcher.submit(inputs)
            return result.outputs, InferTiming(result.queue_ns, result.compute_ns, result.batch_size)
        return await self._run(inputs, None)

    async def _run(self, inputs, state) -> tuple[dict, InferTiming]:
        rows = next(iter(inputs.values())).shape[0] if self.config.max_batch_size > 0 and inputs else 1
        outputs, compute_ns = await self.runner(inputs, state)
        self.stats.execution_done(rows, compute_ns)
        return outputs, InferTiming(0, compute_ns, rows)

    async def _run_batched(self, inputs, state) -> tuple[dict, InferTiming]:
        """One session's request through the backend's batcher: a member from when it is queued until
        its answer is back here (the batcher gathers while members are still on their way)."""
        batcher = self.backend.batcher
        batcher.join()
        try:
            t0 = time.perf_counter_ns()
            future = asyncio.wrap_future(self._submit(inputs, state))   # InvalidArgument: before anything runs
            try:
                outputs, info = await asyncio.shield(future)
            except asyncio.CancelledError:   # the forward may be using the session's cache: hold its lock till done
                await asyncio.wait([future])
                raise
            waited = time.perf_counter_ns() - t0
            return outputs, InferTiming(max(waited - info.compute_ns, 0), info.compute_ns, info.streams)
        finally:
            batcher.leave()

    async def _infer_in_session(self, inputs, seq: SequenceParams):
        if seq.sequence_id is None:
            raise InvalidArgument(f"model '{self.name}' is stateful: set the 'sequence_id' parameter "
                                  "(and 'sequence_start' on a sequence's first request)")
        # One request at a time per sequence, in arrival order; the lock lives while anyone holds or awaits it.
        entry = self._session_locks.setdefault(seq.sequence_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                session = self.sessions.begin(seq.sequence_id) if seq.start else self.sessions.get(seq.sequence_id)
                try:
                    result = await (self._run_batched if self._submit else self._run)(inputs, session.state)
                except InvalidArgument:
                    raise  # raised before the backend touched the state: the session stays usable
                except (Exception, asyncio.CancelledError):   # cancelled: the client cannot know what it holds now
                    self.sessions.end(seq.sequence_id)  # half-updated state must not be reused
                    raise
                if seq.end:
                    self.sessions.end(seq.sequence_id)
                else:
                    self.sessions.update(session)
                return result
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._session_locks[seq.sequence_id]

    async def stream(self, inputs: dict[str, np.ndarray], parameters: dict):
        """A decoupled model's responses to one request, as they are produced: (outputs, response
        parameters, last). The request is checked before this returns its first item (INVALID_ARGUMENT);
        leaving the iteration early (the client went away) stops the generation at its next step."""
        token_stream = self.backend.open_stream(inputs, parameters)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        end = object()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:   # the event loop is closed: the server is shutting down
                pass

        def run() -> None:
            try:
                for item in token_stream:
                    put(item)
                put(end)
            except BaseException as err:
                put(err)

        threading.Thread(target=run, name=f"{self.name}-stream", daemon=True).start()
        try:
            while (item := await items.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            token_stream.cancel()
