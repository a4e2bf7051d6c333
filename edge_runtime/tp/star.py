"""The star collective over ZeroMQ: what its two sides share. StarMaster (star_master.py) is rank 0,
StarWorker (star_worker.py) every other rank; connect.make_collective picks by rank.

    master = StarMaster(TPConfig(world_size=3, master="127.0.0.1:5555"))    # binds, waits for ranks 1, 2
    worker = StarWorker(TPConfig(world_size=3, master="127.0.0.1:5555"), 2) # connects, HELLO, waits for WELCOME

One allreduce is one round trip on every worker-master link, the physical floor for a star:
    worker r:  PARTIAL(layer, kind, seq) + payload  ->  master
    master:    sum = p0 + p1 + ... + p(N-1) in fp32, in rank order (deterministic bits); float64
               partials (quantized ranks: parallelize.exact_partials) travel and sum in float64
    master:    SUM(layer, kind, seq) + payload      ->  every worker  (no acks anywhere)
A broadcast is one message down (BCAST: command, step, tensor); a gather one message up from each
worker (GATHER: raw bytes). Messages are a fixed header frame plus raw buffer frames (wire.py);
buffers go out with copy=False and come in as numpy views. Ranks on one host talk over a unix
socket, and a rank waiting for a partial or a sum busy-polls briefly first (fastpath.py).

Sockets: one ROUTER on the master, one DEALER per worker, for both directions. Compared with a
PUB/SUB pair for the down-link this needs one port, one CURVE setup and no subscription race
(a PUB drops what a late SUB misses), and with ROUTER_MANDATORY the master learns at send time
that a worker's connection is gone. Sending the sum N-1 times costs N-1 small writes (the buffer
is shared, not copied), which on a few devices is nothing against a link's latency.

Deadlines, so nothing hangs:
  * master waiting for partials or gathered bytes: `timeout_s` (2 s); a worker that disconnects is
    named at once (the socket monitor maps the closed connection to its rank), one that hangs
    after timeout_s.
  * joining: `join_timeout_s` on both sides; the error names the ranks that are missing.
  * worker waiting for the sum: WORK_TIMEOUT_S; for the next broadcast: as long as the master is
    alive. Liveness comes from ZMTP heartbeats (PING/PONG every HEARTBEAT_S, answered by libzmq's
    I/O thread, so they flow while the master's Python code is busy or idle); a master silent for
    5 heartbeats, or a closed connection, ends the wait.
  * after any error the master sends ABORT(reason) to every worker, and a failing worker sends
    BYE(reason) up, so the other side fails now instead of at its deadline.
Messages from peers that have not joined (garbage, strangers) are counted in `rejected` and
dropped; they never take the master down.
"""
from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
import zmq

from .collective import Collective, CollectiveError
from .fastpath import Spin
from .wire import PAYLOAD_DTYPE, DType, Header, Msg, WireError, decode, encode, tensor_to_array

HEARTBEAT_S = 1.0  # ZMTP PING interval; a peer silent for 5 of them is gone
MAX_GATHER_BYTES = 1 << 20  # what one rank may send to a gather (stats and such, not tensors)
MONITOR = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def text_of(frames) -> str:
    """The UTF-8 reason an ABORT, BYE or REJECT carries."""
    return bytes(frames[0].buffer).decode("utf-8", "replace") if frames else ""


def describe(h: Header) -> str:
    return f"{h.type.name} seq {h.seq} layer {h.layer} kind/command {h.code}"


