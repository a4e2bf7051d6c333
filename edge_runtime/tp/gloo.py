"""The same Collective over torch.distributed's gloo backend (a ring), for comparison.

    comm = GlooCollective(TPConfig(world_size=3, master="10.0.0.2:5555", backend="gloo", insecure=True), rank)
    # rendezvous at tcp://10.0.0.2:5556

Rendezvous uses the TCP store at the master's port + 1; gloo then opens its own peer-to-peer
connections (every rank to every rank, on ports it picks), so a proxy in front of the master does
not sit on gloo's data path. allreduce is dist.all_reduce (ring: reduce-scatter then all-gather,
2 (N-1) sequential steps; the summation order is gloo's, so fp32 results match the rank-order sum
to within rounding, not bit for bit; the quantized ranks' float64 partials, exact sums of bf16
values, are summed in float64 and give the same bits in any order). broadcast sends a small int64
header tensor [command, step, steps_from, dtype, ndim, shape x 8] and then the raw bytes of the tensor. gather all-gathers
the payload lengths, then gathers the payloads to rank 0 as uint8 tensors padded to the longest
(torch's gather_object would pickle).

Deadlines: rendezvous `join_timeout_s`; allreduce and gather `timeout_s` on the master and
WORK_TIMEOUT_S on a worker (groups created with that timeout); a worker's wait for the next
broadcast IDLE_TIMEOUT_S (gloo has no heartbeats, but a peer that exits closes its connections and
fails the wait at once). Gloo does not say which rank failed, so the CollectiveError carries
gloo's own message. Payloads: fp32, fp16. bytes_sent/bytes_received are estimates from the
algorithms (gloo does not count them).
"""
from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .collective import Collective, CollectiveError
from .config import TPConfig
from .wire import MAX_NDIM, NUMPY, DType, array_to_tensor, tensor_to_array

_HEADER = 5 + MAX_NDIM  # command, step, steps_from, dtype, ndim, shape
WORK_TIMEOUT_S = 30.0  # a worker's wait for the sum (or for a gather to complete)
IDLE_TIMEOUT_S = 3600.0  # a worker's wait for the next broadcast


def rendezvous_port(port: int) -> int:
    """gloo's TCP store listens on the master's port + 1, so that port must exist."""
    if port >= 65535:
        raise ValueError(f"master: the gloo backend also uses PORT + 1 for its rendezvous, so PORT must be "
                         f"at most 65534, got {port}")
    return port + 1


class GlooCollective(Collective):
    def __init__(self, config: TPConfig, rank: int):
        if dist.is_initialized():
            raise CollectiveError(f"rank {rank}: torch.distributed is already initialised in this process")
        host, port = config.address
        store = rendezvous_port(port)
        self.rank, self.world_size, self.bytes_sent, self.bytes_received = rank, config.world_size, 0, 0
        self._wire = torch.float32 if config.payload == "fp32" else torch.float16
        self._closed = False
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{host}:{store}", rank=rank,
                                    world_size=config.world_size, timeout=timedelta(seconds=config.join_timeout_s))
            # the master waits timeout_s for partials; a worker waits WORK_TIMEOUT_S for the sum
            op_timeout = config.timeout_s if rank == 0 else WORK_TIMEOUT_S
            self._ops = dist.new_group(backend="gloo", timeout=timedelta(seconds=op_timeout))
            self._idle = dist.new_group(backend="gloo", timeout=timedelta(seconds=IDLE_TIMEOUT_S))
        except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
            self.close()
            raise CollectiveError(f"rank {rank}: gloo rendezvous at {host}:{store} failed: {e}") from e

    def allreduce(self, tensor: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        self._check()
        wire = torch.float64 if tensor.dtype == torch.float64 and self._wire == torch.float32 else self._wire
        buf = tensor.detach().to(wire, copy=True).contiguous()
        try:
            dist.all_reduce(buf, group=self._ops)
        except RuntimeError as e:
            raise CollectiveError(f"rank {self.rank}: gloo allreduce of layer {layer} kind {kind} failed "
                                  f"(a peer died, hung or desynchronised; gloo does not say which): {e}") from e
        n = buf.numel() * buf.element_size()
        ring = 2 * (self.world_size - 1) * n // self.world_size  # what each rank sends (and receives)
        self.bytes_sent += ring
        self.bytes_received += ring
        return buf.to(tensor.dtype)

    def broadcast(self, command: int, tensor: torch.Tensor | None = None, step: int = 0, steps_from: int = -1):
        self._check()
        header = torch.zeros(_HEADER, dtype=torch.int64)  # [command, step, steps_from, dtype, ndim, shape...]
        if self.rank == 0:
            code, arr = tensor_to_array(tensor) if tensor is not None else (DType.NONE, None)
            shape = () if arr is None else arr.shape
            header[:5] = torch.tensor([command, step, steps_from, int(code), len(shape)])
            header[5:5 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
        try:
            dist.broadcast(header, src=0, group=self._idle)
            command, step, steps_from, code, ndim = (int(v) for v in header[:5])
            shape = tuple(int(v) for v in header[5:5 + ndim])
            if code == DType.NONE:
                payload = None
            elif self.rank == 0:
                payload = torch.from_numpy(arr.reshape(-1).view("uint8").copy())
            else:
                payload = torch.empty(math.prod(shape) * np.dtype(NUMPY[DType(code)]).itemsize, dtype=torch.uint8)
            if payload is not None:
                dist.broadcast(payload, src=0, group=self._idle)
        except RuntimeError as e:
            raise CollectiveError(f"rank {self.rank}: gloo broadcast failed (lost the master or a peer): {e}") from e
        nbytes = header.numel() * 8 + (0 if payload is None else payload.numel())
        if self.rank == 0:
            self.bytes_sent += nbytes * (self.world_size - 1)
        else:
            self.bytes_received += nbytes
        self.last_step, self.last_steps_from = step, steps_from
        if self.rank == 0:
            return command, tensor
        if payload is None:
            return command, None
        return command, array_to_tensor(DType(code), payload.numpy().view(NUMPY[DType(code)]).reshape(shape))

    def gather(self, data: bytes) -> list[bytes] | None:
        self._check()
        data = bytes(data)
        try:
            lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=self._ops)
            longest = max(int(n) for n in lengths)
            own = torch.zeros(longest, dtype=torch.uint8)  # (longest,) this rank's bytes, zero-padded
            if data:
                own[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(own, bufs, dst=0, group=self._ops)
        except RuntimeError as e:
            raise CollectiveError(f"rank {self.rank}: gloo gather failed (a peer died, hung or "
                                  f"desynchronised; gloo does not say which): {e}") from e
        if self.rank != 0:
            self.bytes_sent += longest
            return None
        self.bytes_received += longest * (self.world_size - 1)
        return [bytes(b[:int(n)].numpy()) for b, n in zip(bufs, lengths)]

    def close(self) -> None:
        if not self._closed and dist.is_initialized():
            dist.destroy_process_group()
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise CollectiveError(f"rank {self.rank}: the collective is closed")
