"""A tensor-parallel group losing a peer mid-generation, and a group formed by discovery (issue 22).

    .venv/bin/python scripts/bench_tp_faults.py --out docs/bench_tp_faults.jsonl    # 336M int4, ~10 min on 2 cores
    .venv/bin/python scripts/bench_tp_faults.py --quick                             # the tiny shape, world 2, ~1 min
    (run it by its path: scripts/ goes on sys.path for `import llamacpp_build`)

Fault rows, at world 3 and 4 on the 336M shape (int4, group 32; llamacpp_build's random checkpoint):
peers are `edge-runtime tp worker --model --listen` processes on loopback, rank 0 an
edge_runtime.tp.group.Group in this process. Per round: a fresh group, one uninterrupted greedy
generation (the reference, and the page cache warmed), then the same request with the last peer
killed (SIGKILL) or stalled (SIGSTOP) after FAULT_AT tokens. Reported: recovery_s, from the signal
to the next token (detection, re-plan, loading the warm shards, re-prefilling prompt and tokens so
far); tokens lost or repeated in the stream (target 0) and tokens that differ from the reference
(target 0: the re-prefill attends each generated row as its decode step did, and int8 / int4 ranks
sum fixed units of their partials exactly, so a new plan changes no bit); ms/token before and after (median
decode step); the group's own re-plan time; the time to first token of a fresh request on the new
plan; and the target, recovery <= 2 x that TTFT + the deadline (timeout_s). Then the peer comes back
(restarted or resumed) and the next request, which re-forms the group, is timed.

Discovery row: in a network namespace of its own (loopback only, multicast on), 3 peers started cold
with `--advertise` and a profile, and rank 0 forming a 4-rank group with `discover = 3`: the time from
starting the peer processes to the group formed (shards already prepared), and the part spent
in discovery once the advertisements were up. Needs root and iproute2, else that row says why not.

One JSON object per row (also to --out), then one summary row per (world, fault) with the medians.
Shares are equal (the same profile on every rank); ranks share the machine's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_tp import emit  # noqa: E402  (scripts/ is on sys.path: this script runs by its path)
PROMPT = list(range(11, 27))  # 16 tokens
N_NEW, FAULT_AT = 40, 16
PROFILE = "raspberry-pi-5"


class Peers:
    """`edge-runtime tp worker --model --listen` processes on loopback ports."""

    def __init__(self, model: Path, n: int, cache: Path, threads: int, *extra: str, host: str = "127.0.0.1"):
        from edge_runtime.tp.launch import free_port
        self.logdir = Path(tempfile.mkdtemp(prefix="bench-tp-peers-"))
        self.model, self.cache, self.threads, self.extra = model, cache, threads, extra
        self.addresses = [f"{host}:{free_port()}" for _ in range(n)]
        self.procs = [self._start(i) for i in range(n)]

    def _start(self, i: int) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        log = open(self.logdir / f"peer{i}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "tp", "worker", "--model", str(self.model),
                                 "--listen", self.addresses[i], "--cache-dir", str(self.cache), "--name", f"peer{i}",
                                 "--profile", PROFILE, *[a.replace("{i}", str(i)) for a in self.extra]],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)

    def wait_logged(self, text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        for i, p in enumerate(self.procs):
            while text not in (self.logdir / f"peer{i}.log").read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"peer{i} did not log {text!r}: "
                                       f"{(self.logdir / f'peer{i}.log').read_text(errors='replace')[-800:]}")
                time.sleep(0.05)

    def restart(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()
        self.procs[i] = self._start(i)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def median_ms(gaps: list[float]) -> float | None:
    return round(1e3 * statistics.median(gaps), 1) if gaps else None


def fault_round(model: Path, world: int, fault: str, quantize, cache: Path, timeout_s: float) -> dict:
    import torch

    from edge_runtime.tp.config import TPConfig
    from edge_runtime.tp.group import Group, rank_profile
    from edge_runtime.tp.launch import free_port

    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    peers = Peers(model, world - 1, cache, threads)
    group = None
    try:
        peers.wait_logged("listening")
        group = Group(model, peers.addresses, TPConfig(master=f"127.0.0.1:{free_port()}", timeout_s=timeout_s),
                      quantize=quantize, cache_dir=cache, profile=rank_profile(PROFILE), log=lambda m: None)
        reference = list(group.generate(PROMPT, N_NEW))
        victim = peers.procs[-1]
        sig = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
        got, stamps, t_fault = [], [], None
        for tok in group.generate(PROMPT, N_NEW):
            got.append(tok)
            stamps.append(time.perf_counter())
            if len(got) == FAULT_AT:
                victim.send_signal(sig)
                t_fault = time.perf_counter()
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        recovery = stamps[FAULT_AT] - t_fault
        fresh = group.generate(PROMPT, 4)
        list(fresh)
        ttft = fresh.time_to_first_token_s
        state = group.describe()
        # the peer comes back; the next request re-forms the group with it
        if fault == "kill":
            peers.restart(len(peers.procs) - 1)
        else:
            victim.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 120
        while not group.describe()["returning"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the peer did not come back")
            time.sleep(0.05)
        t0 = time.perf_counter()
        back = group.generate(PROMPT, 1)
        list(back)
        rejoin_s = time.perf_counter() - t0
        differing = [i for i, (a, b) in enumerate(zip(got, reference)) if a != b]
        return dict(world=world, fault=fault, identical=got == reference,
                    lost_or_repeated=abs(len(got) - len(reference)),  # one token per position, by construction
                    tokens_differing=len(differing), first_difference=differing[0] if differing else None,
                    recovery_s=round(recovery, 3), replan_s=state["last_recovery"]["seconds"],
                    replan_parts={k: state["last_recovery"][k] for k in ("close_s", "ask_s", "form_s")},
                    ttft_new_plan_s=round(ttft, 3), deadline_s=timeout_s,
                    target_s=round(2 * ttft + timeout_s, 3), within_target=recovery <= 2 * ttft + timeout_s,
                    ms_per_token_before=median_ms(gaps[:FAULT_AT - 1]), ms_per_token_after=median_ms(gaps[FAULT_AT:]),
                    world_after=state["world_size"], first_request_after_return_s=round(rejoin_s, 3),
                    world_after_return=group.describe()["world_size"])
    finally:
        if group is not None:
            group.close()
        peers.stop()


# --------------------------------------------------------------------------- discovery, in a namespace

def discovery_inner(model: Path, cache: Path, quantize_name: str | None, group_size: int, n: int) -> dict:
    """Runs inside the namespace: cold-start n advertised peers, form the group by discovery."""
    from edge_runtime.tp.config import TPConfig
    from edge_runtime.tp.group import Discovery, Group, rank_profile
    from edge_runtime.tp.launch import free_port
    from split.llama.quantize import handler

    quantize = handler(quantize_name, group_size) if quantize_name else None
    marks = {}

    def log(message: str) -> None:
        if message.startswith("tp group: discovered"):
            marks["discovered"] = time.perf_counter()

    t0 = time.perf_counter()
    peers = Peers(model, n, cache, 1, "--advertise", "bench-peer{i}")
    try:
        peers.wait_logged("advertised on the local network")
        marks["advertised"] = time.perf_counter()
        group = Group(model, Discovery(n, timeout_s=60), TPConfig(master=f"127.0.0.1:{free_port()}"),
                      quantize=quantize, cache_dir=cache, profile=rank_profile(PROFILE), log=log)
        formed = time.perf_counter()
        tokens = list(group.generate(PROMPT, 4))
        group.close()
    finally:
        peers.stop()
    return dict(peers=n, world=n + 1, cold_start_to_group_s=round(formed - t0, 3),
                peers_advertised_s=round(marks["advertised"] - t0, 3),
                discover_s=round(marks["discovered"] - marks["advertised"], 3),
                forming_s=round(formed - marks["discovered"], 3), generated=len(tokens))


def discovery_row(model: Path, cache: Path, quantize: str, n: int) -> dict:
    namespace = f"efbench{os.getpid()}"
    made = False
    try:
        for cmd in (["ip", "netns", "add", namespace], ["ip", "-n", namespace, "link", "set", "lo", "up"],
                    ["ip", "-n", namespace, "route", "add", "224.0.0.0/4", "dev", "lo"]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                return dict(skipped=f"`{' '.join(cmd)}` failed: {done.stderr.strip()} (needs root and iproute2)")
            made = True
        rows = []
        for attempt in ("warm-up (prepares the shards)", "measured"):
            done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, __file__, "--discovery-inner",
                                   "--model", str(model), "--cache", str(cache), "--peers", str(n),
                                   "--formats", quantize],
                                  capture_output=True, text=True, cwd=ROOT, timeout=1800)
            if done.returncode:
                return dict(skipped=f"the {attempt} run failed: {done.stderr[-800:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        return rows[-1]
    finally:
        if made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


# --------------------------------------------------------------------------- main

def main() -> int:
    import llamacpp_build
    from loadgen import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny shape, one round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worlds", help="default 3,4 (--quick: 2, the tiny shape has 2 KV heads)")
    ap.add_argument("--formats", default="int4,fp32", help="weight formats, each of int8 | int4 | fp32 (the "
                    "checkpoint's floats held as fp32)")
    ap.add_argument("--timeout-s", type=float, default=2.0, help="the master's deadline for a partial")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-discovery", action="store_true")
    ap.add_argument("--discovery-inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--peers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.discovery_inner:
        fmt = args.formats.split(",")[0]
        print(json.dumps(discovery_inner(args.model, args.cache, None if fmt == "fp32" else fmt, 32, args.peers)))
        return 0

    from split.llama.quantize import handler

    shape = "tiny" if args.quick else "336M"
    model = llamacpp_build.checkpoint(shape)
    cache = ROOT / ".cache" / "bench_tp_faults"
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    worlds = [int(w) for w in (args.worlds or ("2" if args.quick else "3,4")).split(",")]
    out = open(args.out, "w") if args.out else None
    results: dict[tuple, list] = {}
    for r in range(1 if args.quick else args.rounds):
        for fmt in formats:
            quantize = None if fmt == "fp32" else handler(fmt, 32)
            base = dict(bench="tp_faults", shape=shape, weights=quantize.name if quantize else "fp32",
                        machine=machine(), fault_at_token=FAULT_AT, new_tokens=N_NEW, prompt_tokens=len(PROMPT))
            for world in worlds:
                for fault in ("kill", "stall"):
                    row = fault_round(model, world, fault, quantize, cache, args.timeout_s)
                    results.setdefault((base["weights"], world, fault), []).append(emit({**base, "round": r, **row}, out))
    for (weights, world, fault), rows in results.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("recovery_s", "replan_s", "ttft_new_plan_s",
                                                                 "ms_per_token_before", "ms_per_token_after")}
        emit({"bench": "tp_faults", "summary": True, "shape": shape, "weights": weights, "world": world,
              "fault": fault, "rounds": len(rows), "all_identical": all(x["identical"] for x in rows),
              "max_lost_or_repeated": max(x["lost_or_repeated"] for x in rows),
              "max_tokens_differing": max(x["tokens_differing"] for x in rows),
              **{f"median_{k}": round(v, 3) for k, v in med.items()},
              "median_target_s": round(2 * med["ttft_new_plan_s"] + args.timeout_s, 3),
              "within_target": med["recovery_s"] <= 2 * med["ttft_new_plan_s"] + args.timeout_s}, out)
    if not args.no_discovery:
        emit({"bench": "tp_discovery", "shape": shape, "weights": formats[0], "machine": machine(),
              **discovery_row(model, cache, formats[0], max(worlds) - 1)}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
