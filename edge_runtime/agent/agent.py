"""The deploy agent: a long-running process on one device.

    edge-runtime agent --config agent.toml

It serves local apps through the Open Inference Protocol on [serve] port, and with [serve] http_port
its LLM pipelines through an OpenAI-compatible HTTP API (http_api.py), at once (before any model
is loaded; [serve] token_file then guards both), then, on one supervisor thread:
1. opens each pipeline from what is already on the device (a pulled model or a local path), so a
   device whose cloud is down still serves what it has;
2. every heartbeat_s: reads telemetry (devices.telemetry), sends a heartbeat with every sample the
   cloud has not acknowledged yet (buffered while it was down, up to 1024), and measures the RTT;
3. when the cloud answers and a model is missing or update_s has passed: pulls the assigned models
   (with [trust] keys: only versions signed by one of them; sha256-checked, resumable, swapped in
   atomically by ModelStore) and opens the new version beside the old one and runs a smoke
   inference on it (rollout.py), the old one serving until the swap; a corrupted or unsigned
   download leaves the old model serving, and a version that does not open or run is rolled back
   (the previous one stays, the rollback goes out with the heartbeats, the version is not pulled
   again until a newer one appears);
4. feeds battery, temperature and link quality to the offload policy and the pipelines.
While the cloud is down it retries with exponential backoff (1 s .. 30 s). SIGTERM or Ctrl-C:
no new calls, in-flight ones (HTTP streams included) finish (up to --grace-s), pipelines close,
exit status 0.
"""
import logging
import signal
import threading
import time
from collections import deque
from pathlib import Path

import grpc

from devices.profiles import Link, load_profile
from devices.telemetry import read_telemetry
from edge_runtime.agent.config import AgentConfig, AgentConfigError
from edge_runtime.agent.model_store import ModelIntegrityError, ModelStore, VersionRejected
from edge_runtime.agent.oip_server import LocalOipServer
from edge_runtime.agent.pipeline import Context
from edge_runtime.agent.policy import Decision, decide, device_state, link_quality
from edge_runtime.agent.rollout import PendingRollbacks, Rollback, SmokeError, open_checked, short
from edgefold_proto.auth import read_token
from edgefold_proto.version import __version__

log = logging.getLogger("edge_runtime.agent")
MAX_SAMPLES = 1024
MAX_BACKOFF_S = 30.0
RETIRE_AFTER_S = 30.0       # a replaced pipeline is closed this long after the swap (in-flight calls end)


