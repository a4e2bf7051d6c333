"""The collective interface the tensor-parallel engine talks to, and its one-device case.

    out = comm.allreduce(partial, layer=i, kind=ATTN)       # (B, T, C) summed over ranks
    cmd, hidden = comm.broadcast(STEP, hidden, step=pos)    # the master sends, workers receive
    comm.broadcast(STEP, hidden, step=0, steps_from=7)      # a re-prefill: rows 7.. were decode steps
    rows = comm.gather(json.dumps(stats).encode())          # the master gets every rank's bytes

Backends behind it: star_master.py / star_worker.py (ZeroMQ; the master sums in rank order and
sends the sum back, one round trip per allreduce) and gloo.py (torch.distributed's ring); build
one with connect.make_collective(config, rank). LocalCollective is world size 1: every operation
returns its input, so one device runs the same code with no network.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

ATTN, MLP = 0, 1  # allreduce kinds (they travel in the header so a desync is caught)
STEP, RESET, SHUTDOWN, STATS = 1, 2, 3, 4  # broadcast commands used by the engine


class CollectiveError(RuntimeError):
    """A peer died, hung past its deadline, or sent a malformed or out-of-order message.

    The message names the rank; on the master `ranks` holds the ranks to blame (empty when it
    cannot tell), which is what a group drops before it re-plans (group.py). After one of these the
    collective is broken: every later call raises again (the master has already told the other
    workers to abort)."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.ranks = tuple(ranks)


class Collective(ABC):
    rank: int
    world_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    last_step: int = 0  # the `step` field of the last broadcast (positions start of a STEP)
    last_steps_from: int = -1  # its `steps_from` (a STEP re-feeding decode steps: engine.Shard.layers)

    @abstractmethod
    def allreduce(self, tensor: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        """Sum `tensor` over all ranks; every rank gets the same bits, in the tensor's dtype. The
        master adds the partials in rank order 0, 1, 2, ..., in float64 for float64 partials (the
        quantized ranks' exact sums: parallelize.exact_partials), else in fp32. `kind`: ATTN or MLP."""

    @abstractmethod
    def broadcast(self, command: int, tensor: torch.Tensor | None = None, step: int = 0,
                  steps_from: int = -1) -> tuple[int, torch.Tensor | None]:
        """Master: send (command, tensor, step, steps_from) to every worker and return (command, tensor).
        Worker: arguments are ignored; block until the master's next broadcast and return it
        (its `step` and `steps_from` are in `self.last_step`, `self.last_steps_from`)."""

    @abstractmethod
    def gather(self, data: bytes) -> list[bytes] | None:
        """Every rank calls it with a small payload (JSON text, say). Master: every rank's bytes in
        rank order, waiting at most its timeout for each worker. Worker: sends, returns None."""

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

    def broadcast(self, command, tensor=None, step=0, steps_from=-1):
        self.last_step, self.last_steps_from = step, steps_from
        return command, tensor

    def gather(self, data):
        return [bytes(data)]

    def close(self):
        pass
