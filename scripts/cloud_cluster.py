"""A cloud of several replicas behind a stock load balancer, on loopback: cloud-service or MLServer
replicas (the LLM continuation through cloud_service.mlserver_runtime), and HAProxy (from the OS
packages) routing every gRPC request by its `x-sequence-id` header (consistent hashing, HTTP/2 to
the gRPC backends), so all requests of a collaborative-LLM session reach the replica that holds its
KV cache. A replica that dies is marked down within a health-check interval. A request that finds
it dead (connection refused), or that was inside it when it died (the connection closes with no
answer), is sent to the next replica of the ring, which does not hold the session and answers
FAILED_PRECONDITION, and the device resyncs there (edge_runtime.collab.device): same tokens, none
lost or repeated. Requests above the balancer's buffer (256 KiB: a resync of ~1,000 int8 states of
a 256-wide model) cannot be resent by it; such a request lost inside a dying replica reaches the
device as UNAVAILABLE, and that one token is decided on the device, flagged degraded.

    .venv/bin/python scripts/cloud_cluster.py --repository DIR --replicas 2 [--port 8001] [--pin] \\
        [--kind cloud-service|mlserver]

prints the balancer's address and serves until Ctrl-C; in tests and benchmarks:

    with CloudCluster(repository, replicas=2, pin=True) as cluster:
        client = OipClient(cluster.address)
        cluster.replicas[0].kill()

MLServer replicas serve the repository's llm_continuation models (their config.toml [parameters] and
[sequence_batching] become model-settings.json's parameters.extra), from MLServer's own venv
(scripts/mlserver_venv.py, installed on first use). Without HAProxy: `apt-get install haproxy` (Debian/Ubuntu; CI's .ci/run does it when absent).
Pinned (`pin=True`), replica i runs on core i mod the cores this process may use, with one torch
thread; the balancer is not pinned.
"""
import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import mlserver_venv  # noqa: E402
from cloud_service.config import load_config  # noqa: E402
from edge_runtime.client.oip_client import SEQUENCE_HEADER, OipClient, build_request, routing_headers  # noqa: E402
from loadgen import free_port  # noqa: E402

KINDS = ("cloud-service", "mlserver")

INSTALL_HINT = "install it from the OS packages: apt-get install haproxy"
HEALTH_CHECK_MS = 200


def haproxy_missing() -> str | None:
    """Why the balancer cannot run here (None when it can)."""
    return None if shutil.which("haproxy") else f"HAProxy is not installed; {INSTALL_HINT}"


def haproxy_config(port: int, backends: list[int]) -> str:
    """Consistent hashing on the sequence-id header; a request without one (health, metadata) goes
    round robin. A refused connection, or one closed with no answer, is retried on another replica
    (`redispatch` walks the ring past the one that failed). Even shares: `weight 100` puts 1,600
    points per replica on the hash ring instead of 16 (on 400 random ids, 198/202 between two
    replicas instead of 164/236), and `avalanche` mixes sdbm's hash of the decimal ids (on 1,000,
    496/504 instead of 458/542)."""
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} proto h2 check inter {HEALTH_CHECK_MS}ms fall 1 rise 2 weight 100"
                        for i, p in enumerate(backends))
    return f"""global
    maxconn 4096
    tune.bufsize 262144

defaults
    mode http
    timeout connect 1s
    timeout client 5m
    timeout server 5m
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend oip
    bind 127.0.0.1:{port} proto h2
    default_backend replicas

backend replicas
    balance hdr({SEQUENCE_HEADER})
    hash-type consistent sdbm avalanche
    http-response set-header x-replica %[srv_name]
{servers}
"""


@dataclass
class Replica:
    """One cloud-service process; `kill()` is what a crash looks like to the balancer."""
    proc: subprocess.Popen
    address: str
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


def start_replica(repository: Path, log: Path, core: int | None, kind: str = "cloud-service",
                  start_timeout_s: float = 90.0) -> Replica:
    """One replica on a free loopback port, optionally pinned to `core` with one torch thread."""
    if kind == "mlserver":
        port = free_port()
        cmd, env = mlserver_venv.llm_repository(log.with_suffix(""), mlserver_models(repository), port)
    else:
        port = None
        cmd = [sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(repository),
               "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PYTHONUNBUFFERED"] = "1"
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + start_timeout_s
    while port is None and time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"serving grpcs?://[^:]+:(\d+)", log.read_text(errors="replace"))
        if found:
            port = int(found.group(1))
        else:
            time.sleep(0.05)
    if port is None:
        with contextlib.suppress(OSError):
            proc.kill()
        raise RuntimeError(f"{kind} replica did not start: {log.read_text(errors='replace')[-1500:]}")
    return Replica(proc, f"127.0.0.1:{port}", log)


