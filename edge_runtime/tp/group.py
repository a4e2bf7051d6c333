"""An elastic tensor-parallel group: rank 0 over peers that may die, stall, come back or be new.

    group = Group(Path("model"), ["10.0.0.3:29600", "10.0.0.4:29600"], TPConfig(master="0.0.0.0:29500", curve_keys="keys/"))
    group = Group(Path("model"), Discovery(3), TPConfig(master="0.0.0.0:29500", curve_keys="keys/"))  # found by mDNS
    for tok in group.generate(group.encode("Hello"), max_new_tokens=32):   # as engine.Master.generate
        print(group.decode([tok]), end="")
    group.describe()    # members, plan, epoch, recoveries
    group.close()       # the peers go back to waiting for a master

Forming (`_form`): every known peer that answers `describe` with this model is a member; shares come
from the profiles they advertise (memory bandwidth), the memory budget from the smallest memory any
rank declares (budget.py picks each rank's window, or refuses with the figures). Each member is told
its rank, the plan and the epoch (peer.py), and the plans to keep warm: the group without each other
member. Then rank 0 binds the star collective; joining is checked against the plan and the epoch, so
a peer from an older formation is refused.

Losing a peer mid-generation: the collective raises CollectiveError naming the rank(s) that died,
hung past the deadline or sent a wrong message (wrong shape, stale sequence, a replayed message:
star_master.py), and has already told the others to abort. The group drops those, asks the rest
whether they are back and idle (a stalled one is not), forms a new plan over them, prefills every
token fed so far (prompt and generated) and hands the decode loop the last position's logits, so
the loop goes on as if nothing happened: greedy output equals an uninterrupted run and the stream
has no gap or repeat. The re-prefill is one call whose generated rows attend one at a time, as
their decode steps did (`replay`), and quantized ranks sum fixed units of their partials exactly
(parallelize.exact_partials), so with int8 / int4 weights too every logit keeps its bits. A peer
that answers again (restarted, resumed, or a listed one that was not up) is taken in at the next
request boundary, never mid-step.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from split.llama import Generation, LlamaConfig, Sampling, Stop

from .collective import CollectiveError
from .config import TPConfig
from .control import ask

DESCRIBE_TIMEOUT_S = 2.0  # a peer's answer to describe (at once, unless it is busy serving or gone)
SERVE_TIMEOUT_S = 5.0  # its answer to serve (it checks that the plan fits first)
PROBE_EVERY_S = 1.0  # how often absent peers are asked whether they are back
SHARE_STEP = 0.05  # shares from profiles are rounded to this
REDISCOVER_EVERY_S = 5.0  # with discovery, how often a group short of its count looks for new peers
BROWSE_S = 2.0  # how long one such look lasts


@dataclass(eq=False)  # a member is itself: compared by identity, not by what it advertised
class Member:
    address: str                      # HOST:PORT of its control port
    name: str = ""
    profile: dict = field(default_factory=dict)
    key: bytes | None = None          # its CURVE public key (from discovery), else worker.key

    def __post_init__(self):
        self.name = self.name or self.address


def rank_profile(profile: str | None, memory_bytes: int | None = None) -> dict:
    """What a rank tells its group about itself: a device profile's (name or .toml) memory bandwidth
    (its share) and memory (the budget), `memory_bytes` over the profile's; {} for neither."""
    out: dict = {}
    if profile:
        from devices.profiles import load_profile
        p = load_profile(profile)
        out = {"name": p.key, "memory_bandwidth_gbs": p.memory_bandwidth_gbs, "memory_bytes": int(p.memory_gb * 2**30)}
    if memory_bytes is not None:
        out["memory_bytes"] = int(memory_bytes)
    return out


