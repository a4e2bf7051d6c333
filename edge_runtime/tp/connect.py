"""make_collective: connect one rank to its tensor-parallel group with the backend its config names.

    comm = make_collective(TPConfig(world_size=3, master="10.0.0.2:29500", curve_keys="keys/"), rank=0)   # -> StarMaster
    comm = make_collective(TPConfig(world_size=3, master="10.0.0.2:29500", curve_keys="keys/"), rank=2)   # -> StarWorker

Blocks until every rank has joined (or raises CollectiveError naming the missing ranks after
config.join_timeout_s). World size 1 gives a LocalCollective: no sockets at all. `plan_checksum`
(launch.plan_checksum) lets the star master reject a worker that holds another plan's shards.
The backends import only the interface (collective.py), never this module.
"""
from __future__ import annotations

from .collective import Collective, LocalCollective
from .config import TPConfig


def make_collective(config: TPConfig, rank: int, plan_checksum: bytes = b"") -> Collective:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < config.world_size:
        raise ValueError(f"rank must be in 0..{config.world_size - 1}, got {rank!r}")
    if config.world_size == 1:
        return LocalCollective()
    if config.backend == "gloo":
        from .gloo import GlooCollective
        return GlooCollective(config, rank)
    if rank == 0:
        from .star_master import StarMaster
        return StarMaster(config, plan_checksum)
    from .star_worker import StarWorker
    return StarWorker(config, rank, plan_checksum)
