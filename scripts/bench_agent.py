"""Benchmark the deploy agent: cold start, idle RSS and CPU, and the per-request cost of going
through the agent (SDK -> gRPC on loopback -> agent -> ONNX Runtime) against calling ONNX Runtime
in-process on the same model, measured in the same run. One JSON object per row.

    .venv/bin/python scripts/bench_agent.py [--requests 2000] [--starts 5] [--idle-s 10] \
        [--out docs/bench_agent.jsonl]
    (run it by its path, not with -m: Python then puts scripts/ on sys.path for `import demo_cloud`)

Model: the digits MLP of the demo (64 -> 128 -> 10, ONNX, batch 1, one ORT thread). The agent runs
it as a `local` pipeline from a path (start time excludes model load: "serving" is printed before
any model is opened; "ready" includes it). Idle: the agent with a cloud-service it heartbeats to
every 5 s (the default), CPU time and RSS read with psutil over --idle-s seconds. Target: <= 1 ms
added at p50 by the agent.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

import demo_cloud
from split_services import CloudService

ROOT = Path(__file__).resolve().parents[1]

SERVING = re.compile(r"serving grpc://[^:]+:(\d+)")


def emit(row: dict, out) -> None:
    row = {"machine": f"{platform.node()} {os.cpu_count()} cores", **row}
    print(json.dumps(row), flush=True)
    if out:
        out.write(json.dumps(row) + "\n")


def write_config(folder: Path, model_dir: Path, cloud: str | None) -> Path:
    cloud_table = f'[cloud]\naddress = "{cloud}"\n' if cloud else ""
    path = folder / "agent.toml"
    path.write_text(f'device_id = "bench"\nstate_dir = "{folder / "state"}"\n{cloud_table}'
                    f'[serve]\nport = 0\n[[pipeline]]\nname = "digits"\nkind = "local"\npath = "{model_dir}"\n')
    return path


def start_agent(config: Path) -> tuple[subprocess.Popen, str, float]:
    """The agent process, its address, and seconds from spawn to its 'serving' line."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "agent", "--config", str(config),
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        match = SERVING.search(line)
        if match:
            return proc, f"127.0.0.1:{match.group(1)}", time.perf_counter() - start
    raise SystemExit("the agent did not start")


def wait_ready(client) -> None:
    while not client.ready():
        time.sleep(0.005)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


def latency_ms(fn, n: int) -> np.ndarray:
    for _ in range(min(200, n)):
        fn()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from edge_runtime.client import sdk
    from edge_runtime.vision.deployment import session

    repo = ROOT / ".cache" / "demo" / "repository"
    images, _ = demo_cloud.build_repository(repo)
    model_dir = repo / "digits" / "1"
    out = open(args.out, "w") if args.out else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = write_config(tmp, model_dir, None)

        starts, readies = [], []
        for _ in range(args.starts):
            proc, address, serving_s = start_agent(config)
            t = time.perf_counter()
            with sdk.connect(address) as client:
                wait_ready(client)
            readies.append(serving_s + time.perf_counter() - t)
            starts.append(serving_s)
            stop(proc)
        emit({"row": "cold_start", "serving_s_median": round(float(np.median(starts)), 3),
              "ready_s_median": round(float(np.median(readies)), 3), "starts": args.starts,
              "serving_s": [round(s, 3) for s in starts], "target_s": 2.0}, out)

        x = images[:1]                                          # (1, 64) float32
        ort = session(model_dir / "model.onnx", threads=1)
        in_process = latency_ms(lambda: ort.run(None, {"image": x}), args.requests)
        proc, address, _ = start_agent(config)
        try:
            with sdk.connect(address) as client:
                wait_ready(client)
                through_agent = latency_ms(lambda: client.infer("digits", {"image": x}), args.requests)
                same = np.array_equal(client.infer("digits", {"image": x})["logits"], ort.run(None, {"image": x})[0])
        finally:
            stop(proc)
        with CloudService(repo) as cloud, sdk.connect(cloud.address) as client:
            through_cloud = latency_ms(lambda: client.infer("digits", {"image": x}), args.requests)
        p50 = {k: float(np.percentile(v, 50)) for k, v in
               (("ort", in_process), ("agent", through_agent), ("cloud", through_cloud))}
        for name, values in (("onnxruntime_in_process", in_process), ("via_agent_sdk", through_agent),
                             ("via_cloud_service_sdk", through_cloud)):
            emit({"row": "request", "path": name, "requests": args.requests,
                  "p50_ms": round(float(np.percentile(values, 50)), 4),
                  "p99_ms": round(float(np.percentile(values, 99)), 4)}, out)
        emit({"row": "agent_overhead", "added_p50_ms": round(p50["agent"] - p50["ort"], 4), "target_ms": 1.0,
              "pass": p50["agent"] - p50["ort"] <= 1.0, "same_outputs": bool(same),
              "cloud_service_added_p50_ms": round(p50["cloud"] - p50["ort"], 4)}, out)

        with CloudService(repo) as cloud:
            proc, address, _ = start_agent(write_config(tmp, model_dir, cloud.address))
            try:
                with sdk.connect(address) as client:
                    wait_ready(client)
                agent = psutil.Process(proc.pid)
                time.sleep(2.0)
                cpu0, t0 = agent.cpu_times(), time.perf_counter()
                time.sleep(args.idle_s)
                cpu1, wall = agent.cpu_times(), time.perf_counter() - t0
                rss = agent.memory_info().rss
            finally:
                stop(proc)
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
        emit({"row": "idle", "seconds": round(wall, 1), "cpu_percent_of_one_core": round(100 * cpu, 3),
              "rss_mib": round(rss / 2**20, 1), "heartbeat_s": 5.0}, out)
    if out:
        out.close()


if __name__ == "__main__":
    main()