def read_file(path: Path | None, field: str) -> bytes | None:
    """A file agent.toml names (a certificate, a key), or AgentConfigError naming the field."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise AgentConfigError(f"[cloud] {field} {path}: cannot read: {err}") from None


def read_serve_token(path: Path) -> str:
    """[serve] token_file's bearer token (surrounding whitespace stripped)."""
    try:
        return read_token(path, "[serve] token_file")
    except OSError as err:
        raise AgentConfigError(f"[serve] token_file {path}: cannot read: {err}") from None
    except ValueError as err:
        raise AgentConfigError(str(err)) from None


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.profile = load_profile(config.profile)
        self.base_link = self.profile.link(config.link)
        self.link = self.base_link
        cloud = config.cloud
        token = cloud.token_file.read_text().strip() if cloud.token_file else None
        roots = read_file(cloud.tls_ca, "tls_ca")
        cert, key = read_file(cloud.tls_cert, "tls_cert"), read_file(cloud.tls_key, "tls_key")
        self.ctx = Context(cloud.address, token, self.profile, self.link, roots, certificate_chain=cert, private_key=key)
        self.store = ModelStore(config.state_dir / "models", trusted_keys=config.trust_keys)
        self.fleet = None
        if cloud.address:
            from edge_runtime.client.fleet_client import FleetClient
            self.fleet = FleetClient(cloud.address, token=token, timeout_s=cloud.timeout_s, root_certificates=roots,
                                     certificate_chain=cert, private_key=key)
            if config.trust_keys:
                log.info("trust: installing only model versions signed by one of %d [trust] keys",
                         len(config.trust_keys))
            else:
                log.warning("trust: no [trust] keys, so this agent installs any version the cloud serves, unsigned "
                            "included; pin the publisher's key (`cloud-service keygen`) to refuse others")
        self.pipelines: dict = {}                  # name -> Pipeline, ready to serve
        self.installed: dict = {}                  # name -> InstalledModel it was opened from
        self.waiting = {s.name: "its model is not on the device yet" for s in config.pipelines}
        self.samples: deque = deque(maxlen=MAX_SAMPLES)
        self.rollbacks = PendingRollbacks()        # reported until a heartbeat is accepted
        self._refused: set = set()                 # rejected digests already logged
        self.latencies: deque = deque(maxlen=1000)
        self.reachable, self.rtt_ms = False, None
        self.decision = Decision(bool(cloud.address), "latency", "start" if cloud.address else "no cloud configured")
        self.started = time.monotonic()
        serve_token = read_serve_token(config.token_file) if config.token_file else None
        if serve_token is None and config.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("[serve] host %s reaches beyond this device and no token_file guards it: anyone who can "
                        "reach it may call the agent's models", config.host)
        self.server = LocalOipServer(self, config.host, config.port, token=serve_token)
        self.http = None
        if config.http_port is not None:
            from edge_runtime.agent.http_api import HttpApi
            self.http = HttpApi(self, config.host, config.http_port, serve_token, config.max_queue)
        self.http_port = None
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="agent-supervisor", daemon=True)
        self._retired: list = []

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> int:
        port = self.server.start()
        if self.http is not None:
            try:
                self.http_port = self.http.start()
            except BaseException:
                self.server.stop(0)
                raise
        self._supervisor.start()
        return port

    def stop(self, grace_s: float = 10.0) -> None:
        if self.http is not None:
            self.http.begin_stop(grace_s)        # both ports drain at once
        self.server.stop(grace_s)                # in-flight requests finish first
        if self.http is not None:
            self.http.wait_stopped(grace_s + 5.0)
        self._stop.set()
        self._supervisor.join(timeout=grace_s + self.config.cloud.timeout_s)
        for pipe in list(self.pipelines.values()) + [p for _, p in self._retired]:
            pipe.close()
        if self.fleet:
            self.fleet.close()

    def ready(self) -> bool:
        return not self.waiting

    def version_of(self, name: str) -> str:
        model = self.installed.get(name)
        return model.version if model is not None else "1"

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)

    # --- the supervisor thread -------------------------------------------------------------------
    def _supervise(self) -> None:
        self._open_local()
        backoff, next_update = 1.0, 0.0
        while not self._stop.is_set():
            telemetry = self._sample()
            ok = self._heartbeat()
            if ok and (self._missing() or time.monotonic() >= next_update):
                if self._pull_all():
                    next_update = time.monotonic() + self.config.cloud.update_s
            self._adapt(telemetry)
            if ok or self.fleet is None:
                backoff, wait = 1.0, self.config.cloud.heartbeat_s
            else:
                wait, backoff = backoff, min(2 * backoff, MAX_BACKOFF_S)
            self._close_retired()
            self._stop.wait(wait)

    def _missing(self) -> list:
        return [s for s in self.config.pipelines if s.name in self.waiting and s.model]

    def _open_local(self) -> None:
        """Open every pipeline from what is on the device already (no network)."""
        for spec in self.config.pipelines:
            if self._stop.is_set():
                return
            if spec.path is not None:
                self._open(spec, spec.path, None)
            else:
                current = self.store.current(spec.model)
                if current is not None:
                    self._open(spec, current.path / current.version, current)

    def _open(self, spec, folder: Path, installed) -> bool:
        """Open `folder` beside what serves `spec` now and swap it in. A pulled version (`installed`)
        must also pass a smoke inference, else it is rolled back (_roll_back)."""
        start = time.perf_counter()
        try:
            pipe = open_checked(spec, Path(folder), self.ctx, smoke=installed is not None)
        except Exception as err:
            if installed is not None:
                return self._roll_back(spec, installed, str(err) if isinstance(err, SmokeError) else
                                       f"cannot open: {type(err).__name__}: {err}")
            log.error("pipeline %s: cannot open %s: %s", spec.name, folder, err)
            self.waiting[spec.name] = f"cannot open {folder}: {err}"
            return False
        pipe.adapt(self.decision, self.link)
        old = self.pipelines.get(spec.name)
        self.pipelines[spec.name] = pipe
        self.installed[spec.name] = installed
        self.waiting.pop(spec.name, None)
        if old is not None:
            self._retired.append((time.monotonic(), old))
        where = f"{installed.name} v{installed.version} ({installed.digest[:12]})" if installed else str(folder)
        print(f"agent: pipeline {spec.name} ({spec.kind}) ready from {where} in "
              f"{time.perf_counter() - start:.2f} s: {pipe.describe()}", flush=True)
        return True

    def _roll_back(self, spec, bad, reason: str) -> bool:
        """`bad` (a pulled version) did not open or run: back to the version before it (which keeps
        serving if it is), the digest remembered, the rollback queued for the heartbeats."""
        reason = short(reason)
        restored = self.store.roll_back(bad.name, bad.digest, reason, bad.version)
        self.rollbacks.add(Rollback(bad.name, bad.version, bad.digest, reason, time.time(),
                                    restored.version if restored else ""))
        serving = self.installed.get(spec.name) if spec.name in self.pipelines else None
        after = (f"v{serving.version} keeps serving" if serving else f"back to v{restored.version}" if restored
                 else "no earlier version is on the device")
        log.error("pipeline %s: %s v%s (%s) rolled back: %s; %s", spec.name, bad.name, bad.version,
                  bad.digest[:12], reason, after)
        if spec.name in self.pipelines:
            return False
        if restored is not None:                 # at start: open the version before it instead
            return self._open(spec, restored.path / restored.version, restored)
        self.waiting[spec.name] = (f"{bad.name} v{bad.version} was rolled back and no earlier version is on the "
                                   f"device: {reason}")
        return False

    def _close_retired(self) -> None:
        now = time.monotonic()
        for item in [r for r in self._retired if now - r[0] >= RETIRE_AFTER_S]:
            self._retired.remove(item)
            item[1].close()

    def _pull_all(self) -> bool:
        """Pull every assigned model; open what changed. False when any pull failed."""
        ok = True
        for spec in self.config.pipelines:
            if spec.model is None or self._stop.is_set():
                continue
            try:
                installed, changed = self.store.pull(self.fleet, spec.model, spec.version)
            except VersionRejected as err:       # rolled back here: wait for another version
                if str(err) not in self._refused:
                    self._refused.add(str(err))
                    log.info("pull %s: %s", spec.model, err)
                continue
            except ModelIntegrityError as err:
                log.error("pull %s rejected, the current version keeps serving: %s", spec.model, err)
                ok = False
                continue
            except grpc.RpcError as err:
                log.warning("pull %s failed: %s: %s", spec.model, err.code().name, err.details())
                ok = False
                continue
            except OSError as err:
                log.error("pull %s failed: %s", spec.model, err)
                ok = False
                continue
            if changed or spec.name not in self.pipelines:
                self._open(spec, installed.path / installed.version, installed)
        return ok

    # --- telemetry, heartbeats, policy ---------------------------------------------------------
    def _sample(self) -> dict:
        values = read_telemetry().as_dict()
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        served = sum(p.counters["requests"] for p in self.pipelines.values())
        values["requests_total"] = float(served)
        if self.latencies:
            ordered = sorted(self.latencies)
            values["request_p50_ms"] = ordered[len(ordered) // 2] * 1e3
        self.samples.append((time.time(), values))
        return values

    def _counters(self) -> dict:
        counters = {}
        for name, pipe in self.pipelines.items():
            for key, value in pipe.counters.items():
                counters[f"{name}.{key}"] = int(value)
        return counters

    def _heartbeat(self) -> bool:
        if self.fleet is None:
            return False
        sending, rollbacks = list(self.samples), self.rollbacks.sending()
        models = [m for m in self.installed.values() if m is not None]
        start = time.perf_counter()
        try:
            reply = self.fleet.heartbeat(
                device_id=self.config.device_id, profile=self.profile.key, agent_version=__version__,
                uptime_s=time.monotonic() - self.started, models=models, counters=self._counters(),
                samples=sending, rollbacks=rollbacks)
        except grpc.RpcError as err:
            if self.reachable:
                log.warning("cloud unreachable (%s); serving locally, retrying with backoff", err.code().name)
            self.reachable = False
            return False
        self.rtt_ms = (time.perf_counter() - start) * 1e3
        if not self.reachable:
            log.info("cloud reachable (heartbeat RTT %.1f ms); %d buffered samples sent", self.rtt_ms, len(sending))
        self.reachable = True
        for _ in range(min(len(sending), len(self.samples))):   # acknowledged: drop what was sent
            self.samples.popleft()
        self.rollbacks.acknowledge(rollbacks)
        return reply is not None

    def _adapt(self, telemetry: dict) -> None:
        """Every tick: the policy's decision and the device state go to every pipeline (the split
        planner re-plans, the adaptive switch reads battery, heat and link quality)."""
        quality = link_quality(self.rtt_ms, self.reachable) if self.fleet else 0.0
        decision = decide(device_state(telemetry, quality), self.config.policy)
        rtt = self.rtt_ms if self.reachable and self.rtt_ms is not None else self.base_link.rtt_ms
        self.link = Link(self.base_link.name, self.base_link.rate_mbit, max(rtt, self.base_link.rtt_ms))
        if decision.reason != self.decision.reason:
            log.info("policy: %s (cloud %s, objective %s)", decision.reason,
                     "allowed" if decision.allow_cloud else "avoided", decision.objective)
        self.decision = decision
        for pipe in list(self.pipelines.values()):
            try:
                pipe.adapt(decision, self.link)
            except Exception:
                log.exception("pipeline %s could not adapt", pipe.name)


def serve_until_signalled(config: AgentConfig, grace_s: float = 10.0) -> int:
    agent = Agent(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = agent.start()
    if agent.http_port is not None:
        print(f"agent {config.device_id} serving http://{config.host}:{agent.http_port}/v1 (OpenAI-compatible)",
              flush=True)
    print(f"agent {config.device_id} serving grpc://{config.host}:{port} "
          f"({len(config.pipelines)} pipelines; cloud {config.cloud.address or 'none'})", flush=True)
    while not stop.wait(0.5):
        pass
    print("agent: stopping (finishing in-flight requests)", flush=True)
    agent.stop(grace_s)
    print("agent stopped", flush=True)
    return 0
