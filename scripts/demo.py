"""edgefold demo: the whole system on loopback in one run, ending with a summary table.

    make demo            # or: .venv/bin/python scripts/demo.py [--frames 60] [--delay-ms 20 --rate-mbit 20]
    (run it by its path, not with -m: Python then puts scripts/ on sys.path for `import demo_split`)

1. Builds what it needs once (cached under .cache/, with progress bars): the digits MLP, the
   residual CNN with exits and a bottleneck (split deployment), a small early-exit LM trained on
   Shakespeare (collaborative LLM), a random 8-layer Llama cut into 3 ranks (weights 1,1,2).
2. Starts `cloud-service` (port 8001 when free) with those models, and `scripts/linkemu.py` in front
   of it (a Wi-Fi-like link: --delay-ms one way, --rate-mbit).
3. Starts `edge-runtime agent` (port 8011 when free) as an emulated Raspberry Pi 4 behind the link:
   it pulls the split deployment's device package and the LM from the cloud (sha256-checked), and
   serves three pipelines on the local Open Inference Protocol port: digits (exits + offload; the
   planner picks the placement for the profile and link), chat (collaborative LLM) and llama
   (a 3-rank tensor-parallel group, ranks 1 and 2 started by the agent on loopback).
4. Drives them through the SDK (edge_runtime.client.sdk), checks the 3-rank tokens against transformers,
   cuts the link to show degraded local answers, and prints the summary table.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import demo_cloud
import demo_collab
import demo_split
import demo_tp
from split_services import CloudService, LinkEmu, _Process

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = ROOT / ".cache" / "demo"
LM_FILES = ("config.json", "model.safetensors", "exit_heads.safetensors", "exits.json", "tokenizer.json")


def port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return 0


def build() -> dict:
    """Every model the demo needs, built once; returns their paths and the digits test set."""
    print("== models (built once, cached in .cache/) ==", flush=True)
    images, labels = demo_cloud.build_repository(CACHE / "repository")
    split_dir = ROOT / ".cache" / "split" / "demo"
    device_dir = demo_split.build(split_dir)
    lm = ROOT / ".cache" / "demo_collab" / "ee_lm"
    demo_collab.ensure_model(lm)
    demo_collab.ensure_calibrated(lm)
    ckpt = demo_tp._checkpoint()
    from edge_runtime.tp.launch import cached_shards
    shards = cached_shards(ckpt, 3, [1.0, 1.0, 2.0], demo_tp.CACHE / "shards")
    return dict(images=images, labels=labels, split_dir=split_dir, device_dir=device_dir, lm=lm, ckpt=ckpt,
                shards=shards)


def assemble_repository(m: dict) -> Path:
    """The cloud's repository: served models, plus download-only packages for the device."""
    repo = CACHE / "system-repository"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for name in ("digits", "digits_batched"):
        shutil.copytree(CACHE / "repository" / name, repo / name)
    for tail in (m["split_dir"] / "repository").iterdir():
        shutil.copytree(tail, repo / tail.name)
    shutil.copytree(m["device_dir"], repo / "digits-device" / "1")
    (repo / "digits-device" / "config.toml").write_text('backend = "device"\n')
    (repo / "lm-device" / "1").mkdir(parents=True)
    for f in LM_FILES:
        shutil.copy2(m["lm"] / f, repo / "lm-device" / "1" / f)
    (repo / "lm-device" / "config.toml").write_text('backend = "device"\n')
    k = max(json.loads((m["lm"] / "exits.json").read_text())["exit_layers"])
    for name, first in (("llm", k), ("llm_full", 0)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.toml").write_text(
            f'backend = "llm_continuation"\n[sequence_batching]\n[parameters]\n'
            f'checkpoint = "{m["lm"].resolve()}"\nfirst_layer = {first}\ncatch_up = "exact"\n')
    (repo / "llm_stream" / "1").mkdir(parents=True)
    (repo / "llm_stream" / "config.toml").write_text(
        f'backend = "llm_stream"\n[model_transaction_policy]\ndecoupled = true\n[parameters]\n'
        f'checkpoint = "{m["lm"].resolve()}"\nintra_op_thread_count = 1\n')
    return repo


