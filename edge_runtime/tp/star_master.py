"""StarMaster: rank 0 of the star collective. It binds, admits the workers, sums their partials in
rank order and sends the sum back, broadcasts commands, and gathers small payloads (star.py has
the protocol and the deadlines).

    with StarMaster(TPConfig(world_size=3, master="0.0.0.0:29500", curve_keys="keys/"), plan_checksum=b"...") as comm:
        y = comm.allreduce(x, layer=0, kind=ATTN)         # (B, T, C), waits timeout_s per partial
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import curve
from .config import TPConfig
from devices.address import is_loopback

from . import shm
from .fastpath import ANY, has_ipc, ipc_name
from .shm import DOWN, UP, ShmLink
from .star import HANDSHAKE_FAILED, MAX_GATHER_BYTES, StarPeer, as_tensor, describe, text_of
from .wire import DType, Header, Msg, WireError, decode, tensor_to_array, unpack


class StarMaster(StarPeer):
    def __init__(self, config: TPConfig, plan_checksum: bytes = b""):
        super().__init__(0, config.world_size, config.payload, zmq.ROUTER)
        self.timeout_s, self.rejected = config.timeout_s, 0
        self._peers: dict[int, bytes] = {}  # rank -> ZeroMQ identity
        self._rank_of: dict[bytes, int] = {}
        self._fd_rank: dict[int, int] = {}  # socket fd of each worker's connection
        self._gone: dict[int, str] = {}  # ranks whose connection closed
        self._backlog: list = []  # messages from joined workers that arrived during the join
        self._shm: dict[int, ShmLink] = {}  # rank -> its shared-memory mailboxes (a worker on this host)
        host, port = config.address
        try:
            self._sock.router_mandatory = 1
            if config.curve_keys is not None:
                self._auth = curve.configure_master(self._ctx, self._sock, config.curve_keys)
            if has_ipc() and (host in ANY or is_loopback(host)):
                try:  # before the TCP port: a worker that sees the port listening finds this too
                    self._sock.bind("ipc://" + ipc_name(host, port))
                except zmq.ZMQError:
                    pass  # local workers then find no unix socket and use TCP
            self._sock.bind(f"tcp://{'*' if host in ('*', '0.0.0.0') else host}:{port}")
            self._join(time.monotonic() + config.join_timeout_s, config.join_timeout_s, plan_checksum)
        except BaseException:
            self._teardown(linger=500)  # the ABORT may reach joined workers
            raise

    # ------------------------------------------------------------------ the operations

    def allreduce(self, tensor: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        self._check()
        self._seq += 1
        own, wire = self._partial(tensor)  # (..., C)
        acc = np.array(own, copy=True)
        if len(self._shm) == self.world_size - 1 and ShmLink.fits(acc.nbytes):  # every worker on this host
            deadline = time.monotonic() + self.timeout_s
            for r in range(1, self.world_size):  # fixed rank order: the same bits every run
                np.add(acc, self._wait_shm(r, acc.shape, acc.dtype, deadline, f"partial for layer {layer} kind {kind}"),
                       out=acc)
            for r in range(1, self.world_size):
                self._shm[r].put(DOWN, self._seq, acc)
                self.bytes_sent += acc.nbytes
            return torch.from_numpy(acc).to(tensor.dtype)

        def wrong(h: Header) -> str:
            if h.shape != own.shape or h.dtype != wire:
                return (f"a {h.dtype.name} partial of shape {h.shape} for layer {layer} kind {kind}, "
                        f"expected {wire.name} of shape {own.shape}")
            return ""

        partials = self._collect(Msg.PARTIAL, layer, kind, f"partial for layer {layer} kind {kind}", wrong)
        for r in range(1, self.world_size):  # fixed rank order: the same bits every run
            np.add(acc, partials[r], out=acc)
        frames = self._encode(acc, wire)
        head = Header(Msg.SUM, 0, self.world_size, kind, layer, 0, self._seq, wire, acc.shape).pack()
        for r in range(1, self.world_size):
            self._send_to(r, [head, *frames])
        result = acc if wire in (DType.F32, DType.F64) else decode(Header(Msg.SUM, dtype=wire, shape=acc.shape), frames)
        return as_tensor(result, tensor.dtype)

    def broadcast(self, command: int, tensor: torch.Tensor | None = None, step: int = 0, steps_from: int = -1):
        self._check()
        self._seq += 1
        code, arr = tensor_to_array(tensor) if tensor is not None else (DType.NONE, None)
        frames = [] if arr is None else self._encode(arr, code)
        head = Header(Msg.BCAST, 0, self.world_size, command, steps_from, step, self._seq, code,
                      () if arr is None else arr.shape).pack()
        for r in range(1, self.world_size):  # copied: the caller keeps (and may change) its tensor
            self._send_to(r, [head, *frames], copy=True)
        self.last_step, self.last_steps_from = step, steps_from
        return command, tensor

    def gather(self, data: bytes) -> list[bytes]:
        self._check()
        self._seq += 1

        def wrong(h: Header) -> str:
            if h.dtype != DType.BYTES or len(h.shape) != 1 or h.shape[0] > MAX_GATHER_BYTES:
                return f"a gather payload of {h.dtype.name} shape {h.shape}, expected at most {MAX_GATHER_BYTES} bytes"
            return ""

        got = self._collect(Msg.GATHER, -1, 0, "gather payload", wrong)
        return [bytes(data)] + [got[r].tobytes() for r in range(1, self.world_size)]

    # ------------------------------------------------------------------ joining

    def _join(self, deadline: float, join_timeout_s: float, plan_checksum: bytes) -> None:
        while len(self._peers) < self.world_size - 1:
            got = self._next(deadline)
            if got is None:
                missing = [r for r in range(1, self.world_size) if r not in self._peers]
                self._fail(f"master: rank(s) {missing} did not join within {join_timeout_s:g} s{self._noted()}", ranks=missing)
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
            offer = []  # a worker that dialed the unix socket (HELLO step 1) gets shared-memory mailboxes
            if h.step == 1 and self.payload == DType.F32 and shm.available():
                self._shm[h.rank] = ShmLink.create()
                offer = [self._shm[h.rank].name.encode()]
            self._send_to(h.rank, [Header(Msg.WELCOME, 0, self.world_size, self.payload).pack(), *offer])

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

    # ------------------------------------------------------------------ receiving

    def _collect(self, kind: Msg, layer: int, code: int, what: str,
                 wrong: Callable[[Header], str]) -> dict[int, np.ndarray]:
        """Every worker's message of this operation (`kind`, layer, code, the current seq), decoded;
        `wrong(header)` says what is wrong with its payload's shape or dtype ("" if nothing)."""
        deadline, got = time.monotonic() + self.timeout_s, {}
        while len(got) < self.world_size - 1:
            pending = [r for r in range(1, self.world_size) if r not in got]
            gone = [r for r in pending if r in self._gone]
            if gone:
                self._fail(f"rank {gone[0]} disconnected ({self._gone[gone[0]]}) before sending its {what}", ranks=gone)
            msg = self._next(deadline, spin=True)
            if msg is None:
                self._fail(f"rank(s) {pending} sent no {what} (seq {self._seq}) within {self.timeout_s:g} s", ranks=pending)
            if not msg:
                continue
            identity, frames = msg
            r = self._rank_of.get(identity)
            if r is None:
                self._stranger(identity, frames)
                continue
            try:
                h = unpack(frames[0])
            except WireError as e:
                self._fail(f"rank {r} sent a malformed header: {e}", ranks=[r])
            if h.type == Msg.BYE:
                self._fail(f"rank {r} left: {text_of(frames[1:])}", ranks=[r])
            if (h.type, h.seq, h.layer, h.code, h.rank) != (kind, self._seq, layer, code, r) or r in got:
                self._fail(f"rank {r} is out of sync: sent {describe(h)} from rank {h.rank}, expected {kind.name} "
                           f"seq {self._seq} layer {layer} kind {code}", ranks=[r])
            if problem := wrong(h):
                self._fail(f"rank {r} sent {problem}", ranks=[r])
            got[r] = self._decode(h, frames[1:], f"rank {r}", ranks=[r])
        return got

    def _wait_shm(self, r: int, shape: tuple, dtype, deadline: float, what: str) -> np.ndarray:
        """Rank r's partial from its mailbox; while waiting, a closed connection, a message on the
        socket (a BYE) or the deadline ends the wait."""
        def idle():
            self._on_monitor_event()
            if r in self._gone:
                self._fail(f"rank {r} disconnected ({self._gone[r]}) before sending its {what}", ranks=[r])
            if self._sock.poll(0):
                msg = self._next(deadline)
                if msg:
                    sender = self._rank_of.get(msg[0])
                    if sender is None:
                        self._stranger(*msg)
                    else:
                        try:
                            h = unpack(msg[1][0])
                        except WireError as e:
                            self._fail(f"rank {sender} sent a malformed header: {e}", ranks=[sender])
                        if h.type == Msg.BYE:
                            self._fail(f"rank {sender} left: {text_of(msg[1][1:])}", ranks=[sender])
                        self._fail(f"rank {sender} is out of sync: sent {describe(h)}, expected its {what} "
                                   f"(seq {self._seq}) in shared memory", ranks=[sender])
            if time.monotonic() > deadline:
                self._fail(f"rank(s) [{r}] sent no {what} (seq {self._seq}) within {self.timeout_s:g} s", ranks=[r])

        out = self._shm[r].get(UP, self._seq, shape, dtype, idle)
        self.bytes_received += out.nbytes
        return out

    def _teardown(self, linger: int) -> None:
        super()._teardown(linger)
        for link in self._shm.values():
            link.unlink()  # the worker unlinks it once mapped; this covers one that never did
            link.close()

    def _next(self, deadline: float, spin: bool = False):
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

    def _check(self) -> None:
        super()._check()
        self._on_monitor_event()

    def _on_monitor_event(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED and event["value"] in self._fd_rank:
                r = self._fd_rank.pop(event["value"])
                self._gone[r] = "connection closed"
            elif event["event"] in HANDSHAKE_FAILED:
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

    # ------------------------------------------------------------------ sending

    def _send_to(self, rank: int, parts: list, copy: bool = False) -> None:
        if rank in self._gone:
            self._fail(f"rank {rank} disconnected ({self._gone[rank]})", ranks=[rank])
        try:
            self._sock.send_multipart([self._peers[rank], *parts], zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            self._fail(f"rank {rank} is not reading its messages (send queue full)", ranks=[rank])
        except zmq.ZMQError as e:
            self._fail(f"rank {rank} is unreachable ({e.strerror})", ranks=[rank])
        self.bytes_sent += sum(memoryview(p).nbytes for p in parts)

    def _reject(self, identity: bytes, reason: str) -> None:
        try:
            self._sock.send_multipart([identity, *self._reason(Msg.REJECT, reason)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone already

    def _tell(self, message: str) -> None:
        self._to_all(Msg.ABORT, message)

    def _goodbye(self) -> None:
        self._to_all(Msg.BYE, "the master closed")

    def _to_all(self, kind: Msg, reason: str) -> None:
        for identity in list(self._peers.values()):
            try:
                self._sock.send_multipart([identity, *self._reason(kind, reason)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
