"""bench_cloud_sessions: one cloud-service process, on one core, serving a fleet of simulated devices.

    nice -n 5 .venv/bin/python scripts/bench_cloud_sessions.py --model runs/ee_lm_q --exit-layer 4 \\
        --loads 1,16,64,256 --out docs/bench_cloud_sessions.jsonl --plot docs/cloud_sessions.png
    (run it by its path: scripts/ is then on sys.path for `import bench_collab_llm`)

A simulated device is a thread of this process (pinned to the other core). `cloud-stream` devices
open one ModelStreamInfer stream each (backend llm_stream: continuous batching). The other modes
replay what one real device sent: each mode's generation first runs once for real (CollabLlm
against the same cloud) through a recording client that keeps every request and the device's time
before it (its own compute: the exit head, the edge layers); a simulated device then sends those
requests under a sequence id of its own, sleeping the recorded device time before each, so the
cloud sees what N boards would send while this machine spends no CPU on their layers.

Per mode, batching and load (one JSON object each): per-device ms/token (median and p90 over
devices), time to first token, the cloud's generated tokens/s (all devices' tokens over the wall
time), the cloud process's CPU seconds per token (psutil), the model's packed forwards (from
ModelStatistics: how many, segments per forward, forward ms per token), and wrong tokens: every replayed
response (next token, accepted drafts) and every streamed token is checked against the solo run
(target 0). Modes: cloud-stream, cloud-only (one llm_full call per token), collaborative (exact
catch-up at the calibrated threshold), collaborative-tokens (token-id catch-up: the llm_tok model,
catch_up = "tokens"), collaborative-propagated (llm_prop), speculative (exit-head drafts verified
by llm_full). Every load runs twice:
`batching` "batched" (the models as served: concurrent sessions or streams share a packed
forward) and "unbatched" (the same load against a twin of each model with max_batch_rows = 1, so
every forward carries one session's request or one stream's step); a row of kind "ratio" per mode
and load gives batched over unbatched cloud tokens/s (issue 21's target: 4x at 64 sessions).

With --auto, after the modes: at each load, n - 1 simulated devices keep running the fastest
lossless mode measured at that load (per-device median, batched), repeating their generation,
while one real device (a CollabLlm or CloudStream of this process, its own layers computed here)
joins them in each lossless mode in turn, then in `--mode auto` (AutoLlm, lossless modes only). A
row of kind "auto" gives each one's ms/token over --auto-runs generations after a warm-up (auto's
warm-up measures the link, the device and the cloud), what auto chose and predicted, and auto over
the fastest of them (issue 21's target: within 10%). Every token is checked against the cloud
model's own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from edge_runtime.client.oip_client import OipClient
from edge_runtime.collab.auto import AutoLlm
from edge_runtime.collab.device import CollabLlm
from edge_runtime.collab.stream import CloudStream
from edgefold_proto import pb
from split.llama.exits import read_exits_json

from bench_collab_llm import emit, start, write_repository

ROOT = Path(__file__).resolve().parents[1]
SERVER_CORE, CLIENT_CORE = 0, 1


class RecordingClient(OipClient):
    """An OipClient that keeps every ModelInfer request, its reply and the time the device spent
    since the previous reply (its own compute) before sending it."""

    def __init__(self, target: str, **kw):
        super().__init__(target, **kw)
        self.trace: list[tuple[float, bytes, tuple]] = []   # (device seconds before, request, answer)
        self._last = time.perf_counter()

    def call(self, rpc, request, timeout_s=None):
        device_s = time.perf_counter() - self._last
        reply = super().call(rpc, request, timeout_s)
        if rpc == "ModelInfer":
            self.trace.append((device_s, request.SerializeToString(), answer(reply)))
        self._last = time.perf_counter()
        return reply


def answer(reply) -> tuple:
    """What decides a device's next request: the cloud's (next_token, accepted)."""
    out = {o.name: int(np.frombuffer(raw, np.int64)[0]) for o, raw in zip(reply.outputs, reply.raw_output_contents)
           if o.name in ("next_token", "accepted")}
    return out.get("next_token", -1), out.get("accepted", 0)


DEVICE_MODES = {"cloud-only": ("cloud-only", {}), "collaborative": ("collaborative", {}),
                "collaborative-tokens": ("collaborative", {"cloud_model": "llm_tok"}),
                "collaborative-propagated": ("collaborative", {"cloud_model": "llm_prop"}),
                "speculative": ("speculative", {})}   # --modes name: CollabLlm's mode and cloud model


def record(model_dir: Path, address: str, mode: str, k: int, threshold: float, prompt, new_tokens: int):
    """One real generation of `mode`; returns (trace, tokens, the request that ends its session)."""
    client = RecordingClient(address, timeout_s=30.0)
    device_mode, kw = DEVICE_MODES[mode]
    edge = CollabLlm(model_dir, mode=device_mode, threshold=threshold, exit_layer=k, client=client, timeout_s=30.0,
                     **kw)
    edge.generate(prompt[:4], 2)                 # warm-up (its own session), not recorded
    client.trace.clear()
    client._last = time.perf_counter()
    result = edge.generate(prompt, new_tokens)
    trace = list(client.trace)
    edge.end(result.conversation)               # recorded apart: what frees the session
    end = client.trace[len(trace)][1] if len(client.trace) > len(trace) else None
    edge.close()
    return trace, result.tokens, end


def replay_device(address: str, trace, seq_id: int, suffix: str, out: dict, end: bytes | None = None) -> None:
    """Send the recorded requests as sequence `seq_id` to each model's twin named model + suffix
    (then, untimed, `end`: the request that frees the session); out: seconds, first-token seconds,
    wrong answers."""
    client, wrong = OipClient(address, timeout_s=60.0), 0

    def request_of(raw: bytes) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest.FromString(raw)
        request.model_name += suffix
        request.parameters["sequence_id"].int64_param = seq_id
        return request
    t0 = time.perf_counter()
    first = None
    try:
        for device_s, raw, want in trace:
            time.sleep(device_s)
            wrong += answer(client.call("ModelInfer", request_of(raw))) != want
            first = first or time.perf_counter() - t0
        out["seconds"] = time.perf_counter() - t0
        if end is not None:
            client.call("ModelInfer", request_of(end))
    except Exception as err:  # a device that failed: counted, never hidden
        out["error"] = f"{type(err).__name__}: {err}"
    finally:
        client.close()
    out.setdefault("seconds", time.perf_counter() - t0)
    out.update(first_s=first, wrong=wrong)


def stream_device(address: str, model: str, prompt, new_tokens: int, reference: list[int], out: dict) -> None:
    t0 = time.perf_counter()
    try:
        with CloudStream(address, model, timeout_s=60.0) as cloud:
            r = cloud.generate(prompt, new_tokens, ignore_eos=True)
        out.update(wrong=sum(a != b for a, b in zip(r.tokens, reference)) + abs(len(r.tokens) - len(reference)),
                   first_s=r.time_to_first_token_s, batch=max(r.batch_streams or [0]))
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    out["seconds"] = time.perf_counter() - t0


def model_stats(address: str, model: str) -> np.ndarray:
    """The model's (packed forwards, segments they carried, their compute ns) so far."""
    with OipClient(address) as client:
        s = client.call("ModelStatistics", pb.ModelStatisticsRequest(name=model)).model_stats[0]
    return np.array([s.execution_count, s.inference_count, s.inference_stats.compute_infer.ns], np.int64)


