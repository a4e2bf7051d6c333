"""loadgen: the closed-loop client of scripts/bench_cloud.py, and the raw ONNX Runtime limit it is compared with.

A cell is one continuous run: `warmup_s` unmeasured, then `duration_s` measured. Throughput is the
MEDIAN over WINDOWS equal sub-windows of the measured part (a noisy neighbour on a shared machine
spoils one window, not the cell), each by Little's law (see `summarize`); latency percentiles are
over every request that completed inside the measured part. Around the measured part we read the
server's CPU time and how busy each core was with anything else (`server_core_other_load`,
`client_core_other_load`: processes that are not niced, steal, interrupts; `niced_load` apart), so a
cell that a neighbour disturbed can be recognised and measured again (`quietest`). Also here:
starting a server process pinned to a core, waiting for it to be ready, and always stopping it.
"""
import asyncio
import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil

WINDOWS = 5


def summarize(done_at, latencies, start, duration_s, in_flight: int, items_per_request: int = 1) -> dict:
    """done_at: completion times (s) inside [start, start + duration_s]; latencies in s. A closed loop
    keeps `in_flight` requests outstanding, so throughput = in_flight * items / mean latency (Little's
    law): exact, and, unlike a count of completions, not quantized by batched answers that arrive in
    bursts. Taken per sub-window (requests by completion time); the median is reported."""
    if not done_at:
        return {"requests": 0, "throughput_rps": 0.0, "p50_ms": None, "p99_ms": None}
    done_at, lat = np.asarray(done_at), np.asarray(latencies)
    window = np.minimum(((done_at - start) / duration_s * WINDOWS).astype(int), WINDOWS - 1)
    rates = [in_flight * items_per_request / lat[window == w].mean() for w in range(WINDOWS) if (window == w).any()]
    return {"requests": len(done_at), "throughput_rps": round(float(np.median(rates)), 1),
            "p50_ms": round(float(np.percentile(lat * 1e3, 50)), 3),
            "p99_ms": round(float(np.percentile(lat * 1e3, 99)), 3)}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children."""
    total, proc = 0.0, psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def core_busy_s(core: int) -> tuple[float, float]:
    """(seconds `core` ran normal-priority work, interrupts, or was stolen by the hypervisor; seconds it
    ran niced work). Niced work mostly yields the core to the benchmark, so it is counted apart."""
    t = psutil.cpu_times(percpu=True)[core]
    return t.user + t.system + t.irq + t.softirq + t.steal - getattr(t, "guest", 0), t.nice


def neighbour_load(before: list, after: list, own_cpu_s: list, duration_s: float) -> dict:
    """What else ran on (server core, client core) between two `core_busy_s` readings of each."""
    (b0, n0), (b1, n1) = zip(*before), zip(*after)
    other = [max(0.0, (y - x) - own) / duration_s for x, y, own in zip(b0, b1, own_cpu_s)]
    return {"server_core_other_load": round(other[0], 3), "client_core_other_load": round(other[1], 3),
            "niced_load": round(max(y - x for x, y in zip(n0, n1)) / duration_s, 3)}


async def wait_quiet(cores, limit: float, max_wait_s: float) -> bool:
    """Wait (`max_wait_s` at most) for a 0.5 s stretch in which no core of `cores` was busier than `limit`
    (our servers sit idle meanwhile); False if none came."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = [sum(core_busy_s(c)) for c in cores]  # niced work included: it slows us too
        await asyncio.sleep(0.5)
        if all((sum(core_busy_s(c)) - b) / 0.5 <= limit for c, b in zip(cores, before)):
            return True
        if time.monotonic() > deadline:
            return False


async def quietest(measure, cores, limit: float, attempts: int, wait_s: float) -> dict:
    """`await measure()` once `cores` are quiet, again (`attempts` at most) while a neighbour took more
    than `limit` of a core during it; keeps the quietest attempt. A machine that stays busy for
    `wait_s` gets one attempt."""
    def disturbed(r):
        return max(r["server_core_other_load"], r["client_core_other_load"], r["niced_load"])
    best = None
    for attempt in range(1, attempts + 1):
        quiet = await wait_quiet(cores, limit, wait_s)
        r = await measure()
        if best is None or disturbed(r) < disturbed(best):
            best = r
        if disturbed(r) <= limit or not quiet:
            break
    return {**best, "attempts": attempt}


