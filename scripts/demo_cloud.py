"""edgefold demo, the cloud part: a model served by cloud-service on loopback, driven by tritonclient.

    .venv/bin/python scripts/demo_cloud.py [--requests 400]      (make demo runs its functions)

Trains a small digit classifier on scikit-learn's bundled digits (cached in .cache/demo),
exports it to ONNX, starts `cloud-service serve` on a free loopback port with two copies of
the model (plain, and with dynamic batching), sends requests through `tritonclient.grpc`
at concurrency 1 and 16, and prints latency p50/p99, throughput, batch sizes and accuracy.
"""
import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "demo"


def build_repository(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train (or reuse) the digits MLP; returns the held-out test images and labels."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)                     # (1797, 64)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    onnx_path = repo / "digits" / "1" / "model.onnx"
    if not onnx_path.exists():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
        for _ in tqdm(range(60), desc="training digits MLP", unit="epoch"):
            for idx in torch.randperm(len(xt)).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter is what we want
        torch.onnx.export(model.eval(), (torch.zeros(1, 64),), str(onnx_path), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    batched = repo / "digits_batched" / "1"
    batched.mkdir(parents=True, exist_ok=True)
    (batched / "model.onnx").write_bytes(onnx_path.read_bytes())
    (repo / "digits" / "config.toml").write_text("max_batch_size = 64\n[parameters]\nintra_op_thread_count = 1\n")
    (repo / "digits_batched" / "config.toml").write_text(
        "max_batch_size = 64\n[dynamic_batching]\nmax_queue_delay_microseconds = 500\n"
        "[parameters]\nintra_op_thread_count = 1\n")
    return x_test, y_test


def start_server(repo: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(repo),
           "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"grpc://[^:]+:(\d+)", line or "")
        if match:
            print(line.strip())
            return proc, f"127.0.0.1:{match.group(1)}"
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("cloud-service did not start")


async def drive(address: str, model: str, images: np.ndarray, concurrency: int, total: int):
    import tritonclient.grpc.aio as aioclient

    clients = [aioclient.InferenceServerClient(address) for _ in range(concurrency)]
    latencies, predictions = [], {}

    async def worker(slot: int):
        for i in range(slot, total, concurrency):
            image = images[i % len(images)][None, :]
            inp = aioclient.InferInput("image", list(image.shape), "FP32")
            inp.set_data_from_numpy(image)
            start = time.perf_counter()
            result = await clients[slot].infer(model, [inp], client_timeout=30)
            latencies.append(time.perf_counter() - start)
            predictions[i % len(images)] = int(result.as_numpy("logits").argmax())

    async def batch_counts():
        stats = (await clients[0].get_inference_statistics(model)).model_stats[0]
        return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}

    try:
        before = await batch_counts()
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for s in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = await batch_counts()
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    batches = {size: n - before.get(size, 0) for size, n in after.items() if n > before.get(size, 0)}
    return np.array(latencies) * 1e3, total / elapsed, batches, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per row")
    args = parser.parse_args()
    repo = CACHE / "repository"
    images, labels = build_repository(repo)
    proc, address = start_server(repo)
    try:
        rows = []
        for model in ("digits", "digits_batched"):
            for concurrency in (1, 16):
                lat, rps, batches, preds = asyncio.run(drive(address, model, images, concurrency, args.requests))
                accuracy = np.mean([preds[i] == labels[i] for i in preds])
                rows.append((model, concurrency, np.percentile(lat, 50), np.percentile(lat, 99), rps,
                             max(batches), accuracy))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"\n{'model':<16}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'max batch':>11}{'accuracy':>10}")
    for model, conc, p50, p99, rps, max_batch, acc in rows:
        print(f"{model:<16}{conc:>5}{p50:>9.2f}{p99:>9.2f}{rps:>9.0f}{max_batch:>11}{acc:>10.3f}")
    print(f"\nmachine: {os.cpu_count()} cores, client and server on the same machine; "
          "max batch = largest batch the server formed for that row")


if __name__ == "__main__":
    main()
