"""The tensor-parallel fast paths (edge_runtime/tp/fastpath.py): the unix socket between ranks on
one host, and the busy-poll that stops while the thread waits for a CPU.

    .venv/bin/python -m pytest -q tests/test_tp_fastpath.py
"""
import socket
import sys
import threading
import time

import pytest

from edge_runtime.tp import fastpath
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
