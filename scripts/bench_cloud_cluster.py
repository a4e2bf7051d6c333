"""Collaborative-LLM sessions through HAProxy at 1, 2 and 4 cloud-service replicas (issue 17).

    .venv/bin/python scripts/bench_cloud_cluster.py --model runs/ee_lm_q --exit-layer 2 \\
        --out docs/bench_cloud_cluster.jsonl [--sessions 64] [--rounds 3] [--replicas 1,2,4] \\
        [--kind cloud-service|mlserver] [--plot docs/cloud_cluster.png]

1. Record (single process): each of --sessions simulated devices runs a real CollabLlm (exit head
   after --exit-layer, --threshold, int8 wire) on a prompt from the held-out split of
   ../shared/data/shakespeare.txt against one cloud-service; every ModelInfer request it sends
   (serialized, with its x-sequence-id header) and the token each answer carried are kept.
2. Replay: for each replica count, scripts/cloud_cluster.py starts HAProxy and that many replicas
   (--kind: cloud-service, or MLServer with cloud_service.mlserver_runtime),
   each pinned to one core (replica i on core i mod 2) with one torch thread; the devices replay
   their requests concurrently, each sending the next as soon as the previous answer is back (a
   closed loop: the device's own compute is left out, so the cloud is the bottleneck), for
   --rounds rounds after one unmeasured round (every round restarts each session with
   sequence_start). A "direct" row sends the same load to one replica without the balancer.

One JSON row per replica count: cloud tokens/s (answers that carried a token / wall time, median
over rounds), p50/p99 call latency, sessions and requests per replica (balance = the busiest
replica's share over the fair share), and whether every answer's token equals the recording
(`tokens_equal`). The target is 2 replicas >= 1.7x the tokens/s of 1 replica; the ratio is in the
rows. The client (one asyncio process, pre-serialized requests) and HAProxy are not pinned: with
one replica they have the other core to themselves, with two they share the replicas' cores.
"""
import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_collab_llm import emit, write_repository  # noqa: E402
from cloud_cluster import CloudCluster, start_replica, wait_ready  # noqa: E402
from edge_runtime.client.oip_client import OipClient, routing_headers  # noqa: E402
from edge_runtime.collab.device import CollabLlm  # noqa: E402
from edgefold_proto import METHODS, pb  # noqa: E402

INFER = METHODS["ModelInfer"].path


class RecordingClient(OipClient):
    """The device's real client, keeping what it sent and what came back."""

    def __init__(self, target: str):
        super().__init__(target)
        self.calls = []

    def call(self, rpc, request, timeout_s=None):
        reply = super().call(rpc, request, timeout_s)
        if rpc == "ModelInfer":
            token = next((np.frombuffer(raw, np.int64)[0] for out, raw in
                          zip(reply.outputs, reply.raw_output_contents) if out.name == "next_token"), -1)
            self.calls.append((request.SerializeToString(), routing_headers(request), int(token)))
        return reply


def record(model: Path, k: int, threshold: float, prompts: list[list[int]], new_tokens: int, address: str):
    """Per session: [(request bytes, headers, token)], from a real CollabLlm against `address`."""
    client = RecordingClient(address)
    edge = CollabLlm(model, mode="collaborative", exit_layer=k, threshold=threshold, client=client)
    sessions, sources = [], []
    for prompt in prompts:
        client.calls = []
        result = edge.generate(prompt, new_tokens)
        edge.end(result.conversation)
        sessions.append(client.calls)
        sources += result.sources
    client.close()
    return sessions, sources.count("cloud") / len(sources)


async def replay(address: str, sessions, timeout_s: float = 30.0):
    """Every session's requests in order, all sessions at once; (seconds, latencies, tokens per session)."""
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(INFER)   # bytes in, bytes out: no protobuf work in the timed loop
        latencies, replies = [], [[] for _ in sessions]

        async def device(i, calls):
            for request, headers, _ in calls:
                t0 = time.perf_counter()
                replies[i].append(await infer(request, timeout=timeout_s, metadata=headers))
                latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(device(i, calls) for i, calls in enumerate(sessions)))
        seconds = time.perf_counter() - t0
    tokens = []
    for raw in replies:
        session = []
        for reply in map(pb.ModelInferResponse.FromString, raw):
            index = [o.name for o in reply.outputs].index("next_token")
            session.append(int(np.frombuffer(reply.raw_output_contents[index], np.int64)[0]))
        tokens.append(session)
    return seconds, latencies, tokens


def requests_per_replica(replicas) -> list[int] | None:
    """Each replica's count of inferences (ModelStatistics); None where a replica does not implement
    it (MLServer)."""
    counts = []
    for replica in replicas:
        with OipClient(replica.address) as client:
            try:
                stats = client.call("ModelStatistics", pb.ModelStatisticsRequest(name="llm"))
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                raise
        counts.append(sum(s.inference_count for s in stats.model_stats))
    return counts


def cpu_seconds(pids) -> list[float]:
    """User + system CPU seconds of each process so far."""
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