async def closed_loop(infer, concurrency: int, duration_s: float, warmup_s: float, snapshot=None) -> dict:
    """`concurrency` tasks, each sending its next request (`await infer()`) as soon as the last one
    answered. `await snapshot()` runs when measuring starts and when it ends (what must be exact
    should be read before its first await); the result has both as 'before' and 'after', plus
    this process's CPU seconds over the measured part as 'client_cpu_s'."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup_s  # loop.time() is monotonic
    until = start + duration_s
    done_at, latencies, marks, pending = [], [], {}, []

    async def mark(key):
        cpu = time.process_time()
        marks[key] = (await snapshot() if snapshot else None), cpu

    loop.call_at(start, lambda: pending.append(asyncio.ensure_future(mark("before"))))
    loop.call_at(until, lambda: pending.append(asyncio.ensure_future(mark("after"))))

    async def worker():
        while (t0 := loop.time()) < until:
            await infer()
            t1 = loop.time()
            if start <= t1 <= until:  # finished inside the measured part
                done_at.append(t1)
                latencies.append(t1 - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    while len(pending) < 2:  # the last answer can come before `until`'s mark has run
        await asyncio.sleep(max(0.0, until - loop.time()) + 1e-3)
    await asyncio.gather(*pending)
    result = summarize(done_at, latencies, start, duration_s, concurrency)
    result["before"], result["after"] = marks["before"][0], marks["after"][0]
    result["client_cpu_s"] = marks["after"][1] - marks["before"][1]
    return result


async def measure_server_cell(client, model: str, inputs, concurrency: int, pid: int, cores: tuple[int, int],
                              warmup_s: float, duration_s: float, batch_stats: bool, timeout_s: float) -> dict:
    """One cell against a server process `pid`; cores = (the server's core, this client's core)."""
    async def infer():
        await client.infer(model, inputs, client_timeout=timeout_s)

    async def snapshot():
        cpu, busy = process_cpu_s(pid), [core_busy_s(c) for c in cores]  # read at once, before any await
        counts = None
        if batch_stats:  # executions per batch size, from ModelStatistics' batch_stats
            stats = await client.get_inference_statistics(model, client_timeout=timeout_s)
            counts = {b.batch_size: b.compute_infer.count for s in stats.model_stats for b in s.batch_stats}
        return cpu, busy, counts

    r = await closed_loop(infer, concurrency, duration_s, warmup_s, snapshot)
    (cpu0, busy0, counts0), (cpu1, busy1, counts1) = r.pop("before"), r.pop("after")
    n = max(1, r["requests"])
    r["server_cpu_us_per_req"] = round((cpu1 - cpu0) / n * 1e6, 1)
    r["client_cpu_us_per_req"] = round(r["client_cpu_s"] / n * 1e6, 1)
    r["client_core_busy"] = round(r["client_cpu_s"] / duration_s, 2)  # near 1: the client may be the limit
    r.update(neighbour_load(busy0, busy1, [cpu1 - cpu0, r.pop("client_cpu_s")], duration_s))
    if batch_stats:
        runs = {b: k - counts0.get(b, 0) for b, k in counts1.items() if k > counts0.get(b, 0)}
        r["mean_batch"] = round(sum(b * k for b, k in runs.items()) / max(1, sum(runs.values())), 2)
        r["max_batch"] = max(runs, default=0)
    return r


def ort_limit(session, feeds: dict, batch: int, duration_s: float, warmup_s: float, cores: tuple[int, int]) -> dict:
    """`session.run` back to back in this thread, which runs on cores[0] (the other core is watched for
    neighbours too); throughput counts images."""
    now = time.perf_counter
    start = now() + warmup_s
    until = start + duration_s
    while now() < start:
        session.run(None, feeds)
    done_at, latencies, cpu0, busy0 = [], [], time.thread_time(), [core_busy_s(c) for c in cores]
    while (t0 := now()) < until:
        session.run(None, feeds)
        t1 = now()
        if t1 <= until:
            done_at.append(t1)
            latencies.append(t1 - t0)
    cpu, busy1 = time.thread_time() - cpu0, [core_busy_s(c) for c in cores]
    r = summarize(done_at, latencies, start, duration_s, in_flight=1, items_per_request=batch)
    r["server_cpu_us_per_req"] = round(cpu / max(1, r["requests"] * batch) * 1e6, 1)
    return r | neighbour_load(busy0, busy1, [cpu, 0.0], duration_s)


# --- server processes ------------------------------------------------------------------------
def machine() -> str:
    """The CPU model, its core count and its AMX flags (which int8/bf16 kernels it has), for JSON rows."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    amx = " ".join(f for f in info.get("flags", "").split() if f.startswith("amx"))
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}), "
            f"{os.cpu_count()} cores, flags {amx or 'no amx'}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: list, core: int, log_path: Path, env: dict | None, cwd: Path):
    """Run `cmd` pinned to `core`, output to `log_path`; always stopped (SIGTERM, then SIGKILL) on exit."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen(["taskset", "-c", str(core), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)
        try:
            yield proc
        finally:
            children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()


def tail(path: Path, chars: int = 600) -> str:
    return path.read_text(errors="replace")[-chars:]


async def wait_ready(client, proc, names: list[str], log_path: Path, timeout_s: float) -> None:
    """Until every model in `names` is ready (tritonclient `client`); raises if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}: {tail(log_path)}")
        with contextlib.suppress(Exception):  # not listening yet
            if all([await client.is_model_ready(n, client_timeout=2) for n in names]):
                return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"server not ready within {timeout_s} s: {tail(log_path)}")
