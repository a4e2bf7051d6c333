"""Benchmark cloud-service against raw in-process ONNX Runtime and MLServer 1.7.1, all in one run.

    .venv/bin/python scripts/bench_cloud.py [--quick] [--plot docs/bench_cloud.png] [--out docs/bench_cloud.jsonl]
    .venv/bin/python scripts/bench_cloud.py --auth [--quick]      # only: the per-request cost of auth

Two ONNX models, built here with fixed seeds and a dynamic batch dimension (cached in .cache/bench_cloud/):
  mlp  784-256-10, 0.4 MFLOP per image: overhead-bound
  cnn  ResNet-18 layout on 3x128x128, 1.19 GFLOP per image: compute-bound   (FLOP = 2 x multiply-add)
Servers, all started at once as subprocesses pinned to the first core (taskset -c 0), loaded in turn,
cell by cell, by one closed-loop tritonclient.grpc.aio client in this process, pinned to the second
core; concurrency 1, 4, 16, 64:
  onnxruntime-inprocess   session.run back to back on core 0 in this process, batch = concurrency: the limit
                          (plus the batch sizes cloud-service-batching formed at concurrency 16: CNN target)
  cloud-service           `cloud-service serve`: each request runs alone on the model's executor
  cloud-service-batching  the same with [dynamic_batching] (max_batch_size 64, 500 us queue delay)
  mlserver                MLServer 1.7.1 from its own venv (~/.cache/edgefold/mlserver-venv, installed on first
                          use), runtime scripts/mlserver_onnx_runtime.py, parallel_workers 0, debug off
  mlserver-batching       the same with adaptive batching (max_batch_size 64, max_batch_time 500 us)
Every ONNX Runtime session uses intra_op/inter_op threads = 1. Throughput is concurrency / mean latency
(Little's law for a closed loop: batched answers come in bursts that would quantize a count of them),
the median over 5 sub-windows of each cell; server_cpu_us_per_req is the server process's CPU time
(psutil, children included) over the measured part / requests answered in it. server_core_other_load
(client_core_other_load) is the share of the server's (client's) core that went to anything else: a
neighbour on a shared machine, steal; niced_load is what niced jobs took of either core (they yield
the core, mostly, but still slow us down). Each cell waits (5 s at most) for both cores to be quiet,
and one disturbed by more than 0.10 is measured again, 3 times at most, keeping the quietest; targets
name the cells they rest on that a neighbour (niced or not) disturbed by more than 0.10. stdout: one
JSON object per cell, then one per target (pass/fail); stderr: progress and a markdown table.
Delete .cache/bench_cloud/ after changing a model.

--auth measures what authentication adds per request (issue 15; the measurement is scripts/cloud_auth_cost.py), the mlp model at concurrency 1,
one blocking gRPC client sending pre-encoded ModelInfer requests in blocks of 200. Server S has a
credential store (1000 credentials, app and device) and no token file; each round it is closed
(store-token block) and opened (open and open-with-header blocks: the rows moved to a side table,
so it runs open as a server without credentials does), so the target compares one process with
itself; server T (--token-file, both on the server core) gives the token-file block. Reported:
p50/p99 per variant; per round, each block's p50 minus the open block's, median over rounds (the
target: <= 20 us for a store token; a second target takes open-with-header as the base, leaving
the token lookup and role check alone); server CPU per request; what else ran on the two cores;
and the in-process cost (timeit) of authenticate + role check, of the interceptor's decision and
of the wrapped call.
"""
import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tritonclient.grpc import aio as grpcaio

import loadgen
import mlserver_venv
from cloud_auth_cost import (AUTH_BLOCK, AUTH_QUICK_ROUNDS, AUTH_ROUNDS, measure_auth_inprocess,
                             measure_auth_latency)

ROOT = Path(__file__).resolve().parent.parent
ORT = "onnxruntime-inprocess"
SERVERS = (ORT, "cloud-service", "cloud-service-batching", "mlserver", "mlserver-batching")
MAX_BATCH, MAX_DELAY_US = 64, 500
START_TIMEOUT_S, CALL_TIMEOUT_S = 180, 120
DURATIONS = {"mlp": (1.0, 3.0), "cnn": (2.0, 6.0)}        # (warm-up s, measured s) per cell
QUICK_DURATIONS = {"mlp": (0.3, 1.0), "cnn": (1.0, 2.0)}
OTHER_LOAD_LIMIT, ATTEMPTS = 0.10, 3  # a cell whose server core was busier than this with others is redone
QUIET_WAIT_S = 5                      # before each cell, wait at most this long for both cores to be quiet
CORES = sorted(os.sched_getaffinity(0))
SERVER_CORE, CLIENT_CORE = CORES[0], CORES[-1]


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)




