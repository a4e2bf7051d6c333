"""Allreduce latency of a hidden-size vector: star (ZeroMQ) vs gloo, on loopback and through linkemu.

    .venv/bin/python scripts/bench_tp_allreduce.py                       # the full table
    .venv/bin/python scripts/bench_tp_allreduce.py --world-sizes 2,4 --delays-ms 0,5 --hidden 4096 --iters 100

Prints one JSON object per row. Rank 0 runs in this process, ranks 1..N-1 as subprocesses of this
script (`--worker`), all on 127.0.0.1. Each configuration times `iters` back-to-back allreduces of a
(1, 1, hidden) fp32 tensor on rank 0 (after `warmup` untimed ones) and reports the median and p90.
Back to back, one allreduce costs what a decode step pays for it: the master's call returns one
round trip after the previous one (workers answer the sum with their next partial at once).

Links: delay 0 = straight on loopback (star: through the master's unix socket, as ranks on one
host talk; `transport` in the row says which). delay D > 0 = every worker reaches the master through its own
`scripts/linkemu.py --delay-ms D` (D one way, each direction), so the star's floor is 2 D per
allreduce. gloo is measured on loopback only: its rendezvous store is at the master's port + 1,
but the ring's data flows over peer-to-peer connections on ports gloo picks itself, which a
proxy in front of the master cannot sit on. Its delay rows carry the ring's floor instead
(2 (N-1) sequential link hops: 2 (N-1) D), marked as a model, not a measurement.

Summary rows: star/gloo at world 4 on loopback (target <= 1/3) and star/(2 x delay) at 5 ms
(target <= 1.3). `run(...)` returns the rows as dicts (scripts/bench_tp.py imports it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import zmq

from edge_runtime.tp.collective import SHUTDOWN, STEP
from edge_runtime.tp.config import TPConfig
from edge_runtime.tp.connect import make_collective
from edge_runtime.tp.fastpath import worker_endpoint
from edge_runtime.tp.launch import free_port  # a free port pair: gloo uses port + 1

ROOT = Path(__file__).resolve().parents[1]

LINKEMU = ROOT / "scripts" / "linkemu.py"


def _linkemu(target_port: int, delay_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(LINKEMU), "--listen", "127.0.0.1:0", "--target",
                             f"127.0.0.1:{target_port}", "--delay-ms", str(delay_ms)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # (stderr is dropped: it logs a refused connection for each ZeroMQ retry before the master binds)
    line = proc.stdout.readline()
    match = re.match(r"linkemu listening on 127\.0\.0\.1:(\d+) ", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"linkemu did not start: {line!r}")
    return proc, int(match.group(1))


def _echo_rtt(delay_ms: float, nbytes: int, iters: int) -> dict:
    """Baseline: plain TCP ping-pong of nbytes through one linkemu (echo server on a thread here)."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo():
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    emu, port = _linkemu(server.getsockname()[1], delay_ms)
    times, payload = [], b"x" * nbytes
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(iters):
                t0 = time.perf_counter()
                client.sendall(payload)
                got = 0
                while got < nbytes:
                    got += len(client.recv(1 << 20))
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        emu.terminate()
        emu.wait(timeout=10)
        server.close()
    times = times[len(times) // 10:]
    return {"bench": "tp_allreduce_link_rtt", "link": "linkemu", "delay_ms": delay_ms, "bytes": nbytes,
            "iters": len(times), "median_ms": round(statistics.median(times), 4),
            "p90_ms": round(_percentile(times, 0.9), 4), "floor_ms": 2 * delay_ms,
            "note": "plain TCP echo through one linkemu: what the emulated link itself costs per round trip"}


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _session(backend: str, world: int, delay_ms: float, hidden, iters: int, warmup: int, payload: str) -> list[dict]:
    """One master + world-1 workers (+ one linkemu per worker); every hidden size in turn."""
    port, procs, workers, rows = free_port(), [], [], []
    try:
        for rank in range(1, world):
            worker_port = port
            if delay_ms > 0:
                emu, worker_port = _linkemu(port, delay_ms)
                procs.append(emu)
            workers.append(subprocess.Popen([sys.executable, __file__, "--worker", "--backend", backend,
                                             "--rank", str(rank), "--world", str(world), "--payload", payload,
                                             "--master", f"127.0.0.1:{worker_port}"]))
        config = TPConfig(world, f"127.0.0.1:{port}", backend, payload, join_timeout_s=120.0)
        with make_collective(config, 0) as comm:
            # what a worker dialing 127.0.0.1:port uses (those behind linkemu dial its port: TCP)
            transport = "tcp" if backend != "star" or delay_ms > 0 else worker_endpoint("127.0.0.1", port, 0)[:3]
            for h in hidden:
                comm.broadcast(STEP, torch.tensor([h, warmup + iters]))
                x, times = torch.randn(1, 1, h), []
                for i in range(warmup + iters):
                    t0 = time.perf_counter()
                    comm.allreduce(x, i, i % 2)
                    times.append((time.perf_counter() - t0) * 1000)
                times = times[warmup:]
                rows.append({"bench": "tp_allreduce", "backend": backend, "world": world,
                             "link": "loopback" if delay_ms == 0 else "linkemu", "transport": transport, "delay_ms": delay_ms,
                             "hidden": h, "payload": payload, "bytes": h * 4, "iters": iters,
                             "median_ms": round(statistics.median(times), 4), "p90_ms": round(_percentile(times, 0.9), 4),
                             "mean_ms": round(statistics.fmean(times), 4), "floor_ms": 2 * delay_ms})
            comm.broadcast(SHUTDOWN)
        for p in workers:
            p.wait(timeout=30)
    finally:
        for p in workers + procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
    return rows


def run(world_sizes=(2, 3, 4), delays_ms=(0, 1, 5, 10), hidden=(4096, 512, 1024), iters: int = 200,
        warmup: int = 20, payload: str = "fp32", emit=None) -> list[dict]:
    """All rows (measurements, then summary ratios). `emit(row)` is called as each row is ready."""
    emit = emit or (lambda row: None)
    rows = [{"bench": "tp_allreduce_machine", "cpus": os.cpu_count(), "machine": platform.machine(),
             "python": platform.python_version(), "torch": torch.__version__, "libzmq": zmq.zmq_version(),
             "note": "all ranks are processes on this one machine, 127.0.0.1"}]
    emit(rows[0])
    for delay in (d for d in delays_ms if d > 0):
        for h in hidden:
            row = _echo_rtt(float(delay), 4 * h, max(20, iters // 2))
            rows.append(row), emit(row)
    for world in world_sizes:
        for delay in delays_ms:
            for row in _session("star", world, float(delay), hidden, iters, warmup, payload):
                rows.append(row), emit(row)
        for row in _session("gloo", world, 0.0, hidden, iters, warmup, "fp32"):
            rows.append(row), emit(row)
        for delay in (d for d in delays_ms if d > 0):
            for h in hidden:
                row = {"bench": "tp_allreduce", "backend": "gloo", "world": world, "link": "linkemu",
                       "delay_ms": float(delay), "hidden": h, "measured": False, "ring_floor_ms": 2 * (world - 1) * delay,
                       "note": "not measured: gloo's peer-to-peer ring connections cannot be routed through "
                               "linkemu; ring floor = 2 (N-1) one-way delays"}
                rows.append(row), emit(row)
    for row in _summaries(rows):
        rows.append(row), emit(row)
    return rows


def _summaries(rows) -> list[dict]:
    def median(backend, world, delay, h):
        for r in rows:
            if (r.get("backend"), r.get("world"), r.get("delay_ms"), r.get("hidden")) == (backend, world, delay, h) \
                    and "median_ms" in r:
                return r["median_ms"]
        return None

    out = []
    worlds = sorted({r["world"] for r in rows if "world" in r})
    for h in sorted({r["hidden"] for r in rows if "hidden" in r}):
        star, gloo = median("star", 4, 0, h), median("gloo", 4, 0, h)
        if star and gloo:
            out.append({"bench": "tp_allreduce_ratio", "metric": "star/gloo, world 4, loopback", "hidden": h,
                        "star_median_ms": star, "gloo_median_ms": gloo, "ratio": round(star / gloo, 3),
                        "target": "<= 0.333", "met": star / gloo <= 1 / 3})
        for world in worlds:
            star5 = median("star", world, 5, h)
            if star5:
                echo = next((r["median_ms"] for r in rows if r["bench"] == "tp_allreduce_link_rtt"
                             and r["delay_ms"] == 5 and r["bytes"] == 4 * h), None)
                out.append({"bench": "tp_allreduce_ratio", "metric": "star/(2 x one-way delay), 5 ms", "world": world,
                            "hidden": h, "star_median_ms": star5, "floor_ms": 10.0, "ratio": round(star5 / 10.0, 3),
                            "target": "<= 1.3", "met": star5 / 10.0 <= 1.3, "link_echo_rtt_ms": echo,
                            "star_over_echo": None if not echo else round(star5 / echo, 3)})
    return out


def _worker(args) -> int:
    torch.set_num_threads(1)
    config = TPConfig(args.world, args.master, args.backend, args.payload, join_timeout_s=120.0)
    with make_collective(config, args.rank) as comm:
        while True:
            cmd, spec = comm.broadcast(0)
            if cmd == SHUTDOWN:
                return 0
            h, n = spec.tolist()
            x = torch.randn(1, 1, h)
            for i in range(n):
                comm.allreduce(x, i, i % 2)


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=_ints, default=(2, 3, 4))
    parser.add_argument("--delays-ms", type=lambda t: tuple(float(v) for v in t.split(",")), default=(0, 1, 5, 10))
    parser.add_argument("--hidden", type=_ints, default=(4096, 512, 1024), help="vector sizes (46M model: 512, 200M: 1024)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--payload", default="fp32", choices=("fp32", "fp16", "int8"), help="star payload")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="star", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    run(args.world_sizes, args.delays_ms, args.hidden, args.iters, args.warmup, args.payload,
        emit=lambda row: print(json.dumps(row), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
