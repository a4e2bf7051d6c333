"""Star allreduce over ZeroMQ: workers send partials up, the master sums and sends the sum down.

    master = StarCollective(0, 3, "10.0.0.2:5555")        # binds, waits until ranks 1, 2 joined
    worker = StarCollective(2, 3, "10.0.0.2:5555")        # connects, HELLO, waits for WELCOME

One allreduce is one round trip on every worker-master link, the physical floor for a star:
    worker r:  PARTIAL(layer, kind, seq) + payload  ->  master
    master:    sum = p0 + p1 + ... + p(N-1) in fp32, in rank order (deterministic bits)
    master:    SUM(layer, kind, seq) + payload      ->  every worker  (no acks anywhere)
A broadcast is one message down (BCAST: command, step, tensor). Messages are a fixed header frame
plus raw buffer frames (wire.py); buffers go out with copy=False and come in as numpy views.

Local peers skip the TCP stack: a master bound to a loopback or wildcard address also listens on
an abstract unix socket named after that address (Linux; abstract names, like loopback, belong to
the network namespace), and a worker dialing a loopback address uses it when /proc/net/unix lists
it; everything else, port forwards and tunnels to 127.0.0.1 included, stays on TCP. Waiting for a
partial or a sum, a rank busy-polls for up to SPIN_S before it sleeps in a poll (see _Spin).

Sockets: one ROUTER on the master, one DEALER per worker, for both directions. Compared with a
PUB/SUB pair for the down-link this needs one port, one CURVE setup and no subscription race
(a PUB drops what a late SUB misses), and with ROUTER_MANDATORY the master learns at send time
that a worker's connection is gone. Sending the sum N-1 times costs N-1 small writes (the buffer
is shared, not copied), which on a few devices is nothing against a link's latency.

Deadlines, so nothing hangs:
  * master waiting for partials: `timeout_s` (2 s); a worker that disconnects is named at once
    (the socket monitor maps the closed connection to its rank), one that hangs after timeout_s.
  * joining: `join_timeout_s` on both sides; the error names the ranks that are missing.
  * worker waiting for the sum: `work_timeout_s`; for the next broadcast: `idle_timeout_s`
    (None: as long as the master is alive). Liveness comes from ZMTP heartbeats (PING/PONG every
    `heartbeat_s`, answered by libzmq's I/O thread, so they flow while the master's Python code
    is busy or idle); a master silent for 5 heartbeats, or a closed connection, ends the wait.
  * after any error the master sends ABORT(reason) to every worker, and a failing worker sends
    BYE(reason) up, so the other side fails now instead of at its deadline.
Messages from peers that have not joined (garbage, strangers) are counted in `rejected` and
dropped; they never take the master down.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import curve
from .collective import Collective, CollectiveError, parse_address
from .wire import PAYLOAD_DTYPE, DType, Header, Msg, WireError, array_to_tensor, decode, encode, tensor_to_array, unpack

SPIN_S = 100e-6  # busy-poll this long for a partial or a sum before sleeping in a poll (_Spin)
_CONTENDED = 0.2  # ... unless this thread spent more than this share of the last _WINDOW_S waiting for a CPU
_WINDOW_S = 0.01
_ANY = ("*", "0.0.0.0", "::")
_MONITOR = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _text(frames) -> str:
    return bytes(frames[0].buffer).decode("utf-8", "replace") if frames else ""


def _describe(h: Header) -> str:
    return f"{h.type.name} seq {h.seq} layer {h.layer} kind/command {h.code}"


def _ipc_name(host: str, port: int) -> str:
    """The abstract unix socket of a master bound to host:port (host loopback or wildcard)."""
    return f"@edgefold-tp-{'*' if host in _ANY else '127.0.0.1' if host == 'localhost' else host}:{port}"


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("localhost", "::1")


def worker_endpoint(host: str, port: int, deadline: float) -> str:
    """What a worker dialing host:port connects to: "ipc://@..." if the master listening there is in
    this network namespace (its abstract socket is listed in /proc/net/unix), else "tcp://host:port".
    The master binds that socket before its TCP port, so a TCP listener on the port without it is
    another kind of listener (a port forward, a tunnel); with neither the master is not up yet: look
    again until `deadline` (then TCP, and joining fails as it would have)."""
    tcp_endpoint = f"tcp://{host}:{port}"
    if not _is_loopback(host) or not sys.platform.startswith("linux") or not zmq.has("ipc"):
        return tcp_endpoint
    names = {_ipc_name(host, port), _ipc_name("*", port)}
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


class _Spin:
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


class StarCollective(Collective):
    def __init__(self, rank: int, world_size: int, master: str, payload: str = "fp32", timeout_s: float = 2.0,
                 curve_keys: Path | None = None, join_timeout_s: float = 30.0, idle_timeout_s: float | None = None,
                 work_timeout_s: float = 30.0, plan_checksum: bytes = b"", heartbeat_s: float = 1.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.rank, self.world_size, self.payload = rank, world_size, PAYLOAD_DTYPE[payload]
        self.timeout_s, self.idle_timeout_s, self.work_timeout_s = timeout_s, idle_timeout_s, work_timeout_s
        self.bytes_sent = self.bytes_received = self.rejected = 0
        self._seq, self._broken, self._closed, self._lost = 0, None, False, False
        self._peers: dict[int, bytes] = {}  # master: rank -> ZeroMQ identity
        self._rank_of: dict[bytes, int] = {}
        self._fd_rank: dict[int, int] = {}  # master: socket fd of each worker's connection
        self._gone: dict[int, str] = {}  # master: ranks whose connection closed
        self._notes: dict[str, int] = {}  # handshake failures / rejections (with counts), for error messages
        self._backlog: list = []  # master: messages from joined workers that arrived during the join
        self._spin = _Spin()
        self.transport = "tcp"  # worker: "ipc" when it reached a master on this host through its unix socket
        self._ctx, self._auth = zmq.Context(), None
        host, port = parse_address(master)
        self._sock = self._ctx.socket(zmq.ROUTER if rank == 0 else zmq.DEALER)
        self._sock.linger = 500  # ms to flush a final BYE/ABORT at close
        self._sock.heartbeat_ivl = int(heartbeat_s * 1000)
        self._sock.heartbeat_timeout = int(5 * heartbeat_s * 1000)
        try:
            self._monitor = self._sock.get_monitor_socket(_MONITOR)
            self._poller = zmq.Poller()
            self._poller.register(self._sock, zmq.POLLIN)
            self._poller.register(self._monitor, zmq.POLLIN)
            if rank == 0:
                self._sock.router_mandatory = 1
                if curve_keys is not None:
                    self._auth = curve.configure_master(self._ctx, self._sock, Path(curve_keys))
                if sys.platform.startswith("linux") and zmq.has("ipc") and (host in _ANY or _is_loopback(host)):
                    try:  # before the TCP port: a worker that sees the port listening finds this too
                        self._sock.bind("ipc://" + _ipc_name(host, port))
                    except zmq.ZMQError:
                        pass  # local workers then find no unix socket and use TCP
                self._sock.bind(f"tcp://{'*' if host in ('*', '0.0.0.0') else host}:{port}")
                self._master_join(time.monotonic() + join_timeout_s, join_timeout_s, plan_checksum)
            else:
                self._sock.routing_id = f"rank{rank}-{os.urandom(4).hex()}".encode()
                if curve_keys is not None:
                    curve.configure_worker(self._sock, Path(curve_keys))
                deadline = time.monotonic() + join_timeout_s
                endpoint = worker_endpoint(host, port, deadline)
                self.transport = endpoint.partition(":")[0]
                self._sock.connect(endpoint)
                self._worker_join(deadline, join_timeout_s, plan_checksum)
        except BaseException:
            self._teardown(linger=500 if rank == 0 else 0)  # the master's ABORT may reach joined workers
            raise

    # ------------------------------------------------------------------ the two operations

    def allreduce(self, tensor: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        self._check()
        self._seq += 1
        _, own = tensor_to_array(tensor.float() if tensor.dtype != torch.float32 else tensor)  # (..., C)
        if self.rank == 0:
            acc = np.array(own, dtype=np.float32, copy=True)
            partials = self._gather(layer, kind, own.shape)
            for r in range(1, self.world_size):  # fixed rank order: the same bits every run
                np.add(acc, partials[r], out=acc)
            frames = self._encode(acc)
            head = Header(Msg.SUM, 0, self.world_size, kind, layer, 0, self._seq, self.payload, acc.shape).pack()
            for r in range(1, self.world_size):
                self._send_to(r, [head, *frames])
            result = acc if self.payload == DType.F32 else decode(Header(Msg.SUM, dtype=self.payload, shape=acc.shape), frames)
        else:
            frames = self._encode(own)
            head = Header(Msg.PARTIAL, self.rank, self.world_size, kind, layer, 0, self._seq, self.payload, own.shape)
            self._send_up([head.pack(), *frames])
            h, payload = self._recv_from_master(self.work_timeout_s, "the sum", spin=True)
            if (h.type, h.seq, h.layer, h.code, h.shape, h.dtype) != (Msg.SUM, self._seq, layer, kind, own.shape, self.payload):
                self._fail(f"rank {self.rank}: out of sync with the master: got {_describe(h)} shape {h.shape} "
                           f"{h.dtype.name}, expected SUM seq {self._seq} layer {layer} kind {kind} shape {own.shape} "
                           f"{self.payload.name}")
            result = self._decode(h, payload, "the master")
        out = torch.from_numpy(np.array(result, dtype=np.float32, copy=True))
        return out if tensor.dtype == torch.float32 else out.to(tensor.dtype)

    def broadcast(self, command: int, tensor: torch.Tensor | None = None, step: int = 0):
        self._check()
        self._seq += 1
        if self.rank == 0:
            code, arr = tensor_to_array(tensor) if tensor is not None else (DType.NONE, None)
            frames = [] if arr is None else encode(arr, code)
            head = Header(Msg.BCAST, 0, self.world_size, command, -1, step, self._seq, code,
                          () if arr is None else arr.shape).pack()
            for r in range(1, self.world_size):  # copied: the caller keeps (and may change) its tensor
                self._send_to(r, [head, *frames], copy=True)
            self.last_step = step
            return command, tensor
        h, payload = self._recv_from_master(self.idle_timeout_s, "the next broadcast")
        if h.type != Msg.BCAST or h.seq != self._seq:
            self._fail(f"rank {self.rank}: out of sync with the master: got {_describe(h)}, "
                       f"expected BCAST seq {self._seq}")
        arr = self._decode(h, payload, "the master")
        self.last_step = h.step
        return h.code, None if arr is None else array_to_tensor(h.dtype, arr)

    def close(self) -> None:
        if self._closed:
            return
        if self.rank == 0:
            for r in list(self._peers):
                self._try_send_to(r, Msg.BYE, "the master closed")
        elif self._broken is None:
            self._try_send_up(Msg.BYE, f"rank {self.rank} closed")
        self._teardown(linger=500)

    # ------------------------------------------------------------------ joining

    def _master_join(self, deadline: float, join_timeout_s: float, plan_checksum: bytes) -> None:
        while len(self._peers) < self.world_size - 1:
            got = self._master_next(deadline)
            if got is None:
                missing = [r for r in range(1, self.world_size) if r not in self._peers]
                self._fail(f"master: rank(s) {missing} did not join within {join_timeout_s:g} s{self._noted()}")
            if not got:
                continue
            identity, frames = got
            if identity in self._rank_of:
                self._backlog.append(got)  # a joined worker already sending: keep it for the operation
                continue
            try:
                h = unpack(frames[0])
                if h.type != Msg.HELLO:
                    raise WireError(f"expected HELLO, got {h.type.name}")
                reason = self._hello_problem(h, bytes(frames[1].buffer) if len(frames) > 1 else b"", plan_checksum)
            except WireError as e:
                reason = f"malformed join message: {e}"
            if reason:
                self.rejected += 1
                self._note(f"rejected a peer: {reason}")
                self._reject(identity, reason)
                continue
            self._peers[h.rank], self._rank_of[identity] = identity, h.rank
            self._fd_rank[frames[0].get(zmq.SRCFD)] = h.rank
            self._send_to(h.rank, [Header(Msg.WELCOME, 0, self.world_size, self.payload).pack()])

    def _hello_problem(self, h: Header, checksum: bytes, plan_checksum: bytes) -> str:
        if h.world != self.world_size:
            return f"rank {h.rank} expects world size {h.world}, the master has {self.world_size}"
        if not 1 <= h.rank < self.world_size:
            return f"rank {h.rank} is out of range: workers are ranks 1..{self.world_size - 1}"
        if h.rank in self._peers:
            return f"rank {h.rank} has already joined (a second worker claims it)"
        if h.code != self.payload:
            return f"rank {h.rank} uses payload {DType(h.code).name if h.code in DType._value2member_map_ else h.code}, the master uses {self.payload.name}"
        if plan_checksum and checksum and checksum != plan_checksum:
            return f"rank {h.rank} has plan checksum {checksum!r}, the master has {plan_checksum!r}"
        return ""

    def _worker_join(self, deadline: float, join_timeout_s: float, plan_checksum: bytes) -> None:
        hello = Header(Msg.HELLO, self.rank, self.world_size, self.payload, -1, 0, 0, DType.BYTES,
                       (len(plan_checksum),))
        self._send_up([hello.pack(), plan_checksum])
        h, _ = self._recv_from_master(join_timeout_s, "WELCOME (joining)", deadline=deadline, joining=True)
        if h.type != Msg.WELCOME:
            self._fail(f"rank {self.rank}: expected WELCOME from the master, got {_describe(h)}")

    # ------------------------------------------------------------------ master side

    def _gather(self, layer: int, kind: int, shape: tuple) -> dict[int, np.ndarray]:
        """Every worker's partial for (layer, kind, seq), as fp32-compatible arrays."""
        deadline, partials = time.monotonic() + self.timeout_s, {}
        while len(partials) < self.world_size - 1:
            pending = [r for r in range(1, self.world_size) if r not in partials]
            gone = [r for r in pending if r in self._gone]
            if gone:
                self._fail(f"rank {gone[0]} disconnected ({self._gone[gone[0]]}) before sending its partial "
                           f"for layer {layer} kind {kind}")
            got = self._master_next(deadline, spin=True)
            if got is None:
                self._fail(f"rank(s) {pending} sent no partial for layer {layer} kind {kind} (seq {self._seq}) "
                           f"within {self.timeout_s:g} s")
            if not got:
                continue
            identity, frames = got
            r = self._rank_of.get(identity)
            if r is None:
                self._stranger(identity, frames)
                continue
            try:
                h = unpack(frames[0])
            except WireError as e:
                self._fail(f"rank {r} sent a malformed header: {e}")
            if h.type == Msg.BYE:
                self._fail(f"rank {r} left: {_text(frames[1:])}")
            if (h.type, h.seq, h.layer, h.code, h.rank) != (Msg.PARTIAL, self._seq, layer, kind, r) or r in partials:
                self._fail(f"rank {r} is out of sync: sent {_describe(h)} from rank {h.rank}, expected PARTIAL "
                           f"seq {self._seq} layer {layer} kind {kind}")
            if h.shape != shape or h.dtype != self.payload:
                self._fail(f"rank {r} sent a {h.dtype.name} partial of shape {h.shape} for layer {layer} kind {kind}, "
                           f"expected {self.payload.name} of shape {shape}")
            partials[r] = self._decode(h, frames[1:], f"rank {r}")
        return partials

    def _master_next(self, deadline: float, spin: bool = False):
        """The next (identity, frames); None at the deadline; () when the caller should look again
        (a monitor event was handled, or a frame too short to be a message was dropped)."""
        if self._backlog:
            return self._backlog.pop(0)
        try:  # often the partials are already queued: skip the poll
            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            frames = self._spin.recv(self._sock) if spin else None
        if frames is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            events = dict(self._poller.poll(max(1, math.ceil(left * 1000))))
            if self._monitor in events:
                self._on_monitor_event()
            if self._sock not in events:
                return ()
            frames = self._sock.recv_multipart(copy=False)
        self.bytes_received += sum(len(f) for f in frames[1:])
        if len(frames) < 2:
            self.rejected += 1
            return ()
        return frames[0].bytes, frames[1:]

    def _on_monitor_event(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED and event["value"] in self._fd_rank:
                r = self._fd_rank.pop(event["value"])
                self._gone[r] = "connection closed"
            elif event["event"] in _HANDSHAKE_FAILED:
                self._note("a peer failed the security handshake (wrong or missing CURVE keys?)")

    def _stranger(self, identity: bytes, frames: list) -> None:
        """A message from a peer that has not joined: drop it, and answer a HELLO with REJECT."""
        self.rejected += 1
        try:
            is_hello = unpack(frames[0]).type == Msg.HELLO
        except WireError:
            return
        if is_hello:
            self._reject(identity, f"all {self.world_size - 1} workers have already joined")

    def _reject(self, identity: bytes, reason: str) -> None:
        try:
            msg = reason.encode()
            head = Header(Msg.REJECT, 0, self.world_size, 0, -1, 0, 0, DType.BYTES, (len(msg),)).pack()
            self._sock.send_multipart([identity, head, msg], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone already

    def _send_to(self, rank: int, parts: list, copy: bool = False) -> None:
        if rank in self._gone:
            self._fail(f"rank {rank} disconnected ({self._gone[rank]})")
        try:
            self._sock.send_multipart([self._peers[rank], *parts], zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            self._fail(f"rank {rank} is not reading its messages (send queue full)")
        except zmq.ZMQError as e:
            self._fail(f"rank {rank} is unreachable ({e.strerror})")
        self.bytes_sent += sum(memoryview(p).nbytes for p in parts)

    def _try_send_to(self, rank: int, kind: Msg, reason: str) -> None:
        msg = reason.encode()
        head = Header(kind, 0, self.world_size, 0, -1, 0, self._seq, DType.BYTES, (len(msg),)).pack()
        try:
            self._sock.send_multipart([self._peers[rank], head, msg], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ worker side

    def _send_up(self, parts: list) -> None:
        try:
            self._sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            self._fail(f"rank {self.rank}: cannot send to the master ({e.strerror})")
        self.bytes_sent += sum(memoryview(p).nbytes for p in parts)

    def _try_send_up(self, kind: Msg, reason: str) -> None:
        msg = reason.encode()
        head = Header(kind, self.rank, self.world_size, 0, -1, 0, self._seq, DType.BYTES, (len(msg),)).pack()
        try:
            self._sock.send_multipart([head, msg], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _recv_from_master(self, timeout_s: float | None, what: str, deadline: float | None = None,
                          joining: bool = False, spin: bool = False) -> tuple[Header, list]:
        """The master's next message; raises on deadline, lost connection, ABORT, BYE or REJECT."""
        if deadline is None and timeout_s is not None:
            deadline = time.monotonic() + timeout_s
        frames = self._spin.recv(self._sock) if spin else None
        while frames is None:
            if self._lost and not self._sock.poll(0):  # read what arrived before the connection closed
                self._fail(f"rank {self.rank}: lost the master (connection closed or heartbeats stopped)")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._fail(f"rank {self.rank}: no {what} from the master within {timeout_s:g} s{self._noted()}",
                           tell=not joining)
            events = dict(self._poller.poll(1000 if left is None else max(1, math.ceil(left * 1000))))
            if self._monitor in events:
                event = recv_monitor_message(self._monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._fail(f"rank {self.rank}: the master refused this worker's CURVE key")
                if event["event"] in _HANDSHAKE_FAILED:
                    self._note("the security handshake with the master failed (wrong or missing CURVE keys?)")
                elif not joining:  # DISCONNECTED after joining: the master is gone or went silent
                    self._lost = True
            if self._sock in events:
                frames = self._sock.recv_multipart(copy=False)
        self.bytes_received += sum(len(f) for f in frames)
        try:
            h = unpack(frames[0])
        except WireError as e:
            self._fail(f"rank {self.rank}: malformed message from the master: {e}")
        if h.type == Msg.ABORT:
            self._fail(f"rank {self.rank}: the master aborted: {_text(frames[1:])}", tell=False)
        if h.type == Msg.BYE:
            self._fail(f"rank {self.rank}: lost the master ({_text(frames[1:])})", tell=False)
        if h.type == Msg.REJECT:
            self._fail(f"rank {self.rank}: the master rejected this worker: {_text(frames[1:])}", tell=False)
        return h, frames[1:]

    # ------------------------------------------------------------------ shared

    def _encode(self, arr: np.ndarray) -> list:
        try:
            return encode(arr, self.payload)
        except WireError as e:
            self._fail(f"rank {self.rank}: {e}")

    def _decode(self, h: Header, frames: list, sender: str):
        try:
            return decode(h, frames)
        except WireError as e:
            self._fail(f"{sender} sent a malformed payload: {e}")

    def _note(self, text: str) -> None:
        self._notes[text] = self._notes.get(text, 0) + 1

    def _noted(self) -> str:
        return f" ({'; '.join(f'{t} x{n}' for t, n in self._notes.items())})" if self._notes else ""

    def _check(self) -> None:
        if self._closed:
            raise CollectiveError(f"rank {self.rank}: the collective is closed")
        if self._broken is not None:
            raise CollectiveError(f"rank {self.rank}: the collective is broken: {self._broken}")
        if self.rank == 0:
            self._on_monitor_event()

    def _fail(self, message: str, tell: bool = True):
        """Mark the collective broken, tell the other side (master: ABORT to all; worker: BYE), raise."""
        self._broken = message
        if tell and self.rank == 0:
            for r in list(self._peers):
                self._try_send_to(r, Msg.ABORT, message)
        elif tell:
            self._try_send_up(Msg.BYE, message)
        raise CollectiveError(message)

    def _teardown(self, linger: int) -> None:
        self._closed = True
        self._spin.close()
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        for s in (getattr(self, "_monitor", None), self._sock):
            if s is not None:
                s.close(linger=linger)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