def run_load(target, n: int, cloud_pid: int, address: str, model: str) -> tuple[list[dict], float, float, np.ndarray]:
    """n devices at once, each running target(out_dict); returns (outs, wall seconds, cloud CPU
    seconds, the model's statistics over the run: forwards, segments, forward ns)."""
    outs = [{} for _ in range(n)]
    threads = [threading.Thread(target=target, args=(i, outs[i]), daemon=True) for i in range(n)]
    stats0 = model_stats(address, model)
    cpu0 = sum(psutil.Process(cloud_pid).cpu_times()[:2])
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    cpu = sum(psutil.Process(cloud_pid).cpu_times()[:2]) - cpu0
    return outs, wall, cpu, model_stats(address, model) - stats0


def summarize(mode: str, batching: str, n: int, outs, wall: float, cpu: float, stats, tokens_each: int,
              common: dict) -> dict:
    ok = [o for o in outs if "error" not in o and "seconds" in o]
    per_token = sorted(1e3 * o["seconds"] / tokens_each for o in ok)
    tokens = tokens_each * len(ok)
    forwards, segments, forward_ns = (int(x) for x in stats)
    return {"kind": "fleet", "mode": mode, "batching": batching, "devices": n, **common,
            "forwards": forwards, "segments_per_forward": round(segments / max(forwards, 1), 2),
            "forward_ms_per_token": round(forward_ns / 1e6 / max(tokens, 1), 3),
            "ms_per_token_median": round(statistics.median(per_token), 2) if per_token else None,
            "ms_per_token_p90": round(per_token[int(0.9 * (len(per_token) - 1))], 2) if per_token else None,
            "ttft_ms_median": round(1e3 * statistics.median(o["first_s"] for o in ok if o.get("first_s")), 2)
            if any(o.get("first_s") for o in ok) else None,
            "cloud_tokens_per_s": round(tokens / wall, 1), "cloud_cpu_ms_per_token": round(1e3 * cpu / max(tokens, 1), 3),
            "wrong_tokens": sum(o.get("wrong", 0) for o in ok), "failed_devices": len(outs) - len(ok),
            "errors": sorted({o["error"] for o in outs if "error" in o})[:3],
            "max_batch_streams": max((o.get("batch", 0) for o in ok), default=0), "wall_s": round(wall, 2)}