def measure(label, address, sessions, rounds, replicas, route, balancer=None) -> dict:
    expected = [[token for _, _, token in calls] for calls in sessions]
    before = requests_per_replica(replicas)
    asyncio.run(replay(address, sessions))          # warm-up round, unmeasured
    pids = {"client": os.getpid(), "balancer": balancer.pid if balancer else None,
            **{f"replica{i}": r.proc.pid for i, r in enumerate(replicas)}}
    pids = {k: v for k, v in pids.items() if v is not None}
    cpu0, t0 = cpu_seconds(pids.values()), time.perf_counter()
    rates, latencies, equal = [], [], True
    for _ in range(rounds):
        seconds, lat, tokens = asyncio.run(replay(address, sessions))
        produced = sum(t >= 0 for session in tokens for t in session)
        rates.append(produced / seconds)
        latencies += lat
        equal &= tokens == expected
    wall = time.perf_counter() - t0
    busy = {k: round((b - a) / wall, 2) for k, a, b in zip(pids, cpu0, cpu_seconds(pids.values()))}
    lat_ms = np.array(latencies) * 1e3
    row = {"kind": "cluster", "setup": label, "replicas": len(replicas), "sessions": len(sessions),
           "rounds": rounds, "requests_per_round": sum(map(len, sessions)),
           "cloud_tokens_per_s": round(float(np.median(rates)), 1),
           "cloud_tokens_per_s_rounds": [round(r, 1) for r in rates],
           "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
           "tokens_equal": bool(equal), "cores_busy": busy}
    if route is not None:
        per = [0] * len(replicas)
        for calls in sessions:
            per[route(calls[0][1][0][1])] += 1
        row["sessions_per_replica"] = per
        row["session_balance"] = round(max(per) / (len(sessions) / len(replicas)), 2)
    after = requests_per_replica(replicas)
    if after is not None:
        row["requests_per_replica"] = [b - a for a, b in zip(before, after)]
    return row


def plot(jsonl: Path, png: Path) -> None:
    """Cloud tokens/s against replicas, per kind of replica, with linear scaling up to the cores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in sorted({r["kind_of_replica"] for r in rows}):
        points = sorted((r["replicas"], r["cloud_tokens_per_s"]) for r in rows
                        if r["kind_of_replica"] == kind and r["setup"] == "haproxy")
        line, = ax.plot(*zip(*points), marker="o", label=f"{kind} replicas behind HAProxy")
        cores = len(os.sched_getaffinity(0))
        ax.plot([n for n, _ in points], [points[0][1] * min(n, cores) for n, _ in points], ls=":",
                color=line.get_color(), label=f"{kind}: 1 replica x min(replicas, {cores} cores)")
    ax.set(xlabel="replicas (each pinned to one of 2 cores)", ylabel="cloud tokens / s",
           title="collaborative-LLM sessions, 64 devices")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--exit-layer", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--kind", choices=("cloud-service", "mlserver"), default="cloud-service")
    p.add_argument("--out")
    p.add_argument("--plot", type=Path, help="PNG of every row in --out so far")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from tokenizers import Tokenizer
    full = (ROOT.parent / "shared" / "data" / "shakespeare.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(args.model / "tokenizer.json")).encode(full[int(len(full) * 0.95):]).ids
    prompts = [ids[i * 97: i * 97 + args.prompt_tokens] for i in range(args.sessions)]
    common = {"kind_of_replica": args.kind, "model": str(args.model), "exit_layer": args.exit_layer, "threshold": args.threshold,
              "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
              "machine": f"{platform.processor() or platform.machine()}, 2 vCPU KVM VM (shared)"}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(repo, args.model, args.exit_layer)
        replica = start_replica(repo, Path(tmp) / "record.log", core=None)
        try:
            wait_ready(replica.address, 60, replica.proc, "recording replica")
            sessions, cloud_share = record(args.model, args.exit_layer, args.threshold, prompts,
                                           args.new_tokens, replica.address)
        finally:
            replica.stop()
        common["cloud_token_share"] = round(cloud_share, 3)
        rows = []
        for n in [int(r) for r in args.replicas.split(",")]:
            with CloudCluster(repo, replicas=n, pin=True, workdir=Path(tmp) / f"cluster{n}", kind=args.kind) as cluster:
                if n == 1:
                    row = measure("direct", cluster.replicas[0].address, sessions, args.rounds, cluster.replicas, None)
                    emit({**common, **row}, args.out)
                    rows.append(row)
                row = measure("haproxy", cluster.address, sessions, args.rounds, cluster.replicas, cluster.replica_of,
                              cluster.balancer)
            base = next((r for r in rows if r["setup"] == "haproxy" and r["replicas"] == 1), row)
            row["speedup_vs_1_replica"] = round(row["cloud_tokens_per_s"] / base["cloud_tokens_per_s"], 2)
            emit({**common, **row}, args.out)
            rows.append(row)
    print(json.dumps({"summary": {f"{r['setup']}_{r['replicas']}": r["cloud_tokens_per_s"] for r in rows}}))
    if args.plot and args.out:
        plot(Path(args.out), args.plot)


if __name__ == "__main__":
    main()