# --- the models ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs plus a shortcut (1x1 conv when the shape changes)."""
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(classes: int = 10) -> nn.Module:  # (B, 3, H, W) -> (B, classes)
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


MODELS = {  # name -> (builder, input shape without the batch dimension)
    "mlp": (lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)), (784,)),
    "cnn": (resnet18, (3, 128, 128)),
}


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """2 x the multiply-adds of every Conv2d and Linear in one forward pass of `example`."""
    macs = 0

    def hook(m, inputs, out):
        nonlocal macs
        per_output = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) \
            else m.in_features
        macs += out.numel() * per_output
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(example)
    for h in handles:
        h.remove()
    return 2 * macs


def build_model(name: str, cache: Path) -> dict:
    """Export `name` to cache/<name>.onnx once; returns its path, input shape, FLOPs and a test input."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    module = make().eval()
    example = torch.zeros(1, *shape)
    path = cache / f"{name}.onnx"
    if not path.exists():
        tmp = cache / f"{name}.tmp.onnx"
        torch.onnx.export(module, (example,), str(tmp), input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
        tmp.replace(path)
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)  # (1, *shape)
    return {"name": name, "path": path, "shape": shape, "flops": count_flops(module, example), "x": x}


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --- raw ONNX Runtime, the limit ---------------------------------------------------------
async def measure_ort(model: dict, batch: int, warmup_s: float, duration_s: float) -> dict:
    """session.run back to back in this thread, moved to the server core for the cell."""
    session = model.setdefault("session", ort_session(model["path"]))
    feeds = {"x": np.repeat(model["x"], batch, axis=0)}  # (batch, *shape)

    async def measure():
        return loadgen.ort_limit(session, feeds, batch, duration_s, warmup_s, (SERVER_CORE, CLIENT_CORE))
    os.sched_setaffinity(0, {SERVER_CORE})
    try:
        r = await loadgen.quietest(measure, [SERVER_CORE], OTHER_LOAD_LIMIT, ATTEMPTS, QUIET_WAIT_S)
    finally:
        os.sched_setaffinity(0, {CLIENT_CORE})
    log(f"  {model['name']} {ORT} batch {batch}: {r['throughput_rps']} images/s")
    return {"model": model["name"], "server": ORT, "concurrency": batch, "batch": batch, **r,
            "requests": r["requests"] * batch}


# --- servers -------------------------------------------------------------------------------
def write_repository(server: str, models: list[dict], root: Path, port: int) -> tuple[list, dict | None]:
    """A repository serving `models` under their own names; returns the server command and env."""
    shutil.rmtree(root, ignore_errors=True)
    batching = server.endswith("-batching")
    if server.startswith("mlserver"):
        return mlserver_venv.repository(root, {m["name"]: m["path"] for m in models}, port,
                                        dict(max_batch_size=MAX_BATCH, max_batch_time=MAX_DELAY_US / 1e6)
                                        if batching else None)
    for m in models:
        (root / m["name"] / "1").mkdir(parents=True)
        shutil.copyfile(m["path"], root / m["name"] / "1" / "model.onnx")
        table = f"[dynamic_batching]\nmax_queue_delay_microseconds = {MAX_DELAY_US}\n" if batching else ""
        (root / m["name"] / "config.toml").write_text(f"max_batch_size = {MAX_BATCH}\n{table}"
                                                      "[parameters]\nintra_op_thread_count = 1\n"
                                                      "inter_op_thread_count = 1\n")
    return [sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(root),
            "--host", "127.0.0.1", "--port", str(port)], None


@contextlib.asynccontextmanager
async def started(server: str, models: list[dict], cache: Path):
    """Start `server` pinned to the server core, check one answer per model against ONNX Runtime,
    yield (tritonclient.grpc.aio client, process); stopped on exit, whatever happened."""
    if server.startswith("mlserver") and (why := mlserver_venv.ensure(log)):
        raise RuntimeError(why)
    port, root, log_path = loadgen.free_port(), cache / f"repo-{server}", cache / f"{server}.log"
    cmd, env = write_repository(server, models, root, port)
    with loadgen.server_process(cmd, SERVER_CORE, log_path, env, cwd=root) as proc:
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            await loadgen.wait_ready(client, proc, [m["name"] for m in models], log_path, START_TIMEOUT_S)
            for m in models:
                got = (await client.infer(m["name"], [infer_input(m)], client_timeout=CALL_TIMEOUT_S)).as_numpy("y")
                want = ort_session(m["path"]).run(None, {"x": m["x"]})[0]
                if got is None or got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                    raise RuntimeError(f"{server} answered {got!r} for model {m['name']}, ONNX Runtime says {want!r}")
            log(f"{server} ready (log: {log_path})")
            yield client, proc
        finally:
            await client.close()


def infer_input(model: dict) -> grpcaio.InferInput:
    x = grpcaio.InferInput("x", list(model["x"].shape), "FP32")
    x.set_data_from_numpy(model["x"])
    return x


async def measure_server(server: str, client, proc, model: dict, concurrency: int, durations) -> dict:
    warmup_s, duration_s = durations[model["name"]]
    r = await loadgen.quietest(lambda: loadgen.measure_server_cell(
        client, model["name"], [infer_input(model)], concurrency, proc.pid, (SERVER_CORE, CLIENT_CORE),
        warmup_s, duration_s, batch_stats=server == "cloud-service-batching", timeout_s=CALL_TIMEOUT_S),
        [SERVER_CORE, CLIENT_CORE], OTHER_LOAD_LIMIT, ATTEMPTS, QUIET_WAIT_S)
    log(f"  {model['name']} {server} c={concurrency}: {r['throughput_rps']} req/s, p50 {r['p50_ms']} ms, "
        f"p99 {r['p99_ms']} ms, server {r['server_cpu_us_per_req']} us/req")
    return {"model": model["name"], "server": server, "concurrency": concurrency, **r}


def run_auth(args) -> list[dict]:
    args.cache.mkdir(parents=True, exist_ok=True)
    model = build_model("mlp", args.cache)
    rows = measure_auth_inprocess(args.cache)
    for r in rows:
        log(f"  {r['inprocess']}: {r['us_per_call']} us")
    rounds = AUTH_QUICK_ROUNDS if args.quick else AUTH_ROUNDS
    rows += measure_auth_latency(model, lambda root, port: write_repository("cloud-service", [model], root, port)[0],
                                 args.cache, rounds)
    v = {r["variant"]: r for r in rows if "variant" in r}
    store, legacy, header = v["store-token"], v["token-file"], v["open-with-header"]
    rows.append(check("auth_p50_added_us", store["p50_added_us"], "<=", 20,
                      f"ModelInfer p50 with a credential-store app token minus the same server process opened (no "
                      f"credentials, no header), median of {rounds} interleaved rounds of {AUTH_BLOCK} requests, "
                      f"concurrency 1; of it, carrying "
                      f"the header: {header['p50_added_us']} us, checking it: "
                      f"{store['p50_added_us_vs_open_with_header']} us; token file (another process): "
                      f"{legacy['p50_added_us']} us; "
                      f"server CPU added: {store['server_cpu_added_us_per_req']} us/req (store), "
                      f"{legacy['server_cpu_added_us_per_req']} (token file)", [], model="mlp"))
    rows.append(check("auth_check_p50_added_us", store["p50_added_us_vs_open_with_header"], "<=", 20,
                      "the token hash lookup and role check alone: ModelInfer p50 with a credential-store app token "
                      "minus the same server opened and sent the same header, median of per-round differences", [],
                      model="mlp"))
    return rows


# --- comparisons, targets, output --------------------------------------------------------------
def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_onnxruntime_b1: throughput / raw ORT at batch 1; cloud-service rows also get
    ratio_vs_mlserver(-batching): throughput / MLServer's in the same batching mode and concurrency."""
    by = {(r["model"], r["server"], r["concurrency"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        if (base := by.get((r["model"], ORT, 1))) and base["throughput_rps"]:
            r["ratio_vs_onnxruntime_b1"] = round(r["throughput_rps"] / base["throughput_rps"], 3)
        peer = r["server"].replace("cloud-service", "mlserver")
        if peer != r["server"] and (base := by.get((r["model"], peer, r["concurrency"]))) and base["throughput_rps"]:
            r[f"ratio_vs_{peer}"] = round(r["throughput_rps"] / base["throughput_rps"], 3)


def check(name: str, measured, ok_if: str, limit: float, compares: str, used: list, **where) -> dict:
    """A target row; `used` are the cells it rests on, named in 'disturbed' if a neighbour disturbed them."""
    row = {"target": name, **where, "measured": measured, "limit": f"{ok_if} {limit}", "compares": compares}
    if measured is None:
        return {**row, "pass": None, "error": "not measured in this run"}
    row["pass"] = bool(measured >= limit if ok_if == ">=" else measured <= limit)
    noisy = [f"{r['model']}/{r['server']}/c{r['concurrency']}" for r in used if r and max(
        r["server_core_other_load"], r["client_core_other_load"], r["niced_load"]) > OTHER_LOAD_LIMIT]
    return {**row, "disturbed": noisy} if noisy else row


def targets(rows: list[dict]) -> list[dict]:
    by = {(r["model"], r["server"], r["concurrency"]): r for r in rows if "error" not in r}
    cloud, out = ("cloud-service", "cloud-service-batching"), []
    best = lambda rs: max((r for r in rs if r), key=lambda r: r["throughput_rps"], default=None)  # noqa: E731
    # 1. MLP, concurrency 16: the best cloud-service variant >= 2x the best MLServer variant
    a = best(by.get(("mlp", s, 16)) for s in cloud)
    b = best(by.get(("mlp", s, 16)) for s in ("mlserver", "mlserver-batching"))
    out.append(check("mlp_c16_throughput_vs_mlserver", round(a["throughput_rps"] / b["throughput_rps"], 2)
                     if a and b and b["throughput_rps"] else None, ">=", 2.0,
                     f"{a and a['server']} {a and a['throughput_rps']} req/s / {b and b['server']} "
                     f"{b and b['throughput_rps']} req/s (best variant of each), concurrency 16", [a, b], model="mlp"))
    for s in cloud:  # 2. MLP, concurrency 16: server CPU per request
        r = by.get(("mlp", s, 16))
        out.append(check("mlp_c16_server_cpu_us_per_req", r and r["server_cpu_us_per_req"], "<=", 250,
                         "server process CPU time / requests answered, concurrency 16", [r], model="mlp", server=s))
    for s in cloud:  # 3. CNN, concurrency 16: images/s vs raw ORT's best at a batch the server runs
        r = by.get(("cnn", s, 16))
        largest = r.get("max_batch", 1) if r else 1
        base = best(o for (m, srv, c), o in by.items() if m == "cnn" and srv == ORT and c <= largest)
        formed = f" (batches formed: mean {r['mean_batch']}, max {largest})" if r and "max_batch" in r else ""
        out.append(check("cnn_c16_throughput_vs_onnxruntime", round(r["throughput_rps"] / base["throughput_rps"], 3)
                         if r and base else None, ">=", 0.95,
                         f"{s} images/s at concurrency 16{formed} / raw ONNX Runtime's best images/s at a batch "
                         f"<= {largest} (batch {base and base['batch']}: {base and base['throughput_rps']})",
                         [r, base], model="cnn", server=s))
    for m in ("mlp", "cnn"):  # 4. concurrency 1: p99 <= 2 x p50
        for s in cloud:
            r = by.get((m, s, 1))
            out.append(check("c1_p99_over_p50", round(r["p99_ms"] / r["p50_ms"], 2) if r and r["p50_ms"] else None,
                             "<=", 2.0, f"p99 {r and r['p99_ms']} ms / p50 {r and r['p50_ms']} ms, concurrency 1",
                             [r], model=m, server=s))
    return out


def markdown(rows: list[dict]) -> str:
    cols = ["model", "server", "concurrency", "throughput_rps", "p50_ms", "p99_ms", "server_cpu_us_per_req",
            "mean_batch", "server_core_other_load", "ratio_vs_onnxruntime_b1", "ratio_vs_mlserver",
            "ratio_vs_mlserver-batching"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get("error", "")[:60] if c == "throughput_rps" and "error" in r else r.get(c, "") for c in cols]
        lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], models: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        values = []
        for server in SERVERS:
            points = sorted((r["concurrency"], r["throughput_rps"]) for r in rows
                            if r["model"] == m["name"] and r["server"] == server and "error" not in r)
            if points:
                label = "onnxruntime in-process (batch = concurrency)" if server == ORT else server
                ax.plot(*zip(*points), marker="o", linestyle="--" if server == ORT else "-", label=label)
                values += [v for _, v in points]
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16, 64], ["1", "4", "16", "64"])
        if values and max(values) > 20 * max(min(values), 1e-9):
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        flops = f"{m['flops'] / 1e9:.3g} GFLOP" if m["flops"] >= 1e8 else f"{m['flops'] / 1e6:.3g} MFLOP"
        ax.set_title(f"{m['name']} ({flops} per image)")
        ax.set_xlabel("concurrent requests (1 image each)")
        ax.set_ylabel("images/s" + (" (log)" if ax.get_yscale() == "log" else ""))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"bench_cloud: {title}; servers on 1 core, client on another", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


