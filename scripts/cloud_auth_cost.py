"""The cost of authentication on cloud-service (issue 15), measured for `scripts/bench_cloud.py --auth`:

    rows = measure_auth_inprocess(cache)                      # token + role check, interceptor, wrapper (timeit)
    rows += measure_auth_latency(model, serve_command, cache, rounds)   # ModelInfer p50: open / open + header / token / token file

One server process with 1,000 credentials, opened and closed between interleaved rounds (its rows moved
to a side table), so "open" and "store-token" are the same process; "token-file" is a second one.
The server runs on the first of this process's cores, the client on the last (as bench_cloud).
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import loadgen

CORES = sorted(os.sched_getaffinity(0))
SERVER_CORE, CLIENT_CORE = CORES[0], CORES[-1]
START_TIMEOUT_S, CALL_TIMEOUT_S = 180, 120


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)

AUTH_VARIANTS = ("open", "open-with-header", "store-token", "token-file")   # open-with-header: the server opened,
# sent the store token's header all the same (ignored): what carrying the header costs, apart from checking it
AUTH_ROUNDS, AUTH_BLOCK, AUTH_WARMUP = 100, 200, 1000           # quick: AUTH_QUICK_ROUNDS rounds
AUTH_QUICK_ROUNDS, AUTH_TOKENS = 15, 1000


def _cli(*args) -> str:
    return subprocess.run([sys.executable, "-m", "cloud_service.cli", *map(str, args)], check=True,
                          capture_output=True, text=True, timeout=120).stdout


def _serve_auth(name: str, serve_command, cache: Path, stack: contextlib.ExitStack, extra=(), metadata=None):
    """Start `cloud-service serve` for the auth bench on the server core; (channel, pid, repository).
    serve_command(root, port): the command serving the model from a repository it writes at root."""
    import grpc
    from edgefold_proto import METHODS
    port, root, log_path = loadgen.free_port(), cache / f"repo-auth-{name}", cache / f"auth-{name}.log"
    cmd = serve_command(root, port)
    if name == "store":
        from cloud_service.credentials import CredentialStore
        from cloud_service.state import StateStore
        store = CredentialStore(StateStore(root))
        for i in range(AUTH_TOKENS - 1):
            store.add("device" if i % 2 else "app", device_id=f"bench-{i}" if i % 2 else None)
    proc = stack.enter_context(loadgen.server_process(cmd + list(extra), SERVER_CORE, log_path, None, cwd=root))
    channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}"))
    live, deadline = channel.unary_unary(METHODS["ServerLive"].path), time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited: {loadgen.tail(log_path)}")
        try:
            live(b"", timeout=2, metadata=metadata)
            return channel, proc.pid, root
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:      # it answers (and wants a token)
                return channel, proc.pid, root
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} server not ready: {err.details()} {loadgen.tail(log_path)}")
            time.sleep(0.2)


def set_open(channel, root: Path, want_open: bool) -> None:
    """Open or close the credential-store server: a server with no credential rows runs open, so move
    the rows aside (a side table in its own throwaway state database) or back, and wait until it shows."""
    import sqlite3
    import grpc
    from cloud_service.state import state_path
    from edgefold_proto import METHODS
    with contextlib.closing(sqlite3.connect(state_path(root), timeout=10)) as db, db:
        db.execute("CREATE TABLE IF NOT EXISTS bench_parked AS SELECT * FROM credentials WHERE 0")
        source, target = ("credentials", "bench_parked") if want_open else ("bench_parked", "credentials")
        db.execute(f"INSERT INTO {target} SELECT * FROM {source}")
        db.execute(f"DELETE FROM {source}")
    live, deadline = channel.unary_unary(METHODS["ServerLive"].path), time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            live(b"", timeout=10)
            if want_open:
                return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            if not want_open:
                return
        time.sleep(0.02)
    raise TimeoutError(f"the server did not become {'open' if want_open else 'closed'} within 30 s")


def auth_block(infer, request: bytes, metadata, n: int) -> list[int]:
    """n ModelInfer calls back to back; their latencies in ns."""
    out, now = [], time.perf_counter_ns
    for _ in range(n):
        t0 = now()
        infer(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        out.append(now() - t0)
    return out


def measure_auth_latency(model: dict, serve_command, cache: Path, rounds: int) -> list[dict]:
    """Server S has a credential store (1000 credentials) and no token file: each round it is closed
    (store-token) and opened (open, open-with-header) in turn, so the target compares one process with
    itself; server T has --token-file (compared with S's open blocks: two processes)."""
    from edgefold_proto import METHODS, pb
    request = pb.ModelInferRequest(model_name=model["name"], raw_input_contents=[model["x"].tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=model["x"].shape)
    raw = request.SerializeToString()
    lat, block_p50 = {v: [] for v in AUTH_VARIANTS}, {v: [] for v in AUTH_VARIANTS}
    cpu = dict.fromkeys(AUTH_VARIANTS, 0.0)
    (cache / "auth-token-file").write_text("bench-legacy-token\n")
    with contextlib.ExitStack() as stack:
        s_channel, s_pid, s_root = _serve_auth("store", serve_command, cache, stack)
        token = json.loads(_cli("token", "add", "--repository", s_root, "--role", "app", "--json"))["token"]
        header, legacy = (("authorization", f"Bearer {token}"),), (("authorization", "Bearer bench-legacy-token"),)
        t_channel, t_pid, _ = _serve_auth("token-file", serve_command, cache, stack,
                                          ["--token-file", str(cache / "auth-token-file")], legacy)
        set_open(s_channel, s_root, False)
        s_infer, t_infer = (c.unary_unary(METHODS["ModelInfer"].path) for c in (s_channel, t_channel))
        variants = {"open": (s_infer, None, s_pid, True), "open-with-header": (s_infer, header, s_pid, True),
                    "store-token": (s_infer, header, s_pid, False), "token-file": (t_infer, legacy, t_pid, False)}
        for v in ("store-token", "token-file"):
            auth_block(variants[v][0], raw, variants[v][1], AUTH_WARMUP)
        t0, client0, busy0 = time.monotonic(), time.process_time(), [loadgen.core_busy_s(c) for c in
                                                                       (SERVER_CORE, CLIENT_CORE)]
        is_open = False
        for r in range(rounds):
            for phase in ((not is_open), is_open):          # the current state first: one switch per round
                if phase != is_open:
                    set_open(s_channel, s_root, phase)
                    is_open = phase
                group = [v for v in AUTH_VARIANTS if variants[v][3] == phase]
                for v in group[r % len(group):] + group[:r % len(group)]:
                    infer, metadata, pid, _ = variants[v]
                    auth_block(infer, raw, metadata, AUTH_BLOCK // 10)      # unmeasured: after the switch
                    cpu0 = loadgen.process_cpu_s(pid)
                    block = auth_block(infer, raw, metadata, AUTH_BLOCK)
                    cpu[v] += loadgen.process_cpu_s(pid) - cpu0
                    lat[v] += block
                    block_p50[v].append(float(np.median(block)))
        busy1, elapsed = [loadgen.core_busy_s(c) for c in (SERVER_CORE, CLIENT_CORE)], time.monotonic() - t0
        # what else ran on the two cores meanwhile (a shared machine): the figures are only as good as this is low
        others = loadgen.neighbour_load(busy0, busy1, [sum(cpu.values()), time.process_time() - client0], elapsed)
        log(f"  auth: {rounds} rounds x {len(AUTH_VARIANTS)} blocks of {AUTH_BLOCK} in {elapsed:.0f} s; {others}")
        set_open(s_channel, s_root, False)      # the parked rows back
    rows = []
    for v in AUTH_VARIANTS:
        a = np.array(lat[v]) / 1e3
        row = {"section": "auth", "model": model["name"], "variant": v, "concurrency": 1, "requests": len(a),
               "server": "token-file" if v == "token-file" else "credential-store",
               "p50_us": round(float(np.percentile(a, 50)), 1), "p99_us": round(float(np.percentile(a, 99)), 1),
               "server_cpu_us_per_req": round(cpu[v] / len(a) * 1e6, 1), **others}
        for base in ("open", "open-with-header"):
            if v not in ("open", base):
                diffs = np.array(block_p50[v]) - np.array(block_p50[base])       # per round: paired
                suffix = "" if base == "open" else "_vs_open_with_header"
                row["p50_added_us" + suffix] = round(float(np.median(diffs)) / 1e3, 1)
                row["p50_added_us_iqr" + suffix] = [round(float(q) / 1e3, 1) for q in np.percentile(diffs, [25, 75])]
                row["server_cpu_added_us_per_req" + suffix] = round(
                    (cpu[v] / len(a) - cpu[base] / len(lat[base])) * 1e6, 1)
        rows.append(row)
    return rows


def measure_auth_inprocess(cache: Path) -> list[dict]:
    """timeit: authenticate + role check alone, the interceptor's whole decision, and the wrapped call."""
    import timeit
    import grpc
    from cloud_service.auth import AuthInterceptor, required_role
    from cloud_service.credentials import CredentialStore, Credentials
    from cloud_service.state import StateStore
    from edgefold_proto import METHODS
    root = cache / "auth-inprocess"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = CredentialStore(StateStore(root))
    tokens = [store.add("app")[1] for _ in range(AUTH_TOKENS)]     # the lookup is a dict, whatever the count
    creds = Credentials(StateStore(root), token="bench-legacy-token")
    path = METHODS["ModelInfer"].path
    header = f"Bearer {tokens[AUTH_TOKENS // 2]}"

    def check(authorization):
        caller = creds.authenticate(authorization)
        assert caller.at_least(required_role(path))

    async def behavior(request, context):
        return request

    handler = grpc.unary_unary_rpc_method_handler(behavior)

    async def continuation(details):
        return handler

    class Details:
        method, invocation_metadata = path, (("user-agent", "grpc-python"), ("authorization", header))

    def run(coro):       # nothing here suspends: drive the coroutine by hand, no event loop in the figure
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        raise RuntimeError("suspended")

    interceptor = AuthInterceptor(creds)
    wrapped = run(interceptor.intercept_service(continuation, Details))
    open_root = cache / "auth-inprocess-open"
    shutil.rmtree(open_root, ignore_errors=True)
    open_root.mkdir()
    open_creds = Credentials(StateStore(open_root))         # no credentials: the server runs open
    open_interceptor = AuthInterceptor(open_creds)
    cases = {
        "authenticate_and_role_check_store_token": lambda: check(header),
        "authenticate_and_role_check_token_file": lambda: check("Bearer bench-legacy-token"),
        "interceptor_decision_store_token": lambda: run(interceptor.intercept_service(continuation, Details)),
        "interceptor_decision_store_token_first_call": lambda: (interceptor._passed.clear(), run(
            interceptor.intercept_service(continuation, Details))),    # after a reload: checked, then remembered
        "interceptor_decision_open": lambda: run(open_interceptor.intercept_service(continuation, Details)),
        "wrapped_unary_call": lambda: run(wrapped.unary_unary(b"", None)),
        "plain_unary_call": lambda: run(behavior(b"", None)),
    }
    rows = []
    for name, fn in cases.items():
        n = 20000
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        rows.append({"section": "auth", "inprocess": name, "us_per_call": round(best * 1e6, 2),
                     "credentials_in_table": AUTH_TOKENS})
    creds.close()
    open_creds.close()
    return rows
