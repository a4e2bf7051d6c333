"""Starting the ranks of a tensor-parallel group: a free port, the shard cache, local worker
processes, a worker's shard folder, and rank 0 (connected and loaded).

    config = TPConfig(world_size=3, master=f"127.0.0.1:{free_port()}", window=2)
    shards = cached_shards(Path("hf_dir"), 3, [1, 1, 2], DEFAULT_CACHE)   # prepared once per (model, plan)
    workers = LocalWorkers(shards, config)           # `edge-runtime tp worker` for ranks 1..2, on loopback
    try:
        master = start_master(shards, config)        # joins them (engine.Master)
        ...
    finally:
        workers.stop()

    folder = rank_folder(shards, 1)                  # on another device: rank 1 (`edge-runtime tp worker`)
    run_worker(folder, join_as_worker(folder, 1, config), config.window)

Nothing here imports torch until a master or a worker starts (prepare and the engine do), so the
CLI and an agent can import it cheaply.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import TPConfig

DEFAULT_CACHE = Path(os.environ.get("EDGEFOLD_CACHE", Path.home() / ".cache" / "edgefold")) / "tp-shards"


def free_port() -> int:
    """A free loopback port whose successor is free too (gloo uses port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65534:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise OSError("no free loopback port pair found")


def plan_checksum(plan) -> bytes:
    """What a star worker shows the master when it joins: ranks of different plans never mix."""
    return hashlib.sha256(plan.to_json().encode()).hexdigest()[:16].encode()


def model_fingerprint(model: Path) -> str:
    """Which weights a rank holds, so a group never mixes two checkpoints of one architecture (a
    fine-tune and its base): a hash of every weight file's name, size and first and last 64 KiB (a
    .gguf file itself, or a folder's *.safetensors) and of its config.json. The same download hashes
    alike on every machine, whatever its path or mtime."""
    model = Path(model)
    files = [model] if model.is_file() else sorted(model.glob("*.safetensors")) + [model / "config.json"]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
            fh.seek(max(0, size - (1 << 16)))
            tail = fh.read(1 << 16)
        h.update(f"{f.name}:{size}:".encode() + hashlib.sha256(head + tail).digest())
    return h.hexdigest()[:16]


def cached_shards(model: Path, world_size: int, weights, cache_dir: Path, progress: bool = True,
                  max_rank_memory: int | None = None, quantize=None, ranks=None, dtype: str = "fp32") -> Path:
    """Prepared shards for (model, plan), made once: cache_dir/<config hash>-<source>-<plan hash>;
    the plan holds the weight format (`quantize`, a split.llama.quantize handler) and the budget.
    `ranks`: only those ranks' folders (a peer of an elastic group prepares its own part; the folder
    name then ends in -r<ranks>). A `.gguf` file is first indexed once into a small model folder
    under cache_dir/gguf (gguf_source: config, tokenizer, no weights; prepare reads the file itself)."""
    from split.llama import LlamaConfig

    from .gguf_source import model_folder
    from .prepare import is_prepared, make_format_plan, prepare

    model = model_folder(model, Path(cache_dir) / "gguf", progress)
    config = LlamaConfig.from_dir(model)
    plan = make_format_plan(config, world_size, weights, quantize, max_rank_memory, dtype)
    src = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:8]
    part = "" if ranks is None else "-r" + "_".join(str(r) for r in sorted(set(ranks)))
    out = Path(cache_dir) / f"{plan.model['config_hash']}-{src}-{plan_checksum(plan).decode()}{part}"
    if not (is_prepared(out, plan, ranks) and _newer_than_checkpoint(out, model)):
        prepare(model, world_size, weights, out, progress, max_rank_memory, quantize, ranks, dtype)  # written aside, renamed when complete
    return out


def _newer_than_checkpoint(out: Path, model: Path) -> bool:
    stamp = (out / "plan.json").stat().st_mtime
    return all(p.stat().st_mtime <= stamp for p in model.glob("*.safetensors"))


def rank_folder(shards: Path, rank: int) -> Path:
    """A worker's folder: `shards` itself, or its rank{r} when given the whole `tp prepare` output."""
    shards = Path(shards)
    if not (shards / "config.json").is_file() and (shards / f"rank{rank}").is_dir():
        return shards / f"rank{rank}"
    return shards


