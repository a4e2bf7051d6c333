"""The collective interface the tensor-parallel engine talks to, and the factory for its backends.

    with make_collective("star", rank, world_size, "10.0.0.2:5555") as comm:
        out = comm.allreduce(partial, layer=i, kind=ATTN)       # (B, T, C) sum over ranks
        cmd, hidden = comm.broadcast(STEP, hidden, step=pos)    # master sends, workers receive

Two backends share this interface: `star` (ZeroMQ; the master sums in rank order and sends the
sum back, one round trip per allreduce; see star.py) and `gloo` (torch.distributed's ring; see
gloo.py). With world_size 1 both are a no-op that returns its input.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

ATTN, MLP = 0, 1  # allreduce kinds (they travel in the header so a desync is caught)
STEP, RESET, SHUTDOWN = 1, 2, 3  # broadcast commands used by the engine
PAYLOADS = ("fp32", "fp16", "int8")


class CollectiveError(RuntimeError):
    """A peer died, hung past its deadline, or sent a malformed or out-of-order message.

    The message names the rank. After one of these the collective is broken: every later call
    raises again (the master has already told the other workers to abort)."""


class Collective(ABC):
    rank: int
    world_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    last_step: int = 0  # the `step` field of the last broadcast (positions start of a STEP)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def allreduce(self, tensor: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        """Sum `tensor` over all ranks; every rank gets the same bits. The master adds the
        partials in fp32 in rank order 0, 1, 2, ... `kind`: ATTN or MLP."""

    @abstractmethod
    def broadcast(self, command: int, tensor: torch.Tensor | None = None,
                  step: int = 0) -> tuple[int, torch.Tensor | None]:
        """Master: send (command, tensor, step) to every worker and return (command, tensor).
        Worker: arguments are ignored; block until the master's next broadcast and return it
        (its `step` is in `self.last_step`)."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets; the master tells the workers it is leaving. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalCollective(Collective):
    """World size 1: nothing to talk to. The same code path as N ranks, with no network."""

    def __init__(self):
        self.rank, self.world_size = 0, 1

    def allreduce(self, tensor, layer, kind):
        return tensor

    def broadcast(self, command, tensor=None, step=0):
        self.last_step = step
        return command, tensor

    def close(self):
        pass


def parse_address(master: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a clear error otherwise."""
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f"master: expected HOST:PORT with PORT in 1..65534, got {master!r}")
    return host.strip("[]"), int(port)


def make_collective(backend: str, rank: int, world_size: int, master: str, payload: str = "fp32",
                    timeout_s: float = 2.0, curve_keys: Path | None = None, **options) -> Collective:
    """Build and connect a collective. Blocks until every rank has joined (or raises
    CollectiveError naming the missing ranks after `join_timeout_s`).

    backend: "star" | "gloo"; master: "host:port" of rank 0 (gloo also uses port+1);
    payload: "fp32" | "fp16" | "int8" (int8: star only); timeout_s: how long the master waits for
    a worker's partial; curve_keys: folder from `make_keys` (star only).
    options (star and gloo): join_timeout_s=30.0, idle_timeout_s=None (a worker's wait for the
    next broadcast; None = as long as the master is alive), work_timeout_s=30.0 (a worker's wait
    for the sum). Star only: plan_checksum=b"" (workers with a different one are rejected),
    heartbeat_s=1.0."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if payload not in PAYLOADS:
        raise ValueError(f"payload must be one of {PAYLOADS}, got {payload!r}")
    if world_size == 1:
        return LocalCollective()
    if backend == "star":
        from .star import StarCollective
        return StarCollective(rank, world_size, master, payload, timeout_s, curve_keys, **options)
    if backend == "gloo":
        if curve_keys is not None:
            raise ValueError("curve_keys: CURVE encryption is only available with backend 'star'")
        from .gloo import GlooCollective
        return GlooCollective(rank, world_size, master, payload, timeout_s, **options)
    raise ValueError(f"backend must be 'star' or 'gloo', got {backend!r}")