@dataclass(frozen=True)
class Discovery:
    """Form the group from the first `count` peers found on the network (discovery.py) instead of a
    list: with CURVE keys only peers advertising the pinned worker.key, or one known_keys recorded
    (trust_on_first_use records new names), are taken."""
    count: int
    timeout_s: float = 10.0
    known_keys: Path | None = None
    trust_on_first_use: bool = False

    def members(self, model_identity: str, tp: TPConfig, log) -> list[Member]:
        """The first `count` suitable peers; TimeoutError when fewer answer within timeout_s."""
        from .discovery import discover
        found = discover(self.count, self.timeout_s, **self._rules(model_identity, tp), log=log)
        log(f"tp group: discovered {', '.join(f'{r.name} ({r.host}:{r.port})' for r in found)}")
        return [Member(f"{r.host}:{r.port}", r.name, r.profile, r.key) for r in found]

    def seen(self, model_identity: str, tp: TPConfig, timeout_s: float) -> list[Member]:
        """Every suitable peer advertised now (seen within timeout_s)."""
        from .discovery import browse
        found = browse(timeout_s, **self._rules(model_identity, tp), log=lambda line: None)
        return [Member(f"{r.host}:{r.port}", r.name, r.profile, r.key) for r in found]

    def _rules(self, model_identity: str, tp: TPConfig) -> dict:
        """Which records are suitable: this model, and (with CURVE keys) a pinned or known key."""
        from . import curve
        pinned = {curve.worker_public_key(tp.curve_keys)} if tp.curve_keys is not None else None
        return dict(model=model_identity, pinned=pinned, known_keys=self.known_keys,
                    trust_on_first_use=self.trust_on_first_use, require_key=tp.curve_keys is not None)


def replay(cuts: list[int], end: int) -> list[tuple[int, int, int]]:
    """The forward calls (start, stop, steps_from) that feed ids [0, end) again as steps starting at
    `cuts` fed them: a step of several ids (a prompt) starts a call, each one-id step after it joins
    that call as a row attended on its own (engine.Shard.layers), so every row gets its bits back."""
    calls: list[list[int]] = []
    for a, b in zip(cuts, cuts[1:] + [end]):
        if b - a == 1 and calls:
            calls[-1][1] = b
        else:
            calls.append([a, b, b - a])
    return [tuple(c) for c in calls]


class GroupError(RuntimeError):
    """No plan fits the peers that remain (the message has the figures), or forming failed."""


