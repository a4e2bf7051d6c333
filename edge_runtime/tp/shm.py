"""Allreduce through shared memory between ranks on one host: the star's partial and sum without
ZeroMQ (fastpath.py's unix socket still carries every other message).

    link = ShmLink.create()                   # master, for one local worker: a file in /dev/shm
    link = ShmLink.open(name)                 # that worker, given link.name in WELCOME
    link.put(UP, seq, partial)                # worker -> master
    acc += link.get(UP, seq, shape, np.float32, idle)   # master: busy-polls until partial `seq` is there

Why: a message through ZeroMQ crosses two I/O threads, and on a small VM each hop is a wakeup
(46M, world 2 on 2 cores: 24 allreduces per token cost ~10 ms of a 30 ms token; one round trip of
2 KiB over ipc takes ~130 us, through a shared page ~3 us).

Layout: two mailboxes, UP (the worker's partial) and DOWN (the sum), each a 64-byte slot whose
first int64 is the seq of the payload behind it, then CAPACITY bytes of float32 (or float64: the
quantized ranks' exact partials, parallelize.exact_partials; both sides know which from their own
partial). A writer fills the payload, then publishes the seq; a reader waits for its seq, then copies the payload out. Mailboxes
are never overwritten before they are read: the next partial follows the sum, which follows this
partial. x86-64 keeps ordinary stores (and loads) in program order, and the locked instruction
of a lock's acquire (_fence) also orders string and non-temporal stores a copy may use, so a
reader that sees the seq sees the payload: the link is offered only there (available()).
Only fp32 (fp64) payloads of at most CAPACITY bytes go this way; larger ones (long prompts) take
ZeroMQ, which both sides decide alike from the shape and dtype.
"""
from __future__ import annotations

import mmap
import os
import platform
import tempfile
import threading
import time

import numpy as np

UP, DOWN = 0, 1
SLOT = 64  # bytes before each payload: the seq (int64), padded to a cache line
CAPACITY = 1 << 20  # payload bytes per mailbox (fp32: 262144 values; pages are touched only when used)
SHM_DIR = "/dev/shm"
SPIN_S = 2e-3  # busy-poll (yielding) this long, then sleep SLEEP_S between looks
SLEEP_S = 50e-6
_FENCE = threading.Lock()


def _fence() -> None:
    with _FENCE:  # a locked read-modify-write: on x86-64, every earlier store is visible before any later one
        pass
def available() -> bool:
    """A writable /dev/shm on a CPU that keeps stores in order (x86-64's TSO). On ARM (a Raspberry
    Pi, a Jetson) a store may become visible before an earlier one, and Python has no fence to
    order the payload before its seq for another process (a lock orders this process's threads):
    ranks there keep the unix socket, which is exact everywhere."""
    return (platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)
            and os.access(SHM_DIR, os.W_OK))


class ShmLink:
    """A master-worker pair's two mailboxes in one mapped file."""

    def __init__(self, path: str, create: bool):
        self.name = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, 2 * (SLOT + CAPACITY))
            self._map = mmap.mmap(fd, 2 * (SLOT + CAPACITY))
        finally:
            os.close(fd)
        self._seq = [np.frombuffer(self._map, np.int64, 1, box * (SLOT + CAPACITY)) for box in (UP, DOWN)]

    @classmethod
    def create(cls) -> ShmLink:
        fd, path = tempfile.mkstemp(prefix="edgefold-tp-", dir=SHM_DIR)
        os.close(fd)
        os.unlink(path)  # recreated exclusively below, so nobody else holds it
        return cls(path, create=True)

    @classmethod
    def open(cls, path: str) -> ShmLink:
        if not (path.startswith(SHM_DIR + "/edgefold-tp-") and "/" not in path[len(SHM_DIR) + 1:]):
            raise ValueError(f"not a shared-memory link name: {path!r}")
        link = cls(path, create=False)
        link.unlink()  # both sides have it mapped: nothing is left behind if either dies
        return link

    @staticmethod
    def fits(nbytes: int) -> bool:
        return nbytes <= CAPACITY

    def put(self, box: int, seq: int, arr: np.ndarray) -> None:
        """Publish `arr` (float32 or float64, at most CAPACITY bytes) as message `seq` of mailbox `box`."""
        off = box * (SLOT + CAPACITY) + SLOT
        np.frombuffer(self._map, arr.dtype, arr.size, off)[:] = arr.reshape(-1)
        _fence()
        self._seq[box][0] = seq

    def ready(self, box: int, seq: int) -> bool:
        """Is message `seq` of mailbox `box` there now?"""
        return int(self._seq[box][0]) == seq

    def get(self, box: int, seq: int, shape: tuple, dtype, idle) -> np.ndarray | None:
        """Message `seq` of mailbox `box` (a copy, `dtype` of `shape`) once it is there. While waiting,
        idle() is called every ~1 ms; it raises to give up (deadline, the peer gone)."""
        flag = self._seq[box]
        if flag[0] != seq:
            start = last = time.perf_counter()
            while flag[0] != seq:
                now = time.perf_counter()
                if now - last > 1e-3:
                    idle()
                    last = now
                if now - start < SPIN_S:
                    os.sched_yield()  # the core goes to whatever else wants it first
                else:
                    time.sleep(SLEEP_S)
        _fence()
        n = int(np.prod(shape))
        return np.frombuffer(self._map, dtype, n, box * (SLOT + CAPACITY) + SLOT).reshape(shape).copy()

    def unlink(self) -> None:
        try:
            os.unlink(self.name)
        except OSError:
            pass

    def close(self) -> None:
        self._seq = []
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the process
            pass
