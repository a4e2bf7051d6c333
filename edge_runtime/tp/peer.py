"""An elastic peer: a worker that holds the model and serves whichever rank of whichever plan a master asks.

    edge-runtime tp worker --model MODEL_DIR_OR.gguf --listen 0.0.0.0:29600 --curve-keys keys/ \
        [--name pi-2] [--profile raspberry-pi-5] [--max-memory 3GiB] [--advertise pi-2]

    serve_peer(PeerSetup(model=Path("model"), listen="127.0.0.1:29600"))     # returns at SIGTERM / Ctrl-C

It waits on its control port (control.py) for a master (group.py):
  describe  -> its name, profile, model identity and state ("idle")
  serve     -> world size, its rank, the shares, weight format and memory budget, the master's data port
               and the group's epoch: it checks the plan fits (a clear refusal with the figures if not),
               answers, prepares its rank's shards (cached: edge_runtime.tp.launch.cached_shards, its rank
               only), prepares the plans it was told to keep warm (the group without each other member, so
               a re-plan after a loss finds its shards ready), joins the star collective as that rank and
               runs the worker loop (engine.run_worker). When the group ends (SHUTDOWN, or the master
               aborts after losing a peer) it goes back to waiting; nothing the master sends ends the peer.
A peer serves one group at a time; while it serves, its control port queues questions and answers
them when it is back. Its own settings (keys, --insecure) decide how it talks; a request cannot
weaken them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .control import ControlServer

DATA_FIELDS = ("payload", "dtype")


@dataclass(frozen=True)
class PeerSetup:
    model: Path                      # a Hugging Face folder or a .gguf file
    listen: str                      # HOST:PORT of the control port (port 0: the OS picks)
    cache_dir: Path | None = None    # prepared shards (default: the tp CLI's cache)
    name: str = ""                   # how the master's logs and health name this peer (default: its address)
    profile: dict = field(default_factory=dict)  # what it says about itself: memory_bandwidth_gbs, memory_bytes
    curve_keys: Path | None = None
    insecure: bool = False
    join_timeout_s: float = 60.0
    advertise: str = ""              # advertise the control port under this name (DNS-SD, discovery.py)


class Peer:
    """The state behind the control port: the model's identity, and what to do with one request."""

    def __init__(self, setup: PeerSetup, log=print):
        from split.llama import LlamaConfig

        from .engine import run_worker  # imported now, so a serve request is answered at once
        from .gguf_source import model_folder
        from .launch import DEFAULT_CACHE, model_fingerprint

        from .prepare import make_format_plan
        self.setup, self.log = setup, log
        self.make_plan, self.run_worker = make_format_plan, run_worker
        self.cache_dir = Path(setup.cache_dir or DEFAULT_CACHE)
        self.model_dir = model_folder(Path(setup.model), self.cache_dir / "gguf", False)
        self.config = LlamaConfig.from_dir(self.model_dir)
        self.identity = model_fingerprint(Path(setup.model))
        self.profile = dict(setup.profile)  # what it tells masters about itself
        self.served = 0

    def describe(self, name: str) -> dict:
        return {"ok": True, "name": name, "profile": self.profile, "model": self.identity, "state": "idle",
                "served": self.served}

    def check(self, request: dict) -> dict:
        """The serve request, checked: its plan arguments (ValueError naming what is wrong)."""
        from split.llama.quantize import handler_from_dict

        if request.get("model") != self.identity:
            raise ValueError(f"this peer holds model {self.identity}, the master asked for {request.get('model')!r}")
        job = {k: request.get(k) for k in ("world_size", "rank", "weights", "quantize", "max_rank_memory", "epoch",
                                           "master_port", "window", "timeout_s", *DATA_FIELDS)}
        world, rank = job["world_size"], job["rank"]
        if not (type(world) is int and 2 <= world <= 256 and type(rank) is int and 1 <= rank < world):
            raise ValueError(f"world_size {world!r} / rank {rank!r}: expected 1 <= rank < world_size <= 256")
        if not (type(job["master_port"]) is int and 1 <= job["master_port"] <= 65535 and type(job["epoch"]) is int):
            raise ValueError("master_port and epoch must be integers")
        if job["timeout_s"] is not None and not (type(job["timeout_s"]) in (int, float) and 0 < job["timeout_s"] <= 600):
            raise ValueError(f"timeout_s must be a number of seconds in (0, 600], got {job['timeout_s']!r}")
        budget = job["max_rank_memory"]
        if budget is not None and not (type(budget) is int and budget > 0):
            raise ValueError(f"max_rank_memory must be a positive integer or null, got {budget!r}")
        job["format"] = handler_from_dict(job["quantize"])
        if job["dtype"] not in (None, "fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {job['dtype']!r}")
        job["dtype"] = job["dtype"] or "fp32"
        self.make_plan(self.config, world, job["weights"], job["format"], budget, job["dtype"])  # fits?
        job["warm"] = [w for w in request.get("warm") or [] if isinstance(w, dict)]
        return job

    def serve(self, job: dict, master_host: str) -> None:
        """Prepare, warm, join and work until the group ends; failures are logged, never raised."""
        from .collective import CollectiveError
        from .config import TPConfig
        from .connect import make_collective
        from .launch import plan_checksum
        from .plan import ShardPlan

        rank, world = job["rank"], job["world_size"]
        try:
            folder = self._shards(world, job["weights"], job["format"], job["max_rank_memory"], rank, job["dtype"])
            for w in job["warm"]:  # the plans a loss would lead to: ready before they are needed
                try:
                    self._shards(int(w["world_size"]), w["weights"], job["format"], w.get("max_rank_memory"),
                                 int(w["rank"]), job["dtype"])
                except (KeyError, TypeError, ValueError, OSError) as err:
                    self.log(f"tp peer: cannot prepare a warm plan {w!r}: {err}")
            config = TPConfig(world_size=world, master=f"{f'[{master_host}]' if ':' in master_host else master_host}"
                              f":{job['master_port']}", payload=job["payload"] or "fp32", dtype=job["dtype"],
                              window=job["window"], timeout_s=float(job["timeout_s"] or 2.0),
                              join_timeout_s=self.setup.join_timeout_s, curve_keys=self.setup.curve_keys,
                              insecure=self.setup.insecure)
            plan = ShardPlan.load(folder / "plan.json")
            token = plan_checksum(plan) + f".{job['epoch']}".encode()
            collective = make_collective(config, rank, token)
        except (CollectiveError, ValueError, TypeError, OSError) as err:
            self.log(f"tp peer: could not join as rank {rank} of {world}: {err}")
            return
        self.served += 1
        self.log(f"tp peer: serving rank {rank} of {world} (epoch {job['epoch']})")
        try:
            code = self.run_worker(folder, collective, config.window, log=self.log, dtype=config.torch_dtype)
        except Exception as err:  # a shard that does not load, say: this group fails, the peer stays
            self.log(f"tp peer: rank {rank} failed: {type(err).__name__}: {err}")
            return
        self.log(f"tp peer: the group ended ({'shut down' if code == 0 else 'aborted'}); waiting for a master")

    def _shards(self, world: int, weights, fmt, budget, rank: int, dtype: str) -> Path:
        from .launch import cached_shards
        return cached_shards(self.model_dir, world, weights, self.cache_dir, False, budget, fmt, ranks=[rank],
                             dtype=dtype) / f"rank{rank}"


