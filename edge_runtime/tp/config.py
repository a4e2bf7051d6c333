"""TPConfig: what the `tp` command line (or an agent's `tp` pipeline) says about a tensor-parallel group.

    config = TPConfig(world_size=3, master="10.0.0.2:29500", window=2, payload="fp16", curve_keys="keys/")
    collective = make_collective(config, rank=1)          # connect.py
    workers = LocalWorkers(shards, config)                # launch.py: ranks 1..N-1 on this machine

One frozen object travels from the parser to the launcher, the collective and rank 0; nothing
below the CLI sees an argparse namespace. It is checked when made: a bad value raises ValueError
naming the field. Every rank of a group must be given the same backend and payload. Ranks that
would talk over an address beyond loopback (a LAN address, or the 0.0.0.0 wildcard a master binds)
need CURVE keys, unless `insecure` says the network is trusted: a peer link carries the prompt and
the model's activations, and an open port lets anyone on the network join the group.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from devices.address import is_loopback, parse_address

BACKENDS = ("star", "gloo")
PAYLOADS = ("fp32", "fp16", "int8")
DTYPES = ("fp32", "bf16")  # the compute dtype of the float (unquantized) weights


@dataclass(frozen=True)
class TPConfig:
    world_size: int = 1
    master: str = ""  # HOST:PORT rank 0 binds and workers dial (gloo also uses PORT + 1); unused at world size 1
    backend: str = "star"  # "star" (ZeroMQ, star_master.py / star_worker.py) or "gloo" (torch.distributed)
    payload: str = "fp32"  # allreduce payload precision: "fp32", "fp16" or "int8" (int8: star only)
    window: int | None = None  # weight blocks resident per rank (0 = all; None = each rank's from the plan)
    timeout_s: float = 2.0  # how long the master waits for a worker's partial
    join_timeout_s: float = 60.0  # how long every rank waits for the group to form
    curve_keys: Path | None = None  # folder from `tp keys`: encrypted, authenticated links (star only)
    dtype: str = "fp32"  # float weights held and multiplied in "fp32" or "bf16" (quantized ones: bf16 kernels)
    insecure: bool = False  # allow ranks to talk beyond loopback without curve_keys (a network you trust)

    def __post_init__(self):
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.payload not in PAYLOADS:
            raise ValueError(f"payload must be one of {PAYLOADS}, got {self.payload!r}")
        if self.backend == "gloo" and self.payload == "int8":
            raise ValueError("payload: the gloo backend supports 'fp32' or 'fp16', got 'int8'")
        if self.backend == "gloo" and self.curve_keys is not None:
            raise ValueError("curve_keys: CURVE encryption is only available with backend 'star'")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 0):
            raise ValueError(f"window must be an integer >= 0 (0 = every block resident), got {self.window!r}")
        for name in ("timeout_s", "join_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.master:
            parse_address(self.master, "master")
        elif self.world_size > 1:
            raise ValueError(f"master: world size {self.world_size} needs the HOST:PORT of rank 0")
        if self.curve_keys is not None:
            object.__setattr__(self, "curve_keys", Path(self.curve_keys))
        elif self.world_size > 1 and not self.insecure and not is_loopback(self.address[0]):
            raise ValueError(f"master: ranks would talk over {self.master}, which reaches beyond this machine, "
                             "without encryption or authentication: give curve_keys (`edge-runtime tp keys`; "
                             "--curve-keys) or, on a network you trust, insecure (--insecure)")

    @property
    def torch_dtype(self):
        import torch
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of rank 0."""
        return parse_address(self.master, "master")