def agent_config(cloud: str, port: int, shards: Path) -> Path:
    state = CACHE / "agent-state"
    shutil.rmtree(state, ignore_errors=True)      # a fresh device: it pulls everything
    path = CACHE / "agent.toml"
    path.write_text(f'''# The demo's device: an emulated Raspberry Pi 4 behind the link emulator.
device_id = "demo-pi"
profile = "raspberry-pi-4"
state_dir = "{state}"
link = "wifi"

[cloud]
address = "{cloud}"
timeout_s = 2.0
heartbeat_s = 1.0

[serve]
host = "127.0.0.1"
port = {port}

[[pipeline]]
name = "digits"
kind = "split"
model = "digits-device"
placement = "split:stage2:b8:int8" # or "auto": the planner's pick (local-only for this tiny CNN on a Pi)
slowdown = "profile"               # device compute stretched to the Pi's speed
deadline_s = 1.0
exit_thresholds = {{ stage2 = 1.0 }} # the exit at the cut is the fallback when the cloud is away

[[pipeline]]
name = "chat"
kind = "collab-llm"
model = "lm-device"
deadline_s = 2.0
max_new_tokens = 24

[[pipeline]]
name = "llama"
kind = "tp"
path = "{shards}"
window = 2
max_new_tokens = 16
''')
    return path


class Agent(_Process):
    pattern = r"serving grpc://[^:]+:(\d+)"

    def __init__(self, config: Path):
        self.started = time.perf_counter()
        self._start([sys.executable, "-m", "edge_runtime.cli", "agent", "--config", str(config),
                     "--log-level", "WARNING"], "edge-runtime agent")
        self.start_s = time.perf_counter() - self.started
        import threading
        self.lines = []
        threading.Thread(target=lambda: [self.lines.append(l) or print("   ", l.rstrip(), flush=True)
                                         for l in self.proc.stdout], daemon=True).start()


def wait_ready(client, timeout_s: float = 300.0) -> float:
    start = time.perf_counter()
    while not client.ready(timeout_s=5.0):
        if time.perf_counter() - start > timeout_s:
            raise SystemExit("the agent did not become ready")
        time.sleep(0.1)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="link emulator: one-way delay")
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="link emulator: rate")
    parser.add_argument("--requests", type=int, default=400, help="tritonclient requests straight to the cloud")
    args = parser.parse_args()
    t0 = time.perf_counter()
    m = build()
    repo = assemble_repository(m)
    from edge_runtime.client import sdk
    rows = []
    print("\n== cloud-service, link emulator, agent ==", flush=True)
    cloud_port = port_or_free(8001)
    with CloudService(repo, port=cloud_port) as cloud, \
            LinkEmu(cloud.address, args.delay_ms, args.rate_mbit) as link:
        print(f"cloud-service on {cloud.address}; link emulator {link.address} "
              f"({args.rate_mbit:g} Mbit/s, {2 * args.delay_ms:g} ms RTT)", flush=True)
        rps = demo_cloud_row(cloud.address, m, args.requests)
        rows.append(("cloud-service", "digits MLP, tritonclient c=16, dynamic batching", f"{rps:.0f} req/s"))
        agent = Agent(agent_config(link.address, port_or_free(8011), m["shards"]))
        try:
            with sdk.connect(agent.address, timeout_s=120) as client:
                ready_s = wait_ready(client)
                rows.append(("agent", "start (to serving) / ready (3 pipelines, models pulled through the link)",
                             f"{agent.start_s:.2f} s / {ready_s:.1f} s"))
                rows += vision(client, m, args.frames)
                rows += sdk_example(agent.address)
                rows += chat(client, m["lm"], link.address)
                rows += tensor_parallel(client, m)
                rows += link_down(client, m, link)
                rows += fleet(cloud.address)
        finally:
            agent.stop()
    print(f"\n== summary ({os.cpu_count()} cores, everything on loopback; {time.perf_counter() - t0:.0f} s) ==")
    width = max(len(r[1]) for r in rows)
    for part, what, figure in rows:
        print(f"{part:<15} {what:<{width}}  {figure}")
    return 0


def demo_cloud_row(address: str, m: dict, requests: int) -> float:
    import asyncio
    _, rps, _, _ = asyncio.run(demo_cloud.drive(address, "digits_batched", m["images"], 16, requests))
    return rps


def vision(client, m: dict, frames: int) -> list:
    from split.vision import data
    x, y = data.digits("test")
    meta = client.metadata("digits")
    out, latencies = [], []
    for i in range(frames):
        start = time.perf_counter()
        out.append(client.infer("digits", {"x": x[i:i + 1]}))
        latencies.append(time.perf_counter() - start)
    where = [o["where"][0].decode() for o in out]
    acc = np.mean([o["label"][0] == t for o, t in zip(out, y[:frames])])
    counts = {w: where.count(w) for w in sorted(set(where))}
    print(f"\ndigits through the agent ({meta.platform}): {frames} frames, accuracy {acc:.3f}, answered at {counts}, "
          f"median {1e3 * np.median(latencies):.1f} ms per frame")
    return [("vision", f"{frames} test frames: exit after stage1, else bottleneck + int8 to the cloud",
             f"acc {acc:.3f}; {', '.join(f'{k} {v}' for k, v in counts.items())}; "
             f"p50 {1e3 * np.median(latencies):.0f} ms")]