class Group:
    def __init__(self, model: Path, peers: Sequence[str | Member] | Discovery, config: TPConfig, *, quantize=None,
                 cache_dir: Path | None = None, profile: dict | None = None, progress: bool = False, log=print):
        from .gguf_source import model_folder
        from .launch import DEFAULT_CACHE, model_fingerprint

        self.tp, self.quantize, self.log, self.progress = config, quantize, log, progress
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE)
        self.model_dir = model_folder(Path(model), self.cache_dir / "gguf", progress)
        self.llama = LlamaConfig.from_dir(self.model_dir)
        self.identity = model_fingerprint(Path(model))  # peers must hold exactly these weights
        self.profile = dict(profile or {})
        self.discovery = peers if isinstance(peers, Discovery) else None
        if self.discovery is not None:
            peers = self.discovery.members(self.identity, config, log)
        self.known = [p if isinstance(p, Member) else Member(str(p)) for p in peers]
        self.members: list[Member] = []
        self.master = None
        self.plan = None
        self.epoch = 0
        self.recoveries: list[dict] = []
        self.last: Generation | None = None
        self._back: set[str] = set()  # addresses of absent peers that answered the prober
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._form(self._answering(self.known), warm=True)
        self._prober = threading.Thread(target=self._probe_absent, name="tp-group-prober", daemon=True)
        self._prober.start()

    # --- what engine.Master offers, over whichever master is current -----------------------------
    @property
    def config(self) -> LlamaConfig:
        return self.llama

    @property
    def tokenizer(self):
        return self.master.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.master.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.master.decode(ids)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling | None = None,
                 stop: Stop = Stop()) -> Generation:
        """engine.Master.generate over the group, surviving lost peers (module docstring)."""
        if self.master is None:  # the last re-plan failed: try again with whoever answers now
            self._form(self._answering(self.known), warm=True)
        self._take_back_returned()  # a request boundary: returned peers join here, never mid-step
        prompt = [int(t) for t in prompt_ids]
        V = self.llama.vocab_size
        if any(not 0 <= t < V for t in prompt):
            raise ValueError(f"prompt ids must be in [0, {V}), got {[t for t in prompt if not 0 <= t < V][:5]}")
        fed: list[int] = []  # every id the ranks' KV caches hold, in order
        cuts: list[int] = []  # where each step's ids start in `fed`

        def step(ids: list[int], start: int) -> torch.Tensor:  # -> (vocab,) logits of the last id
            del fed[start:]
            cuts[:] = [c for c in cuts if c < start] + [start]
            fed.extend(ids)
            calls = [(start, len(fed), len(ids))]
            while True:
                try:
                    for a, b, steps_from in calls:
                        if a == 0:
                            self.master.reset()
                        logits = self.master.forward(torch.tensor([fed[a:b]]), a, steps_from=steps_from)[0, -1]
                    return logits
                except CollectiveError as err:
                    self._recover(err)
                    calls = replay(cuts, len(fed))  # rebuild every rank's KV cache on the new plan

        self.last = Generation(step, prompt, max_new_tokens, sampling, stop)
        return self.last

    def rank_stats(self) -> list[dict]:
        return self.master.rank_stats()

    def describe(self) -> dict:
        """The group now: for health and metrics."""
        from .budget import plan_windows
        return {"members": ["rank 0 (this device)", *(m.name for m in self.members)],
                "absent": [m.name for m in self.known if m not in self.members],
                "returning": [m.name for m in self.known if m.address in self._back],  # join at the next request
                "world_size": 1 + len(self.members), "epoch": self.epoch,
                "shares": None if self.plan is None else self.plan.weights,
                "windows": None if self.plan is None else plan_windows(self.plan),
                "recoveries": len(self.recoveries), "last_recovery": self.recoveries[-1] if self.recoveries else None}

    def close(self) -> None:
        self._stop.set()
        if self.master is not None:
            self.master.close()  # SHUTDOWN: the peers go back to waiting

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- forming ------------------------------------------------------------------------------------
    def _answering(self, peers: Sequence[Member], within_s: float = DESCRIBE_TIMEOUT_S) -> list[Member]:
        """The peers that answer as idle holders of this model within within_s (asked again while busy or
        silent: survivors of a loss need a moment to see the abort); their advertised name and profile
        taken in. The others are left out with a log line."""
        deadline = time.monotonic() + within_s
        waiting, found = list(peers), []
        while waiting and time.monotonic() < deadline:
            for m in list(waiting):
                answer = ask(m.address, {"op": "describe"}, min(0.5, max(0.05, deadline - time.monotonic())),
                             self.tp.curve_keys, m.key)
                if answer is None or answer.get("state") != "idle":
                    continue
                waiting.remove(m)
                if isinstance(answer.get("name"), str) and answer["name"] and m.name == m.address:
                    m.name = answer["name"][:64]
                if answer.get("model") != self.identity:
                    self.log(f"tp group: peer {m.name} holds model {answer.get('model')!r}, not {self.identity}: "
                             "left out")
                    continue
                if isinstance(answer.get("profile"), dict):
                    m.profile = answer["profile"]
                found.append(m)
        for m in waiting:
            self.log(f"tp group: peer {m.name} does not answer: left out")
        return [m for m in peers if m in found]

    def _shares(self, members: Sequence[Member]) -> list[float] | None:
        """Shares proportional to advertised memory bandwidth, in steps of SHARE_STEP (so a measured
        bandwidth's noise does not make a new plan, and new shards, at every start); equal unless
        every rank gave one."""
        bw = [p.get("memory_bandwidth_gbs") for p in (self.profile, *(m.profile for m in members))]
        if all(type(b) in (int, float) and b > 0 for b in bw):
            steps = [max(1, round(b / sum(bw) / SHARE_STEP)) for b in bw]
            return None if len(set(steps)) == 1 else [n / sum(steps) for n in steps]
        return None

    def _budget(self, members: Sequence[Member]) -> int | None:
        """The smallest memory budget any rank declares (None: no budget)."""
        sizes = [p.get("memory_bytes") for p in (self.profile, *(m.profile for m in members))]
        sizes = [s for s in sizes if type(s) is int and s > 0]
        return min(sizes) if sizes else None

    def _plan(self, members: Sequence[Member]):
        from .prepare import make_format_plan
        weights, budget = self._shares(members), self._budget(members)
        try:
            return (make_format_plan(self.llama, 1 + len(members), weights, self.quantize, budget, self.tp.dtype),
                    weights, budget)
        except ValueError as err:
            raise GroupError(f"no plan fits {1 + len(members)} rank(s) ({', '.join(['this device', *(m.name for m in members)])}): "
                             f"{err}") from None

    def _tightest(self, members: Sequence[Member]) -> Member | None:
        """The peer offering less memory than every other rank (this device included), whose budget
        binds every rank's plan; None when this device offers the least."""
        def memory(p: dict) -> float:
            m = p.get("memory_bytes")
            return m if type(m) is int and m > 0 else float("inf")
        if not members:
            return None
        peer = min(members, key=lambda m: memory(m.profile))
        return peer if memory(peer.profile) < memory(self.profile) else None

    def _warm(self, members: Sequence[Member]) -> dict[str, list]:
        """For each member, the plans it keeps ready: the group without one other member."""
        warm: dict[str, list] = {m.address: [] for m in members}
        for lost in members:
            rest = [m for m in members if m is not lost]
            if not rest:
                continue
            try:
                _, weights, budget = self._plan(rest)
            except GroupError as err:  # losing `lost` would end requests: say so now
                self.log(f"tp group: without {lost.name}: {err}")
                continue
            for rank, m in enumerate(rest, 1):
                warm[m.address].append({"world_size": 1 + len(rest), "weights": weights, "rank": rank,
                                        "max_rank_memory": budget})
            self._rank0(1 + len(rest), weights, budget)
        return warm

    def _rank0(self, world: int, weights, budget) -> Path:
        from .launch import cached_shards
        return cached_shards(self.model_dir, world, weights, self.cache_dir, self.progress, budget, self.quantize,
                             ranks=[0], dtype=self.tp.dtype) / "rank0"

    def _form(self, candidates: list[Member], warm: bool) -> None:
        """Make the group over `candidates` (those that fail to take part are dropped, and it tries again)."""
        from .connect import make_collective
        from .engine import Master
        from .launch import plan_checksum

        while True:
            try:
                plan, weights, budget = self._plan(candidates)
            except GroupError as err:
                tightest = self._tightest(candidates)
                if tightest is None:
                    raise
                self.log(f"tp group: leaving out {tightest.name} (it offers the least memory): {err}")
                candidates = [m for m in candidates if m is not tightest]
                continue
            world = 1 + len(candidates)
            self.epoch += 1
            keep = self._warm(candidates) if warm else {}
            refused = []
            for rank, m in enumerate(candidates, 1):
                answer = ask(m.address, {"op": "serve", "model": self.identity, "world_size": world, "rank": rank,
                                         "weights": weights, "quantize": plan.extra.get("quantize"),
                                         "max_rank_memory": budget, "epoch": self.epoch,
                                         "master_port": self.tp.address[1], "window": self.tp.window,
                                         "timeout_s": self.tp.timeout_s, "payload": self.tp.payload,
                                         "dtype": self.tp.dtype, "warm": keep.get(m.address, [])},
                             SERVE_TIMEOUT_S, self.tp.curve_keys, m.key)
                if not (answer and answer.get("ok")):
                    self.log(f"tp group: peer {m.name} did not take rank {rank} of {world}: "
                             f"{answer.get('error') if answer else 'no answer'}")
                    refused.append(m)
            if refused:  # rare (describe just said idle, same model): a new plan without them; those that
                # took a rank of this epoch are refused when they join it and answer again afterwards
                candidates = [m for m in candidates if m not in refused]
                continue
            rank0 = self._rank0(world, weights, budget)
            config = TPConfig(world_size=world, master=self.tp.master if world > 1 else "", payload=self.tp.payload,
                              window=self.tp.window, timeout_s=self.tp.timeout_s,
                              join_timeout_s=self.tp.join_timeout_s, curve_keys=self.tp.curve_keys, dtype=self.tp.dtype,
                              insecure=self.tp.insecure, backend="star")
            try:
                collective = make_collective(config, 0, plan_checksum(plan) + f".{self.epoch}".encode())
                self.master = Master(rank0, collective, config.window, config.torch_dtype)
            except CollectiveError as err:  # a peer that took its rank but never joined
                missing = [candidates[r - 1] for r in err.ranks if 1 <= r <= len(candidates)]
                self.log(f"tp group: forming {world} ranks failed: {err}")
                if not missing:
                    raise GroupError(f"forming the group failed: {err}") from None
                candidates = [m for m in candidates if m not in missing]
                continue
            self.members, self.plan = list(candidates), plan
            self.log(f"tp group: epoch {self.epoch}: {world} rank(s): this device, "
                     f"{', '.join(m.name for m in candidates) or 'no peers'}; shares {weights or 'equal'}")
            return

    # --- losing and regaining peers -----------------------------------------------------------------
    def _recover(self, err: CollectiveError) -> None:
        t0 = time.monotonic()
        world = 1 + len(self.members)
        blamed = [self.members[r - 1] for r in err.ranks if 1 <= r <= len(self.members)]
        self.log(f"tp group: lost {', '.join(m.name for m in blamed) or 'a peer'} at epoch {self.epoch}: {err}")
        self.master.close()
        self.master = None
        t_closed = time.monotonic()
        rest = [m for m in self.members if m not in blamed]
        alive = self._answering(rest, self.tp.timeout_s + DESCRIBE_TIMEOUT_S)
        t_asked = time.monotonic()
        self._form(alive, warm=False)
        done = time.monotonic()
        self.recoveries.append({"lost": [m.name for m in self.known if m not in self.members],
                                "reason": str(err), "world_before": world, "world_after": 1 + len(self.members),
                                "seconds": round(done - t0, 3), "close_s": round(t_closed - t0, 3),
                                "ask_s": round(t_asked - t_closed, 3), "form_s": round(done - t_asked, 3)})

    def _probe_absent(self) -> None:
        """Ask absent peers whether they are back; with discovery, while the group is short of its
        count, also look for peers advertised since (they join at the next request too)."""
        browsed = time.monotonic()
        while not self._stop.wait(PROBE_EVERY_S):
            if (self.discovery is not None and len(self.members) < self.discovery.count and not self._back
                    and time.monotonic() - browsed > REDISCOVER_EVERY_S):
                self._discover_new()
                browsed = time.monotonic()
            for m in [m for m in self.known if m not in self.members]:
                answer = ask(m.address, {"op": "describe"}, 0.5, self.tp.curve_keys, m.key)
                if answer is not None and answer.get("state") == "idle" and answer.get("model") == self.identity:
                    with self._lock:
                        self._back.add(m.address)

    def _discover_new(self) -> None:
        """Add peers advertised since the group formed to the known ones."""
        known = {m.address for m in self.known}
        try:
            found = self.discovery.seen(self.identity, self.tp, BROWSE_S)
        except OSError:
            return  # no network for multicast just now: look again later
        for m in found:
            if m.address not in known:
                self.log(f"tp group: discovered {m.name} ({m.address}): it joins at the next request")
                self.known = [*self.known, m]  # a new list: other threads iterate the old one safely

    def _take_back_returned(self) -> None:
        with self._lock:
            back, self._back = self._back, set()
        returned = [m for m in self.known if m.address in back and m not in self.members]
        if not returned:
            return
        self.log(f"tp group: {', '.join(m.name for m in returned)} answer again: re-forming at this request boundary")
        current = list(self.members)
        self.master.close()
        self.master = None
        order = {m.address: i for i, m in enumerate(self.known)}
        self._form(sorted(self._answering(current + returned),
                          key=lambda m: order[m.address]), warm=True)
