"""scripts/linkemu.py started for real as a subprocess, with real servers on 127.0.0.1.

Measures RTT (delay), throughput (rate cap), jitter spread, the loss penalty, ordering and
integrity of the bytes, half-close, and clean stops.
"""
import asyncio
import importlib.util
import random
import re
import select
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server_process import free_port

LINKEMU = Path(__file__).resolve().parents[1] / "scripts" / "linkemu.py"
LISTENING = re.compile(r"^linkemu listening on 127\.0\.0\.1:(\d+) -> ")


# ---------------------------------------------------------------- servers on loopback

class _Echo(socketserver.BaseRequestHandler):
    """Echo every byte; on EOF record it, say b"bye" (data after the peer's FIN) and close."""

    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(10)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
            self.server.eof.set()
            self.request.sendall(b"bye")
        except OSError:
            pass


class _Sink(socketserver.BaseRequestHandler):
    """Count received bytes with arrival times of the first and last; report the count at EOF."""

    def handle(self):
        self.request.settimeout(10)
        total, first_len, t_first, t_last = 0, 0, None, None
        while data := self.request.recv(65536):
            now = time.perf_counter()
            if t_first is None:
                t_first, first_len = now, len(data)
            total, t_last = total + len(data), now
        self.server.result = (total, first_len, t_first, t_last)
        self.request.sendall(str(total).encode())


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler, port=0):
        super().__init__(("127.0.0.1", port), handler)
        self.eof, self.result = threading.Event(), None
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def servers():
    started = []

    def start(handler=_Echo, port=0):
        started.append(_Server(handler, port))
        return started[-1]

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


# ---------------------------------------------------------------- linkemu as a subprocess

@pytest.fixture
def linkemu(tmp_path):
    procs = []

    def start(target_port: int, *args: str) -> int:
        """Start linkemu on a free port in front of target_port; return its listening port."""
        cmd = [sys.executable, str(LINKEMU), "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{target_port}", *args]
        err = open(tmp_path / f"linkemu{len(procs)}.err", "w+")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        procs.append((proc, err))
        deadline = time.monotonic() + 10
        while (left := deadline - time.monotonic()) > 0:
            if select.select([proc.stdout], [], [], left)[0]:
                line = proc.stdout.readline()
                if m := LISTENING.match(line):
                    return int(m.group(1))
                if not line:
                    break  # exited
        err.seek(0)
        pytest.fail(f"linkemu did not start: rc={proc.poll()} stderr={err.read()!r}")

    start.procs = procs
    yield start
    for proc, err in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        proc.stdout.close()
        err.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def ping_ms(port: int, count: int, size: int = 64) -> list[float]:
    """Round trips (ms) of `count` small messages on one connection; the first warms up, not counted."""
    rtts = []
    with connect(port) as sock:
        for i in range(count + 1):
            msg = bytes([i % 256]) * size
            t0 = time.perf_counter()
            sock.sendall(msg)
            assert recv_exactly(sock, size) == msg
            rtts.append((time.perf_counter() - t0) * 1000)
    return rtts[1:]


def echo_through(port: int, payload: bytes) -> bytes:
    """Send payload (from a thread) and half-close; return everything echoed back until EOF."""
    with connect(port) as sock:
        def send():
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        buf = bytearray()
        while chunk := sock.recv(65536):
            buf += chunk
        sender.join(timeout=10)
        return bytes(buf)