async def run(args) -> tuple[list[dict], list[dict]]:
    """Start every server at once (idle ones cost nothing), then measure each (model, concurrency) cell on
    every server back to back, so the comparisons in a row are minutes apart at most, under the same
    neighbours. Raw ONNX Runtime goes first in each cell, at batch = concurrency; after the batching
    cloud-service cell at concurrency 16 it also runs at the batch sizes that batcher formed."""
    args.cache.mkdir(parents=True, exist_ok=True)
    durations = QUICK_DURATIONS if args.quick else DURATIONS
    models = [build_model(name, args.cache) for name in args.models]
    rows, live = [], {}
    async with contextlib.AsyncExitStack() as stack:
        for server in (s for s in args.servers if s != ORT):
            try:
                live[server] = await stack.enter_async_context(started(server, models, args.cache))
            except Exception as err:  # one server failing must not stop the others
                log(f"{server} failed: {err}")
                rows += [{"model": m["name"], "server": server, "concurrency": c,
                          "error": f"{type(err).__name__}: {err}"} for m in models for c in args.concurrency]
        for m in models:
            for c in args.concurrency:
                if ORT in args.servers:
                    rows.append(await measure_ort(m, c, *durations[m["name"]]))
                for server, (client, proc) in live.items():
                    rows.append(r := await measure_server(server, client, proc, m, c, durations))
                    if ORT in args.servers and server == "cloud-service-batching" and c == 16:
                        formed = {round(r["mean_batch"]), r["max_batch"]} - {0, *args.concurrency}
                        rows += [await measure_ort(m, b, *durations[m["name"]]) for b in sorted(formed)]
    order = {name: i for i, name in enumerate(args.models)}
    rows.sort(key=lambda r: (SERVERS.index(r["server"]), order[r["model"]], r["concurrency"]))
    return models, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short cells: a smoke run")
    parser.add_argument("--models", default="mlp,cnn", type=lambda s: s.split(","))
    parser.add_argument("--servers", default=",".join(SERVERS), type=lambda s: s.split(","))
    parser.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--plot", type=Path, help="PNG: throughput vs concurrency, one panel per model")
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_cloud")
    parser.add_argument("--auth", action="store_true", help="only measure what authentication adds per request")
    args = parser.parse_args()
    for name, allowed in (("models", MODELS), ("servers", SERVERS)):
        if unknown := set(getattr(args, name)) - set(allowed):
            parser.error(f"--{name}: unknown {sorted(unknown)}; choose from {', '.join(allowed)}")
    os.sched_setaffinity(0, {CLIENT_CORE})  # the client; servers get SERVER_CORE
    torch.set_num_threads(1)
    if len(CORES) < 2:
        log(f"warning: only core {SERVER_CORE} is available: client and servers share it")
    t_start = time.monotonic()
    if args.auth:
        rows = [{"bench": "cloud", "machine": loadgen.machine(), **r} for r in run_auth(args)]
        print("\n".join(json.dumps(r) for r in rows), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for t in (r for r in rows if "target" in r):
            log(f"{'PASS' if t['pass'] else 'FAIL'} {t['target']}: {t['measured']} (want {t['limit']}): {t['compares']}")
        log(f"done in {time.monotonic() - t_start:.0f} s")
        return
    models, rows = asyncio.run(run(args))
    add_ratios(rows)
    host = loadgen.machine()
    info = {m["name"]: {"input_shape": [1, *m["shape"]], "flops_per_image": m["flops"]} for m in models}
    rows = [{"bench": "cloud", "machine": host, **r, **info[r["model"]]} for r in rows]
    rows += [{"bench": "cloud", "machine": host, **t} for t in targets(rows)]
    lines = [json.dumps(r) for r in rows]
    print("\n".join(lines), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    if args.plot:
        plot([r for r in rows if "server" in r and "target" not in r], models, args.plot, host)
    log(markdown([r for r in rows if "target" not in r]))
    for t in (r for r in rows if "target" in r):
        log(f"{'PASS' if t['pass'] else 'FAIL' if t['pass'] is False else 'N/A '} {t['target']} "
            f"{t.get('model', '')} {t.get('server', '')}: {t['measured']} (want {t['limit']}): {t['compares']}")
    log(f"done in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