def sdk_example(address: str) -> list:
    cmd = [sys.executable, str(ROOT / "examples" / "infer.py"), "--target", address, "--model", "digits"]
    print(f"\n$ python examples/infer.py --target {address} --model digits", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    print(done.stdout.strip() or done.stderr.strip())
    return [("SDK", "examples/infer.py against the agent (same code as against the cloud)",
             "ok" if done.returncode == 0 else f"failed ({done.returncode})")]


def chat(client, lm: Path, link: str) -> list:
    prompt = "ROMEO:\n"
    start = time.perf_counter()
    out = client.infer("chat", {"prompt": np.array([prompt.encode()], dtype=object)},
                       parameters={"max_new_tokens": 24})
    seconds = time.perf_counter() - start
    sources = [s.decode() for s in out["sources"]]
    text = out["text"][0].decode()
    print(f"\nchat (collaborative LLM through the agent):\n{prompt}{text}")
    edge = sources.count("edge") / len(sources)
    rows = [("collab LLM", f"{len(sources)} tokens, exit head on the device, the rest in the cloud",
             f"{edge:.0%} decided on the device; {1e3 * seconds / len(sources):.0f} ms/token")]
    for mode, what in (("speculative", "device drafts, the cloud verifies a draft per call"),
                       ("cloud-stream", "the cloud generates and streams every token")):
        out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(lm), "--mode", mode,
                              "--cloud", link, "--prompt", prompt, "--max-new-tokens", "24", "--json"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        if out.returncode:
            rows.append((f"LLM {mode}", what, f"failed: {out.stderr.strip()[-200:]}"))
            continue
        print(demo_collab.summary(mode, json.loads(out.stdout)))
        r = json.loads(out.stdout)
        rows.append((f"LLM {mode}", f"{what} (through the link, from this process)", f"{r['ms_per_token']:.0f} ms/token"))
    return rows


def tensor_parallel(client, m: dict) -> list:
    prompt = np.array(demo_tp.PROMPT, np.int64)
    start = time.perf_counter()
    tokens = client.infer("llama", {"prompt_ids": prompt}, parameters={"max_new_tokens": 16})["tokens"].tolist()
    seconds = time.perf_counter() - start
    reference = demo_tp._reference(m["ckpt"], 16)[:len(tokens)]
    same = tokens == reference
    print(f"\nllama (3 ranks, weights 1,1,2, window 2): {tokens}\n  same as transformers' greedy generate: {same}")
    if not same:
        raise SystemExit("tensor-parallel tokens differ from transformers")
    return [("tensor parallel", "3 ranks (1,1,2), window 2, via the agent; vs transformers",
             f"{len(tokens)} tokens identical; {len(tokens) / seconds:.1f} tok/s")]


def link_down(client, m: dict, link) -> list:
    from split.vision import data
    x, _ = data.digits("test")
    link.stop()
    out = [client.infer("digits", {"x": x[i:i + 1]}) for i in range(10)]
    degraded = sum(bool(o["degraded"][0]) for o in out)
    answered_here = sum(o["where"][0] != b"cloud" for o in out)
    print(f"\nlink down: 10 frames, {answered_here} answered on the device: {degraded} flagged degraded (the cloud "
          f"call failed), {answered_here - degraded} kept local by the policy once heartbeats noticed")
    return [("link down", "10 frames with the link emulator stopped",
             f"10/10 answered on the device; {degraded} degraded")]


def fleet(address: str) -> list:
    from edge_runtime.client.fleet_client import FleetClient
    with FleetClient(address) as fc:
        devices = fc.list_devices()
    d = next(d for d in devices if d.device_id == "demo-pi")
    print(f"\nfleet: {d.device_id} ({d.profile}), {d.samples_received} telemetry samples, "
          f"models {[f'{x.name} v{x.version}' for x in d.models]}")
    return [("fleet", "heartbeats + telemetry the cloud received from demo-pi",
             f"{d.samples_received} samples; models {', '.join(x.name for x in d.models)}")]


if __name__ == "__main__":
    sys.exit(main())