LOSSLESS = ("cloud-stream", "cloud-only", "speculative")   # what auto may choose with no quality loss allowed


def joining_device(mode: str, model_dir: Path, k: int, threshold: float, address: str):
    """One real device in `mode` (a lossless mode, or auto): (generate(prompt, n) -> (tokens, AutoResult
    or None), close)."""
    if mode == "cloud-stream":
        stream = CloudStream(address, timeout_s=60.0)
        return (lambda prompt, n: (stream.generate(prompt, n, ignore_eos=True).tokens, None)), stream.close
    edge = CollabLlm(model_dir, mode="speculative" if mode == "auto" else mode, threshold=threshold, exit_layer=k,
                     cloud=address, timeout_s=60.0)
    auto = AutoLlm(edge, rate_mbit=1000.0, max_ppl_increase=0.0) if mode == "auto" else None  # loopback: any rate

    def generate(prompt, n):
        if auto is not None:
            r = auto.generate(prompt, n)
            return r.tokens, r
        r = edge.generate(prompt, n)
        edge.end(r.conversation)
        return r.tokens, None
    return generate, edge.close


def run_joining(n: int, background, model_dir: Path, k: int, threshold: float, address: str, prompt,
                new_tokens: int, reference: list[int], runs: int) -> dict:
    """A real device in each lossless mode, then one in `--mode auto`, each joining n - 1 devices that
    run background(i, j, out) (device i's j-th generation) over and over meanwhile: per mode its
    ms/token over `runs` generations after a warm-up (auto's measures), and what auto chose."""
    stop, first_done = threading.Event(), threading.Event()

    def keep_running(i: int) -> None:
        j = 0
        while not stop.is_set():
            background(i, j, {})
            j += 1
            first_done.set()
    threads = [threading.Thread(target=keep_running, args=(i,), daemon=True) for i in range(n - 1)]
    for t in threads:
        t.start()
    if threads:   # the fleet in its steady state: past its first (prefill) round
        first_done.wait(120)
    ms, wrong, autos = {}, 0, []
    try:
        for mode in (*LOSSLESS, "auto"):
            generate, close = joining_device(mode, model_dir, k, threshold, address)
            try:
                generate(prompt, new_tokens)             # warm-up (auto: measures the link, device and cloud)
                seconds, tokens = 0.0, 0
                for _ in range(runs):
                    t0 = time.perf_counter()
                    out, result = generate(prompt, new_tokens)
                    seconds += time.perf_counter() - t0
                    tokens += len(out)
                    wrong += sum(a != b for a, b in zip(out, reference)) + abs(len(out) - len(reference))
                    if result is not None:
                        autos.append(result)
            finally:
                close()
            ms[mode] = round(1e3 * seconds / max(tokens, 1), 2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    best = min(LOSSLESS, key=ms.get)
    return {"ms_per_token": ms, "chose": [r.mode for r in autos],
            "predicted_ms_per_token": [round(1e3 * r.choice.predicted_s_per_token, 2) for r in autos],
            "predictions_ms_per_token": {row.mode: round(1e3 * row.seconds_per_token, 2) for row in autos[-1].choice.rows},
            "acceptance_estimate": round(autos[-1].observed.acceptance, 3), "wrong_tokens": wrong,
            "best_lossless": best, "auto_over_best": round(ms["auto"] / ms[best], 3)}


def write_stream_model(repo: Path, model: Path, max_streams: int, name: str = "llm_stream", max_rows: int = 0) -> None:
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(
        f'backend = "llm_stream"\n[model_transaction_policy]\ndecoupled = true\n[parameters]\n'
        f'checkpoint = "{model.resolve()}"\nmax_streams = {max_streams}\n'
        f'max_batch_rows = {max_rows or max(256, 2 * max_streams)}\nintra_op_thread_count = 1\n')


def write_fleet_models(repo: Path, model: Path, k: int, max_streams: int) -> None:
    """bench_collab_llm's repository (llm, llm_prop, llm_tok, llm_full; llm_stream here with room for
    max_streams streams) and a twin NAME_one of each model the devices call, with max_batch_rows = 1:
    the same load, unbatched."""
    write_repository(repo, model, k)
    write_stream_model(repo, model, max_streams)
    write_stream_model(repo, model, max_streams, "llm_stream_one", 1)
    for name in ("llm", "llm_prop", "llm_full", "llm_tok"):
        (repo / f"{name}_one" / "1").mkdir(parents=True)   # [parameters] is the file's last table
        (repo / f"{name}_one" / "config.toml").write_text((repo / name / "config.toml").read_text() + "max_batch_rows = 1\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--exit-layer", type=int)
    p.add_argument("--loads", default="1,16,64,256")
    p.add_argument("--modes", default="cloud-stream,cloud-only,collaborative,collaborative-tokens,collaborative-propagated,speculative")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--auto", action="store_true", help="then a --mode auto device at each load (see above)")
    p.add_argument("--auto-runs", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model_dir = Path(args.model)
    meta = read_exits_json(model_dir)
    k = args.exit_layer or max(meta["exit_layers"])
    threshold = meta.get("threshold", {}).get("max_prob", {}).get("value", 0.5)
    loads = [int(n) for n in args.loads.split(",")]
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (ROOT.parent / "shared" / "data" / "shakespeare.txt").read_text(encoding="utf-8")
    prompt = tok.encode(text[int(len(text) * 0.95):]).ids[: args.prompt_tokens]
    common = {"model": str(model_dir), "exit_layer": k, "threshold": threshold, "new_tokens": args.new_tokens,
              "machine": f"{os.cpu_count()} vCPU, cloud pinned to core {SERVER_CORE}, devices on core {CLIENT_CORE}"}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_fleet_models(repo, model_dir, k, max(loads))
        cloud, port = start(["taskset", "-c", str(SERVER_CORE), sys.executable, "-m", "cloud_service.cli", "serve",
                             "--repository", str(repo), "--host", "127.0.0.1", "--port", "0", "--log-level",
                             "WARNING"], r"serving grpcs?://[^:]+:(\d+)")
        os.sched_setaffinity(0, {CLIENT_CORE})
        address = f"127.0.0.1:{port}"
        try:
            with CloudStream(address, timeout_s=60.0) as cloud_stream:   # the cloud model's own greedy tokens
                reference = cloud_stream.generate(prompt, args.new_tokens, ignore_eos=True).tokens
            background, measured = {}, {}   # per mode: background(i, j, out) for --auto; per (mode, n): batched row
            for m, mode in enumerate(args.modes.split(",")):
                if mode == "cloud-stream":
                    def target(i, out, suffix):
                        stream_device(address, "llm_stream" + suffix, prompt, args.new_tokens, reference, out)
                    background[mode] = lambda i, j, out, target=target: target(i, out, "")
                    tokens_each, model = len(reference), "llm_stream"
                else:
                    trace, tokens, end = record(model_dir, address, mode, k, threshold, prompt, args.new_tokens)
                    emit({"kind": "trace", "mode": mode, **common, "requests": len(trace), "tokens": len(tokens),
                          "device_ms_total": round(1e3 * sum(t[0] for t in trace), 2)}, args.out)

                    def target(i, out, suffix, trace=trace, m=m):
                        replay_device(address, trace, ((m + 1) << 40) + (len(suffix) << 32) + i, suffix, out)
                    background[mode] = lambda i, j, out, trace=trace, m=m, end=end: replay_device(
                        address, trace, (1 << 56) + (m << 48) + (j << 16) + i, "", out, end)
                    tokens_each, model = len(tokens), pb.ModelInferRequest.FromString(trace[0][1]).model_name
                for n in loads:
                    rows = {}
                    for batching, suffix in (("batched", ""), ("unbatched", "_one")):
                        outs, wall, cpu, stats = run_load(lambda i, out, suffix=suffix: target(i, out, suffix), n,
                                                          cloud.pid, address, model + suffix)
                        rows[batching] = summarize(mode, batching, n, outs, wall, cpu, stats, tokens_each, common)
                        emit(rows[batching], args.out)
                    measured[mode, n] = rows["batched"]
                    emit({"kind": "ratio", "mode": mode, "devices": n, **common,
                          "batched_over_unbatched_tokens_per_s": round(
                              rows["batched"]["cloud_tokens_per_s"] / max(rows["unbatched"]["cloud_tokens_per_s"], 1e-9),
                              2)}, args.out)
            for n in loads if args.auto else ():
                fleet_best = min((mode for mode in LOSSLESS if (mode, n) in measured),
                                 key=lambda mode: measured[mode, n]["ms_per_token_median"])
                row = run_joining(n, background[fleet_best], model_dir, k, threshold, address, prompt,
                                  args.new_tokens, reference, args.auto_runs)
                emit({"kind": "auto", "devices": n, **common, "background": fleet_best,
                      "fleet_ms_per_token": {mode: measured[mode, n]["ms_per_token_median"]
                                             for mode in LOSSLESS if (mode, n) in measured}, **row}, args.out)
        finally:
            cloud.terminate()
            cloud.wait(30)
    if args.plot and args.out:
        plot(args.out, args.plot)


def plot(results: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if '"fleet"' in line]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):
        for batching, style in (("batched", "o-"), ("unbatched", "x--")):
            mine = sorted((r for r in rows if r["mode"] == mode and r.get("batching", "batched") == batching),
                          key=lambda r: r["devices"])
            if not mine:
                continue
            x, kw = [r["devices"] for r in mine], {"color": f"C{i}", "label": f"{mode} ({batching})"}
            a.plot(x, [r["ms_per_token_median"] for r in mine], style, **kw)
            b.plot(x, [r["cloud_tokens_per_s"] for r in mine], style, **kw)
    for ax, label in ((a, "per-device ms/token (median)"), (b, "cloud tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent devices")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    a.legend(fontsize=7)
    fig.suptitle("one cloud-service process on one core: batched (solid) vs max_batch_rows = 1 (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