def as_tensor(result: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """An owned tensor of `dtype` from the array an allreduce produced."""
    return torch.from_numpy(np.array(result, copy=True)).to(dtype)


class StarPeer(Collective):
    """One socket (ROUTER on the master, DEALER on a worker) with its monitor and poller, the payload
    codec, notes for error messages, failing (telling the other side) and teardown."""

    def __init__(self, rank: int, world_size: int, payload: str, socket_type: int):
        self.rank, self.world_size, self.payload = rank, world_size, PAYLOAD_DTYPE[payload]
        self.bytes_sent = self.bytes_received = 0
        self._seq, self._broken, self._closed = 0, None, False
        self._notes: dict[str, int] = {}  # handshake failures / rejections (with counts), for error messages
        self._spin = Spin()
        self._ctx, self._auth, self._monitor = zmq.Context(), None, None
        self._sock = self._ctx.socket(socket_type)
        self._sock.linger = 500  # ms to flush a final BYE/ABORT at close
        self._sock.heartbeat_ivl = int(HEARTBEAT_S * 1000)
        self._sock.heartbeat_timeout = int(5 * HEARTBEAT_S * 1000)
        try:
            self._monitor = self._sock.get_monitor_socket(MONITOR)
            self._poller = zmq.Poller()
            self._poller.register(self._sock, zmq.POLLIN)
            self._poller.register(self._monitor, zmq.POLLIN)
        except BaseException:
            self._teardown(linger=0)
            raise

    @abstractmethod
    def _tell(self, message: str) -> None:
        """Let the other side know this collective failed (master: ABORT to all; worker: BYE)."""

    @abstractmethod
    def _goodbye(self) -> None:
        """What close() sends before the socket goes."""

    def close(self) -> None:
        if self._closed:
            return
        self._goodbye()
        # a broken collective has told the others already (ABORT / BYE when it failed): do not wait
        # half a second on a message queued for a peer that died or stalled
        self._teardown(linger=500 if self._broken is None else 50)

    def _check(self) -> None:
        if self._closed:
            raise CollectiveError(f"rank {self.rank}: the collective is closed")
        if self._broken is not None:
            raise CollectiveError(f"rank {self.rank}: the collective is broken: {self._broken}")

    def _fail(self, message: str, tell: bool = True, ranks=()):
        """Mark the collective broken, tell the other side, raise (naming the `ranks` to blame)."""
        self._broken = message
        if tell:
            self._tell(message)
        raise CollectiveError(message, tuple(ranks))

    def _partial(self, tensor: torch.Tensor) -> tuple[np.ndarray, DType]:
        """An allreduce's partial as the array to add (float64 stays float64, anything else fp32) and
        its wire dtype: F64 for float64 partials with the fp32 payload (exact), else the payload's."""
        if tensor.dtype == torch.float64 and self.payload == DType.F32:
            return tensor_to_array(tensor)[1], DType.F64
        return tensor_to_array(tensor.float() if tensor.dtype != torch.float32 else tensor)[1], self.payload

    def _encode(self, arr: np.ndarray, dtype: DType | None = None) -> list:
        """Payload frames of `arr` as `dtype` (default: this collective's payload precision)."""
        try:
            return encode(arr, self.payload if dtype is None else dtype)
        except WireError as e:
            self._fail(f"rank {self.rank}: {e}")

    def _decode(self, h: Header, frames: list, sender: str, ranks=()):
        try:
            return decode(h, frames)
        except WireError as e:
            self._fail(f"{sender} sent a malformed payload: {e}", ranks=ranks)

    def _reason(self, kind: Msg, reason: str) -> list:
        """The frames of an ABORT, BYE or REJECT saying why."""
        msg = reason.encode()
        return [Header(kind, self.rank, self.world_size, 0, -1, 0, self._seq, DType.BYTES, (len(msg),)).pack(), msg]

    def _note(self, text: str) -> None:
        self._notes[text] = self._notes.get(text, 0) + 1

    def _noted(self) -> str:
        return f" ({'; '.join(f'{t} x{n}' for t, n in self._notes.items())})" if self._notes else ""

    def _teardown(self, linger: int) -> None:
        self._closed = True
        self._spin.close()
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        for s in (self._monitor, self._sock):
            if s is not None:
                s.close(linger=linger)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