def mlserver_models(repository: Path) -> dict:
    """The repository's llm_continuation models as MLServer parameters.extra (name -> dict)."""
    models = {}
    for config_file in sorted(Path(repository).glob("*/config.toml")):
        config = load_config(config_file.parent)
        if config.backend != "llm_continuation":
            continue
        extra = dict(config.parameters, max_sequence_idle_microseconds=config.sequence_idle_us,
                     max_state_bytes=config.max_state_bytes)
        checkpoint = Path(str(extra.get("checkpoint", ".")))
        extra["checkpoint"] = str(checkpoint if checkpoint.is_absolute() else config_file.parent / "1" / checkpoint)
        models[config.name] = extra
    if not models:
        raise RuntimeError(f"{repository}: no llm_continuation model for MLServer replicas to serve")
    return models


def wait_ready(address: str, timeout_s: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Until ServerReady answers true at `address` (through the balancer: at some replica)."""
    deadline = time.monotonic() + timeout_s
    with OipClient(address, timeout_s=1.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode}")
            with contextlib.suppress(Exception):
                if client.ready():
                    return
            time.sleep(0.05)
    raise TimeoutError(f"{what or address} not ready within {timeout_s} s")


class CloudCluster:
    """N replicas (cloud-service or MLServer) over one model repository, behind HAProxy; a context manager."""

    def __init__(self, repository: Path, replicas: int = 2, port: int | None = None, pin: bool = False,
                 workdir: Path | None = None, kind: str = "cloud-service", start_timeout_s: float = 90.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        why = haproxy_missing() or (mlserver_venv.ensure(log=lambda _: None) if kind == "mlserver" else None)
        if why:
            raise RuntimeError(why)
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="cloud_cluster_")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cores = sorted(os.sched_getaffinity(0))
        self.replicas: list[Replica] = []
        self.balancer = None
        try:
            for i in range(replicas):
                core = cores[i % len(cores)] if pin else None
                self.replicas.append(start_replica(Path(repository), self.workdir / f"replica{i}.log", core,
                                                   kind, start_timeout_s))
            for i, replica in enumerate(self.replicas):
                wait_ready(replica.address, start_timeout_s, replica.proc, f"replica {i}")
            self.port = port or free_port()
            config = self.workdir / "haproxy.cfg"
            config.write_text(haproxy_config(self.port, [int(r.address.rsplit(":", 1)[1]) for r in self.replicas]))
            self.balancer_log = self.workdir / "haproxy.log"
            with open(self.balancer_log, "w") as out:   # -db: foreground, no daemon
                self.balancer = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=out,
                                                 stderr=subprocess.STDOUT)
            self.address = f"127.0.0.1:{self.port}"
            wait_ready(self.address, 30.0, self.balancer, "haproxy")
        except BaseException:
            self.stop()
            raise

    def replica_of(self, sequence_id) -> int:
        """The replica the balancer routes `sequence_id` to now (asked through the balancer itself:
        its `x-replica` response header, on a request no replica serves)."""
        request = build_request("(routing probe)", {"x": np.zeros(1, np.float32)},
                                parameters={"sequence_id": sequence_id})
        with OipClient(self.address, timeout_s=5.0) as client:
            call = client.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                              request_serializer=type(request).SerializeToString,
                                              response_deserializer=lambda b: b)
            try:
                _, info = call.with_call(request, timeout=5.0, metadata=routing_headers(request))
            except grpc.RpcError as err:    # NOT_FOUND: the model does not exist; the header is there
                info = err
            names = dict((info.initial_metadata() or ()) + (info.trailing_metadata() or ()))
        return int(names["x-replica"][1:])

    def stop(self) -> None:
        if self.balancer is not None and self.balancer.poll() is None:
            self.balancer.terminate()
            try:
                self.balancer.wait(10)
            except subprocess.TimeoutExpired:
                self.balancer.kill()
        for replica in self.replicas:
            replica.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, type=Path, help="cloud-service model repository")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8001, help="the balancer's port on 127.0.0.1")
    parser.add_argument("--pin", action="store_true", help="pin replica i to core i (mod cores), one thread each")
    parser.add_argument("--kind", choices=KINDS, default="cloud-service")
    args = parser.parse_args()
    try:
        cluster = CloudCluster(args.repository, args.replicas, args.port, args.pin, kind=args.kind)
    except (RuntimeError, TimeoutError, ValueError) as err:
        raise SystemExit(f"cloud_cluster: {err}")
    with cluster:
        for i, replica in enumerate(cluster.replicas):
            print(f"replica {i}: {replica.address} (log {replica.log})")
        print(f"balancer: grpc://{cluster.address} (hashing on {SEQUENCE_HEADER})", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