def serve_peer(setup: PeerSetup, log=print, on_listening=None) -> int:
    """Answer masters until Ctrl-C (returns 0; the CLI turns SIGTERM into SystemExit, which closes the
    sockets on its way out). on_listening(address) is called once the control port is bound (with
    port 0, the address says which port the OS picked)."""
    peer = Peer(setup, log)
    try:
        with ControlServer(setup.listen, setup.curve_keys) as server:
            name = setup.name or setup.advertise or server.address
            log(f"tp peer {name}: listening on {server.address} for a master (model {peer.identity})")
            advertised = _advertise(setup, server.port, peer, log) if setup.advertise else None
            if on_listening is not None:
                on_listening(server.address)
            try:
                _answer(server, peer, name, log)
            finally:
                if advertised is not None:
                    advertised.close()  # goodbye packets: masters stop seeing this peer
    except KeyboardInterrupt:
        pass
    return 0


def _advertise(setup: PeerSetup, port: int, peer: Peer, log):
    """The DNS-SD record of this peer: its control port, worker.key (when it has keys), its profile
    (measured on this machine when none was given: discovery needs one) and its model."""
    from devices.probe import memory_bandwidth_gbs

    from . import curve
    from .discovery import Advertisement

    profile = dict(setup.profile)
    if "memory_bandwidth_gbs" not in profile:
        import psutil
        profile.update(memory_bandwidth_gbs=round(memory_bandwidth_gbs(mib=64, trials=3), 2))
        profile.setdefault("memory_bytes", psutil.virtual_memory().total)
    profile.setdefault("name", setup.advertise)
    peer.profile = profile
    host = setup.listen.rpartition(":")[0].strip("[]")
    key = curve.worker_public_key(setup.curve_keys) if setup.curve_keys is not None else None
    ad = Advertisement(setup.advertise, port, key=key, profile=profile, model=peer.identity,
                       addresses=None if host in ("0.0.0.0", "*", "") else [host])
    log(f"tp peer {setup.advertise}: advertised on the local network ({profile})")
    return ad


def _answer(server: ControlServer, peer: Peer, name: str, log) -> None:
    """The control loop: describe and serve requests, one at a time, for ever."""
    while True:
        got = server.next(timeout_s=0.5)
        if got is None:
            continue
        reply, request, sender = got
        op = request.get("op")
        if op == "describe":
            reply(peer.describe(name))
        elif op == "serve":
            try:
                job = peer.check(request)
            except Exception as err:  # whatever a request holds, the peer answers and stays
                log(f"tp peer {name}: refused a serve request from {sender}: {type(err).__name__}: {err}")
                reply({"ok": False, "error": f"{type(err).__name__}: {err}"})
                continue
            reply({"ok": True})
            peer.serve(job, sender)
        else:
            reply({"ok": False, "error": f"unknown op {op!r}: expected 'describe' or 'serve'"})
