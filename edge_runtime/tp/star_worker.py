"""StarWorker: ranks 1..N-1 of the star collective. It joins the master (HELLO, WELCOME), sends its
partials up and waits for the sum, receives broadcasts and sends gathered bytes up (star.py has the
protocol and the deadlines).

    with StarWorker(TPConfig(world_size=3, master="10.0.0.2:29500", curve_keys="keys/"), rank=1) as comm:
        cmd, hidden = comm.broadcast(0)                   # the master's next command
        y = comm.allreduce(x, layer=0, kind=ATTN)         # (B, T, C)
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import curve, shm
from .config import TPConfig
from .fastpath import worker_endpoint
from .shm import DOWN, UP, ShmLink
from .star import HANDSHAKE_FAILED, StarPeer, as_tensor, describe, text_of
from .wire import DType, Header, Msg, WireError, array_to_tensor, unpack

WORK_TIMEOUT_S = 30.0  # a worker's wait for the sum of an allreduce it sent its partial to


class StarWorker(StarPeer):
    def __init__(self, config: TPConfig, rank: int, plan_checksum: bytes = b""):
        if not 1 <= rank < config.world_size:
            raise ValueError(f"rank: workers are ranks 1..{config.world_size - 1}, got {rank}")
        super().__init__(rank, config.world_size, config.payload, zmq.DEALER)
        self.transport = "tcp"  # "ipc" when it reached a master on this host through its unix socket
        self._lost = False  # the connection closed or heartbeats stopped (after joining)
        self._link: ShmLink | None = None  # shared-memory mailboxes for allreduce, when the master offers them
        host, port = config.address
        try:
            self._sock.routing_id = f"rank{rank}-{os.urandom(4).hex()}".encode()
            if config.curve_keys is not None:
                curve.configure_worker(self._sock, config.curve_keys)
            deadline = time.monotonic() + config.join_timeout_s
            endpoint = worker_endpoint(host, port, deadline)
            self.transport = endpoint.partition(":")[0]
            self._sock.connect(endpoint)
            self._join(deadline, config.join_timeout_s, plan_checksum)
        except BaseException:
            self._teardown(linger=0)
            raise

    def _join(self, deadline: float, join_timeout_s: float, plan_checksum: bytes) -> None:
        local = self.transport == "ipc" and self.payload == DType.F32 and shm.available()
        hello = Header(Msg.HELLO, self.rank, self.world_size, self.payload, -1, int(local), 0, DType.BYTES,
                       (len(plan_checksum),))  # step 1: this worker can share memory with the master
        self._send([hello.pack(), plan_checksum])
        h, extra = self._recv(join_timeout_s, "WELCOME (joining)", deadline=deadline, joining=True)
        if h.type != Msg.WELCOME:
            self._fail(f"rank {self.rank}: expected WELCOME from the master, got {describe(h)}")
        if local and extra:  # the master's offer: the name of our mailboxes
            try:
                self._link = ShmLink.open(bytes(extra[0].buffer).decode())
            except FileNotFoundError:  # the master closed already (its teardown removes the file): what it
                pass                   # sent before closing, and that it is gone, still come on the socket
            except (OSError, ValueError) as e:
                self._fail(f"rank {self.rank}: cannot map the master's shared memory ({e})")

    # ------------------------------------------------------------------ the operations

    def allreduce(self, tensor: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        self._check()
        self._seq += 1
        own, wire = self._partial(tensor)  # (..., C)
        if self._link is not None and ShmLink.fits(own.nbytes):
            self._link.put(UP, self._seq, own)
            self.bytes_sent += own.nbytes
            return torch.from_numpy(self._wait_shm(own.shape, own.dtype, layer, kind)).to(tensor.dtype)
        head = Header(Msg.PARTIAL, self.rank, self.world_size, kind, layer, 0, self._seq, wire, own.shape)
        self._send([head.pack(), *self._encode(own, wire)])
        h, payload = self._recv(WORK_TIMEOUT_S, "the sum", spin=True)
        if (h.type, h.seq, h.layer, h.code, h.shape, h.dtype) != (Msg.SUM, self._seq, layer, kind, own.shape, wire):
            self._fail(f"rank {self.rank}: out of sync with the master: got {describe(h)} shape {h.shape} "
                       f"{h.dtype.name}, expected SUM seq {self._seq} layer {layer} kind {kind} shape {own.shape} "
                       f"{wire.name}")
        return as_tensor(self._decode(h, payload, "the master"), tensor.dtype)

    def _wait_shm(self, shape: tuple, dtype, layer: int, kind: int) -> np.ndarray:
        """The sum from our mailbox; a message on the socket (ABORT, BYE), a lost master or
        WORK_TIMEOUT_S ends the wait."""
        deadline = time.monotonic() + WORK_TIMEOUT_S

        def idle():
            while self._monitor.poll(0):
                if recv_monitor_message(self._monitor)["event"] == zmq.EVENT_DISCONNECTED:
                    self._lost = True
            if self._sock.poll(0) or self._lost:
                if self._link.ready(DOWN, self._seq):
                    return  # the sum came first (this rank was off its core since it last looked): the
                    # socket holds the master's next message, which the next operation reads
                h, _ = self._recv(0.001, "the sum")  # raises on ABORT, BYE or a lost master
                self._fail(f"rank {self.rank}: out of sync with the master: got {describe(h)}, expected "
                           f"SUM seq {self._seq} layer {layer} kind {kind} in shared memory")
            if time.monotonic() > deadline:
                self._fail(f"rank {self.rank}: no sum for layer {layer} kind {kind} from the master within "
                           f"{WORK_TIMEOUT_S:g} s")

        out = self._link.get(DOWN, self._seq, shape, dtype, idle)
        self.bytes_received += out.nbytes
        return out

    def _teardown(self, linger: int) -> None:
        super()._teardown(linger)
        if self._link is not None:
            self._link.close()

    def broadcast(self, command: int = 0, tensor: torch.Tensor | None = None, step: int = 0, steps_from: int = -1):
        self._check()
        self._seq += 1
        h, payload = self._recv(None, "the next broadcast")
        if h.type != Msg.BCAST or h.seq != self._seq:
            self._fail(f"rank {self.rank}: out of sync with the master: got {describe(h)}, "
                       f"expected BCAST seq {self._seq}")
        arr = self._decode(h, payload, "the master")
        self.last_step, self.last_steps_from = h.step, h.layer
        return h.code, None if arr is None else array_to_tensor(h.dtype, arr)

    def gather(self, data: bytes) -> None:
        self._check()
        self._seq += 1
        data = bytes(data)
        head = Header(Msg.GATHER, self.rank, self.world_size, 0, -1, 0, self._seq, DType.BYTES, (len(data),))
        self._send([head.pack(), data])
        return None

    # ------------------------------------------------------------------ the link to the master

    def _send(self, parts: list) -> None:
        try:
            self._sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            self._fail(f"rank {self.rank}: cannot send to the master ({e.strerror})")
        self.bytes_sent += sum(memoryview(p).nbytes for p in parts)

    def _recv(self, timeout_s: float | None, what: str, deadline: float | None = None,
              joining: bool = False, spin: bool = False) -> tuple[Header, list]:
        """The master's next message; raises on deadline, lost connection, ABORT, BYE or REJECT.
        timeout_s None: wait as long as the master is alive."""
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
                if event["event"] in HANDSHAKE_FAILED:
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
            self._fail(f"rank {self.rank}: the master aborted: {text_of(frames[1:])}", tell=False)
        if h.type == Msg.BYE:
            self._fail(f"rank {self.rank}: lost the master ({text_of(frames[1:])})", tell=False)
        if h.type == Msg.REJECT:
            self._fail(f"rank {self.rank}: the master rejected this worker: {text_of(frames[1:])}", tell=False)
        return h, frames[1:]

    def _tell(self, message: str) -> None:
        self._say(Msg.BYE, message)

    def _goodbye(self) -> None:
        if self._broken is None:
            self._say(Msg.BYE, f"rank {self.rank} closed")

    def _say(self, kind: Msg, reason: str) -> None:
        try:
            self._sock.send_multipart(self._reason(kind, reason), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