def iqr(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


# ---------------------------------------------------------------- tests

def test_rtt_is_twice_the_one_way_delay(servers, linkemu):
    port = linkemu(servers().port, "--delay-ms", "30")
    rtts = ping_ms(port, 20)
    median = statistics.median(rtts)
    print(f"RTT through --delay-ms 30: median {median:.1f} ms, min {min(rtts):.1f}, max {max(rtts):.1f}")
    assert 0.8 * 60 <= median <= 1.2 * 60


def test_bulk_throughput_converges_to_rate(servers, linkemu):
    sink = servers(_Sink)
    port = linkemu(sink.port, "--delay-ms", "1", "--rate-mbit", "20")
    payload = b"x" * 2_500_000
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(64) == str(len(payload)).encode()
    total, first_len, t_first, t_last = sink.result
    mbit = (total - first_len) * 8 / (t_last - t_first) / 1e6
    print(f"throughput through --rate-mbit 20: {mbit:.2f} Mbit/s over {t_last - t_first:.2f} s")
    assert total == len(payload)
    assert 0.8 * 20 <= mbit <= 1.2 * 20


def test_jitter_widens_rtt_spread_but_keeps_bytes_in_order(servers, linkemu):
    echo = servers()
    plain = ping_ms(linkemu(echo.port, "--delay-ms", "10"), 30)
    port = linkemu(echo.port, "--delay-ms", "10", "--jitter-ms", "8", "--seed", "1")
    jittery = ping_ms(port, 30)
    print(f"RTT IQR: plain {iqr(plain):.1f} ms, with 8 ms jitter {iqr(jittery):.1f} ms")
    # Two uniform [-8, 8] ms draws per round trip: IQR about 9.4 ms, range 4..36 ms.
    assert iqr(jittery) >= max(4.0, 3 * iqr(plain))
    assert min(jittery) >= 2 * (10 - 8) * 0.9
    payload = random.Random(0).randbytes(300_000)
    assert echo_through(port, payload) == payload + b"bye"


def test_loss_delays_by_an_rto_but_delivers_everything_in_order(servers, linkemu):
    echo = servers()
    port = linkemu(echo.port, "--delay-ms", "5", "--loss", "0.2", "--seed", "3")
    rtts = ping_ms(port, 20)
    print(f"RTT with --loss 0.2: median {statistics.median(rtts):.1f} ms, max {max(rtts):.1f} ms")
    # P(no segment lost in 20 round trips) = 0.8**40, about 1e-4; a loss costs RTO = 200 ms.
    assert max(rtts) >= 200 + 10 * 0.8
    assert min(rtts) < 200
    payload = random.Random(1).randbytes(200_000)
    assert echo_through(port, payload) == payload + b"bye"


def test_half_close_reaches_the_server_and_its_reply_comes_back(servers, linkemu):
    echo = servers()
    with connect(linkemu(echo.port, "--delay-ms", "5")) as sock:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert echo.eof.wait(timeout=5), "server never saw the client's EOF"
        got = b""
        while chunk := sock.recv(64):
            got += chunk
        assert got == b"hellobye"  # the server still spoke after our FIN, then its FIN came through


def test_server_closing_closes_the_client(servers, linkemu):
    class _Closer(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"no")

    with connect(linkemu(servers(_Closer).port, "--delay-ms", "5")) as sock:
        assert recv_exactly(sock, 2) == b"no"
        assert sock.recv(64) == b""


def test_unreachable_target_closes_client_promptly_and_proxy_keeps_serving(servers, linkemu):
    target = free_port()  # nothing listens here yet
    port = linkemu(target, "--delay-ms", "5")
    for _ in range(2):
        t0 = time.monotonic()
        with connect(port) as sock:
            try:
                assert sock.recv(64) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 2
    servers(port=target)  # the target comes up: the same proxy now forwards
    assert len(ping_ms(port, 2)) == 2


def test_sigterm_stops_it_cleanly_with_a_connection_open(servers, linkemu):
    port = linkemu(servers().port, "--delay-ms", "5")
    proc, err = linkemu.procs[-1]
    with connect(port) as sock:
        ping_ms(port, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        try:
            assert sock.recv(64) == b""
        except ConnectionResetError:
            pass
    err.seek(0)
    assert "Traceback" not in err.read()


@pytest.mark.parametrize("args, message", [
    (["--listen", "127.0.0.1", "--target", "127.0.0.1:8001"], "--listen: expected HOST:PORT"),
    (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:8001", "--delay-ms", "-5"], "--delay-ms: expected a finite number >= 0"),
    (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:8001", "--loss", "1.5"], "--loss: expected a probability"),
])
def test_bad_arguments_give_a_clear_error(args, message):
    proc = subprocess.run([sys.executable, str(LINKEMU), *args], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_works_in_process(servers):
    spec = importlib.util.spec_from_file_location("linkemu", LINKEMU)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    echo = servers()

    async def main():
        server = await mod.serve("127.0.0.1", 0, "127.0.0.1", echo.port, mod.LinkParams(delay_ms=10))
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        t0 = time.perf_counter()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        rtt = time.perf_counter() - t0
        writer.close()
        server.close()
        return rtt

    assert asyncio.run(main()) >= 0.02 * 0.9
