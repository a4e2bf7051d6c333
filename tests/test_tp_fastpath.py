"""The tensor-parallel fast paths (edge_runtime/tp/fastpath.py): the unix socket between ranks on
one host, and the busy-poll that stops while the thread waits for a CPU.

    .venv/bin/python -m pytest -q tests/test_tp_fastpath.py
"""
import socket
import sys
import threading
import time

import pytest

from edge_runtime.tp import fastpath, shm
from edge_runtime.tp.config import TPConfig
from edge_runtime.tp.launch import free_port
from edge_runtime.tp.star_master import StarMaster
from edge_runtime.tp.star_worker import StarWorker


def _config(world: int, port: int) -> TPConfig:
    return TPConfig(world, f"127.0.0.1:{port}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract unix sockets are Linux-only")
def test_a_loopback_port_that_is_not_a_local_master_stays_on_tcp():
    port = free_port()
    tcp = f"tcp://127.0.0.1:{port}"
    t0 = time.monotonic()
    assert fastpath.worker_endpoint("127.0.0.1", port, time.monotonic() + 0.3) == tcp  # nothing listens: looks until then
    assert 0.3 <= time.monotonic() - t0 < 2.0
    with socket.create_server(("127.0.0.1", port)):  # a port forward or a tunnel: TCP, at once
        t0 = time.monotonic()
        assert fastpath.worker_endpoint("127.0.0.1", port, time.monotonic() + 10.0) == tcp
        assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()  # not loopback: never looked up
    assert fastpath.worker_endpoint("10.1.2.3", port, time.monotonic() + 10.0) == f"tcp://10.1.2.3:{port}"
    assert time.monotonic() - t0 < 1.0
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("master", StarMaster(_config(2, port))))
    thread.start()
    with StarWorker(_config(2, port), 1) as worker:  # started first: it waits for the master's socket
        thread.join(10)
        assert worker.transport == "ipc"
        assert fastpath.worker_endpoint("127.0.0.1", port, 0) == f"ipc://@edgefold-tp-127.0.0.1:{port}"
        result["master"].close()


def test_spinning_stops_while_the_thread_waits_for_a_cpu(monkeypatch):
    if sys.platform.startswith("linux"):
        assert isinstance(fastpath.Spin()._runqueue_ns(), int)  # /proc/thread-self/schedstat is readable
    spin = fastpath.Spin()
    now, waited = [100.0], [0]
    monkeypatch.setattr(fastpath, "time", type("Clock", (), {"monotonic": lambda: now[0], "perf_counter": time.perf_counter}))
    monkeypatch.setattr(spin, "_runqueue_ns", lambda: waited[0])
    assert not spin._allowed()  # no measurement yet
    now[0] += 0.02
    waited[0] += 1_000_000  # 5% of the window spent waiting for a CPU
    assert spin._allowed()
    now[0] += 0.005
    waited[0] += 4_000_000
    assert spin._allowed()  # decided once per window
    now[0] += 0.02
    waited[0] += 6_000_000  # 10 of the last 25 ms
    assert not spin._allowed()
    monkeypatch.setattr(spin, "_runqueue_ns", lambda: None)
    now[0] += 0.02
    assert not spin._allowed()  # unknown: never spins


@pytest.mark.skipif(not shm.available(), reason="shared-memory allreduce: x86-64 Linux with /dev/shm only")
def test_ranks_on_one_host_allreduce_through_shared_memory_and_leave_nothing_behind():
    """Local ranks with fp32 payloads take shm.py's mailboxes (the same sums as over ZeroMQ); fp16
    payloads and prompts too long for a mailbox stay on the socket; /dev/shm is clean afterwards."""
    import os

    import torch

    before = set(os.listdir(shm.SHM_DIR))
    port = free_port()
    partials = [torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    long = [torch.randn(1, 1200, 256, generator=torch.Generator().manual_seed(10 + r)) for r in (0, 1)]  # 1.2 MB
    got = {}

    def worker():
        with StarWorker(_config(2, port), 1) as w:
            got["worker_link"] = w._link is not None
            got["worker"] = [w.allreduce(partials[1], 0, 0), w.allreduce(long[1], 0, 1)]
            w.broadcast(0)   # the master's last command: then both close

    thread = threading.Thread(target=worker)
    thread.start()
    with StarMaster(_config(2, port)) as m:
        got["master_links"] = sorted(m._shm)
        sums = [m.allreduce(partials[0], 0, 0), m.allreduce(long[0], 0, 1)]
        m.broadcast(1)
    thread.join(30)
    assert got["master_links"] == [1] and got["worker_link"]
    for mine, theirs, (a, b) in zip(sums, got["worker"], (partials, long)):
        assert torch.equal(mine, a + b) and torch.equal(theirs, a + b)
    assert set(os.listdir(shm.SHM_DIR)) <= before
