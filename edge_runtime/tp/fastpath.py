"""Machine-specific fast paths of the star collective: a unix socket between ranks on one host, and
a bounded busy-poll for messages that are about to arrive. Both fall back to the plain path.

    endpoint = worker_endpoint("127.0.0.1", 29500, deadline)   # "ipc://@edgefold-tp-..." or "tcp://..."
    spin = Spin(); frames = spin.recv(sock)                       # a message within SPIN_S, else None

Local peers skip the TCP stack: a master bound to a loopback or wildcard address also listens on
an abstract unix socket named after that address (`ipc_name`; Linux: abstract names, like
loopback, belong to the network namespace), and a worker dialing a loopback address uses it when
/proc/net/unix lists it; everything else, port forwards and tunnels to 127.0.0.1 included, stays
on TCP. Waiting for a partial or a sum, a rank busy-polls for up to SPIN_S before it sleeps in a
poll (see Spin).
"""
from __future__ import annotations

import os
import sys
import threading
import time

import zmq

from devices.address import is_loopback

SPIN_S = 100e-6  # busy-poll this long for a partial or a sum before sleeping in a poll (Spin)
_CONTENDED = 0.2  # ... unless this thread spent more than this share of the last _WINDOW_S waiting for a CPU
_WINDOW_S = 0.01
ANY = ("*", "0.0.0.0", "::")  # wildcard hosts a master may bind


def has_ipc() -> bool:
    """Abstract unix sockets through ZeroMQ: Linux only."""
    return sys.platform.startswith("linux") and zmq.has("ipc")


def ipc_name(host: str, port: int) -> str:
    """The abstract unix socket of a master bound to host:port (host loopback or wildcard)."""
    return f"@edgefold-tp-{'*' if host in ANY else '127.0.0.1' if host == 'localhost' else host}:{port}"


def worker_endpoint(host: str, port: int, deadline: float) -> str:
    """What a worker dialing host:port connects to: "ipc://@..." if the master listening there is in
    this network namespace (its abstract socket is listed in /proc/net/unix), else "tcp://host:port".
    The master binds that socket before its TCP port, so a TCP listener on the port without it is
    another kind of listener (a port forward, a tunnel); with neither the master is not up yet: look
    again until `deadline` (then TCP, and joining fails as it would have)."""
    tcp_endpoint = f"tcp://{host}:{port}"
    if not is_loopback(host) or not has_ipc():
        return tcp_endpoint
    names = {ipc_name(host, port), ipc_name("*", port)}
    tcp_port = f":{port:04X}"
    while True:
        try:
            tcp = False  # read first: if the port was listening, the unix socket read next is there too
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # (no tcp6 without IPv6)
                if os.path.exists(table):
                    with open(table) as f:  # sl local_address rem_address st ...; st 0A: listening
                        tcp = tcp or any(fields[1].endswith(tcp_port) and fields[3] == "0A" for fields in map(str.split, f))
            with open("/proc/net/unix") as f:  # Num RefCount Protocol Flags Type St Inode Path
                for line in f:
                    fields = line.split()
                    if len(fields) == 8 and fields[3] == "00010000" and fields[7] in names:  # listening
                        return "ipc://" + fields[7]
        except OSError:
            return tcp_endpoint
        if tcp or time.monotonic() >= deadline:
            return tcp_endpoint
        time.sleep(0.02)


class Spin:
    """Busy-poll a socket for a message before sleeping in a poll, while this thread has a core to itself.

    In generation the peer's partial or sum mostly arrives within 100 us. A rank that sleeps for it
    pays the wakeups of a blocking poll on every message (dear on a VM, where an idle vCPU halts);
    one that is still polling sees it at once (46M shape, world 2, 2 shared cores, TCP: 17.4 ->
    16.1 ms per token). Each empty look yields the core, so the I/O thread bringing the message, or
    another rank on the same cores, runs first (without that, 3 ranks on 2 cores got slower). Beside
    a busy process spinning costs more than it saves (+9 to +17% per token), so it stops while the
    thread spends more than _CONTENDED of its time runnable but not running (its run-queue wait in
    /proc/thread-self/schedstat, re-read every _WINDOW_S: 0.05-0.1 alone, ~0.3 beside a busy
    process), and never happens where that file cannot be read."""

    def __init__(self):
        self._fd, self._thread, self._t, self._waited, self._on = -1, None, 0.0, None, False

    def recv(self, sock: zmq.Socket):
        """sock's next message if it arrives within SPIN_S (and spinning is on), else None."""
        if not self._allowed():
            return None
        end = time.perf_counter() + SPIN_S
        while time.perf_counter() < end:
            if sock.get(zmq.EVENTS) & zmq.POLLIN:
                return sock.recv_multipart(zmq.NOBLOCK, copy=False)
            os.sched_yield()  # whatever else wants this core (the I/O thread bringing the message) runs first
        return None

    def _allowed(self) -> bool:
        now = time.monotonic()
        if now - self._t >= _WINDOW_S:
            waited = self._runqueue_ns()
            self._on = None not in (waited, self._waited) and waited - self._waited < _CONTENDED * 1e9 * (now - self._t)
            self._t, self._waited = now, waited
        return self._on

    def _runqueue_ns(self) -> int | None:
        """Nanoseconds the calling thread has waited for a CPU so far (None: not on this system)."""
        if self._thread != threading.get_ident():  # the file describes the thread that opened it
            self.close()
            self._thread, self._waited = threading.get_ident(), None
            try:
                self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            except OSError:
                return None
        try:
            return int(os.pread(self._fd, 64, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