def loopback(master: str) -> str:
    """The address a worker on this machine dials to reach a master bound to `master`."""
    return master.replace("0.0.0.0", "127.0.0.1")


class LocalWorkers:
    """Workers 1..N-1 as `edge-runtime tp worker` subprocesses on loopback, dialing config.master;
    stop() always ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, shards: Path, config: TPConfig):
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.logdir = Path(tempfile.mkdtemp(prefix="edgefold-tp-workers-"))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.world_size)))
        for r in range(1, config.world_size):
            cmd = [sys.executable, "-m", "edge_runtime.cli", "tp", "worker", "--rank", str(r),
                   "--master", loopback(config.master), "--shards", str(Path(shards) / f"rank{r}"),
                   *(["--window", str(config.window)] if config.window is not None else []),
                   "--backend", config.backend, "--payload", config.payload, "--dtype", config.dtype,
                   "--timeout-s", str(config.timeout_s), "--join-timeout-s", str(config.join_timeout_s)]
            if config.curve_keys is not None:
                cmd += ["--curve-keys", str(config.curve_keys)]
            self.logs[r] = self.logdir / f"rank{r}.log"
            with open(self.logs[r], "wb") as log:
                self.procs[r] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 stdin=subprocess.DEVNULL)
            pin(self.procs[r].pid, r, config.world_size)  # before its interpreter starts any thread

    def describe_failures(self) -> str:
        notes = []
        for r, p in self.procs.items():
            code = p.poll()
            if code not in (None, 0):
                tail = self.logs[r].read_text(errors="replace").strip().splitlines()[-3:]
                notes.append(f"worker rank {r} exited with status {code}" + (f": {' | '.join(tail)}" if tail else ""))
        return "; ".join(notes)

    def stop(self, grace_s: float = 5.0) -> None:
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.logdir, ignore_errors=True)


def share_cores(world_size: int) -> None:
    """Ranks on one machine share its cores: this process (rank 0) takes its part of torch's threads,
    on cores of its own (pin)."""
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    pin(0, 0, world_size)


def rank_cpus(rank: int, world_size: int) -> set[int] | None:
    """The cores local rank `rank` of `world_size` keeps: its equal, contiguous part of this process's
    affinity mask (2 cores, 2 ranks: {0}, {1}); None with fewer cores than ranks, or no affinity."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    n = len(cpus) // world_size
    return set(cpus[rank * n:(rank + 1) * n]) if n else None


def pin(pid: int, rank: int, world_size: int) -> None:
    """Keep process `pid` (0: the calling thread, and the threads it starts after) on rank_cpus.

    Each rank (its OpenMP threads, ZeroMQ's I/O thread, its busy-poll for a partial or a sum) then
    stays off the other ranks' cores. Measured alone it changed little (46M, world 2 on 2 cores,
    ~30 ms/token either way); the shared-memory allreduce (shm.py) relies on each rank having a core."""
    cpus = rank_cpus(rank, world_size)
    if cpus:
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass  # the process is gone, or the mask is not ours to set: run unpinned


def start_master(shards: Path, config: TPConfig):
    """Rank 0 of `shards` (a `tp prepare` output), connected to the group (its workers must join
    within config.join_timeout_s) and loaded: an engine.Master. Closes what it opened on failure."""
    from .connect import make_collective
    from .engine import Master
    from .plan import ShardPlan

    plan = ShardPlan.load(Path(shards) / "plan.json")
    if plan.world_size != config.world_size:
        raise ValueError(f"world_size: the shards were prepared for {plan.world_size} ranks, not {config.world_size}")
    collective = make_collective(config, 0, plan_checksum(plan))
    return Master(Path(shards) / "rank0", collective, config.window, config.torch_dtype)  # closes the collective if it fails


def join_as_worker(folder: Path, rank: int, config: TPConfig):
    """Check that `folder` holds rank `rank`'s shards of a plan for config.world_size ranks, then join
    the group: the worker's collective (CollectiveError when the master is not there in time)."""
    from split.llama import LlamaConfig

    from .connect import make_collective
    from .plan import ShardPlan

    plan = ShardPlan.load(Path(folder) / "plan.json")
    plan.check(LlamaConfig.from_dir(folder), rank)  # before joining: a wrong folder fails here
    if plan.world_size != config.world_size:
        raise ValueError(f"world_size {config.world_size} does not match the plan's world_size {plan.world_size}")
    return make_collective(config, rank, plan_checksum(plan))
