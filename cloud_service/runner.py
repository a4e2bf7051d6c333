"""Where a backend call runs: on the event loop when it is cheap, else on the model's threads.

Handing a call to a thread pool and back costs the event loop tens of microseconds, as much
as a small model's whole execution. So a model with one instance whose recent executions
averaged under INLINE_BELOW_S runs inline; a slower one (or one with several instances)
runs on its ThreadPoolExecutor so the loop keeps serving. The average is measured, so a
model that becomes slow (bigger batches) moves back to its threads by itself.
"""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

INLINE_BELOW_S = 200e-6
_EWMA_WEIGHT = 0.1


class Runner:
    def __init__(self, fn, instances: int, name: str):
        self._fn = fn
        self._executor = ThreadPoolExecutor(instances, thread_name_prefix=name)
        self._may_inline = instances == 1
        self._mean_s = float("inf")  # unknown until measured: start on the threads

    async def __call__(self, *args) -> tuple[object, int]:
        """Run fn(*args); returns (result, compute_ns)."""
        start = time.perf_counter_ns()
        if self._may_inline and self._mean_s < INLINE_BELOW_S:
            result = self._fn(*args)
        else:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, self._fn, *args)
        compute_ns = time.perf_counter_ns() - start
        seconds = compute_ns / 1e9
        self._mean_s = seconds if self._mean_s == float("inf") else \
            (1 - _EWMA_WEIGHT) * self._mean_s + _EWMA_WEIGHT * seconds
        return result, compute_ns

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
