"""A cloud of several replicas behind a stock load balancer, on loopback: HAProxy (from the OS
packages) routes every gRPC request by its `x-sequence-id` header (consistent hashing, HTTP/2 to
the gRPC backends), so all requests of a collaborative-LLM session reach the replica that holds its
KV cache. A replica that dies is marked down within a health-check interval; a request that finds
it dead is retried on the next replica of the ring, which does not hold the session and answers
FAILED_PRECONDITION, and the device resyncs (edge_runtime.collab.device). A request already inside
the dead replica is lost with it and not retried (the balancer cannot know whether it ran): the
device sees UNAVAILABLE and answers that token itself, flagged degraded.

    .venv/bin/python scripts/cloud_cluster.py --repository DIR --replicas 2 [--port 8001] [--pin]

prints the balancer's address and serves until Ctrl-C; in tests and benchmarks:

    with CloudCluster(repository, replicas=2, pin=True) as cluster:
        client = OipClient(cluster.address)
        cluster.replicas[0].kill()

Without HAProxy: `apt-get install haproxy` (Debian/Ubuntu; CI's .ci/run does it when absent).
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

from edge_runtime.client.oip_client import SEQUENCE_HEADER, OipClient, build_request, routing_headers  # noqa: E402
from loadgen import free_port  # noqa: E402

INSTALL_HINT = "install it from the OS packages: apt-get install haproxy"
HEALTH_CHECK_MS = 200


def haproxy_missing() -> str | None:
    """Why the balancer cannot run here (None when it can)."""
    return None if shutil.which("haproxy") else f"HAProxy is not installed; {INSTALL_HINT}"


def haproxy_config(port: int, backends: list[int]) -> str:
    """Consistent hashing on the sequence-id header; a request without one (health, metadata) goes
    round robin. A refused connection is retried on another replica (`redispatch` walks the ring
    past the dead one); one that reached a replica is never sent twice."""
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} proto h2 check inter {HEALTH_CHECK_MS}ms fall 1 rise 2"
                        for i, p in enumerate(backends))
    return f"""global
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 5m
    timeout server 5m
    retries 3
    option redispatch 1
    retry-on conn-failure

frontend oip
    bind 127.0.0.1:{port} proto h2
    default_backend replicas

backend replicas
    balance hdr({SEQUENCE_HEADER})
    hash-type consistent
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


def start_replica(repository: Path, log: Path, core: int | None, start_timeout_s: float = 90.0) -> Replica:
    """cloud-service on a free loopback port (the one it prints), optionally pinned to `core`."""
    cmd = [sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(repository),
           "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"serving grpcs?://[^:]+:(\d+)", log.read_text(errors="replace"))
        if found:
            return Replica(proc, f"127.0.0.1:{found.group(1)}", log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        proc.kill()
    raise RuntimeError(f"cloud-service replica did not start: {log.read_text(errors='replace')[-1500:]}")


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
    """N cloud-service replicas over one model repository, behind HAProxy; a context manager."""

    def __init__(self, repository: Path, replicas: int = 2, port: int | None = None, pin: bool = False,
                 workdir: Path | None = None, start_timeout_s: float = 90.0):
        why = haproxy_missing()
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
                                                   start_timeout_s))
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
    args = parser.parse_args()
    try:
        cluster = CloudCluster(args.repository, args.replicas, args.port, args.pin)
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
