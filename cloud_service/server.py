"""Start and stop the gRPC server: OIP service, Fleet service, health, reflection, auth, TLS, metrics."""
import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloud_service import reflection
from cloud_service.auth import AuthInterceptor
from cloud_service.config import ConfigError
from cloud_service.credentials import Credentials
from cloud_service.fleet import FleetService
from cloud_service.metrics import Metrics
from cloud_service.repository import Repository
from cloud_service.service import InferenceService
from cloud_service.state import StateStore
from devices.address import is_loopback
from edgefold_proto import METHODS, SERVICE
from edgefold_proto.fleet import FLEET_METHODS, FLEET_SERVICE
from edgefold_proto.serving import rpc_handler

log = logging.getLogger(__name__)
SESSION_SWEEP_S = 1.0
CREDENTIAL_POLL_S = 0.25     # a revoked token stops working within this (plus one reload)


@dataclass
class ServerOptions:
    repository: Path
    host: str = "0.0.0.0"
    port: int = 8001                     # 0 picks a free port
    metrics_port: int | None = None
    token: str | None = None             # --token-file: one operator credential
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None   # mTLS: clients present a certificate from this CA (CN = device id)
    client_cert_port: int | None = None  # with tls_client_ca: certificates here, tokens on `port` (None: all on port)
    max_message_bytes: int = 64 << 20
    grace_s: float = 10.0                # in-flight requests get this long to finish on stop
    heartbeat_interval_s: float = 5.0    # what Heartbeat tells devices


class CloudServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.service = InferenceService(Repository(options.repository), self.metrics)
        self.state = StateStore(options.repository)     # credentials, fleet registry, rollout pins
        self.fleet = FleetService(options.repository, self.metrics, options.heartbeat_interval_s, self.state)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.client_cert_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> int:
        o = self.options
        limits = [("grpc.max_receive_message_length", o.max_message_bytes),
                  ("grpc.max_send_message_length", o.max_message_bytes),
                  ("grpc.so_reuseport", 0)]
        if o.tls_client_ca and not o.tls_cert:
            raise ConfigError("tls_client_ca: client certificates need TLS (tls_cert and tls_key)")
        self.credentials = Credentials(self.state, o.token, client_certificates=bool(o.tls_client_ca))
        if not self.credentials.enforced and not is_loopback(o.host):
            log.warning("no credentials: anyone who reaches %s may call every RPC, model loading included; "
                        "add one with `cloud-service token add` or give --token-file", o.host or "0.0.0.0")
        interceptors = [AuthInterceptor(self.credentials, self.metrics, client_certificates=bool(o.tls_client_ca))]
        self._server = grpc.aio.server(options=limits, interceptors=interceptors)
        self._server.add_generic_rpc_handlers((rpc_handler(METHODS, self.service, aio=True),
                                               rpc_handler(FLEET_METHODS, self.fleet, aio=True)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable(self._server)
        self.port = self._listen(o.port, o.tls_client_ca if o.client_cert_port is None else None)
        if o.client_cert_port is not None:
            self.client_cert_port = self._listen(o.client_cert_port, o.tls_client_ca)
        await self.service.load_all()
        await self._server.start()
        if o.metrics_port is not None:
            self._metrics_http = self.metrics.serve(o.metrics_port, "0.0.0.0" if o.host in ("0.0.0.0", "") else o.host)
        self._sweeper = asyncio.create_task(self._sweep_sessions())
        self.fleet.start()                                  # the registry's flusher
        self.service.ready = True
        self._credential_poller = asyncio.create_task(self._poll_credentials())
        for name in ("", SERVICE, FLEET_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def _listen(self, port: int, client_ca: bytes | None) -> int:
        """Listen on host:port: plaintext, TLS, or (client_ca) TLS that requires a client certificate
        signed by client_ca. gRPC Python cannot ask for a certificate without requiring one, hence
        --client-cert-port: one port for certificate holders, the main one for bearer tokens."""
        o, address = self.options, f"{self.options.host}:{port}"
        if o.tls_cert:
            creds = grpc.ssl_server_credentials([(o.tls_key, o.tls_cert)], root_certificates=client_ca,
                                                require_client_auth=client_ca is not None)
            bound = self._server.add_secure_port(address, creds)
        else:
            bound = self._server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen on {address}")
        return bound

    async def _sweep_sessions(self) -> None:
        while True:
            await asyncio.sleep(SESSION_SWEEP_S)
            self.service.sweep_sessions()

    async def _poll_credentials(self) -> None:
        """Reload the credentials when the database changed (`token add`/`revoke`), until stopped."""
        while self.service.ready:
            await asyncio.sleep(CREDENTIAL_POLL_S)
            try:
                await asyncio.to_thread(self.credentials.poll)
            except Exception:                 # keep polling: a missed revocation must not go unnoticed
                log.exception("reloading the credentials failed")
        self.credentials.close()

    async def stop(self) -> None:
        """Stop taking new calls, let in-flight ones finish (up to grace_s), release models."""
        self.service.ready = False
        await self.health.enter_graceful_shutdown()
        if self._sweeper:
            self._sweeper.cancel()
        await self._server.stop(self.options.grace_s)
        await self.fleet.close()                            # the registry's last flush
        for name in list(self.service.repository.models):
            for model in self.service.repository.remove(name):
                await model.close()
        if self._metrics_http:
            self._metrics_http.shutdown()

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve_until_signalled(options: ServerOptions) -> None:
    """Run until SIGTERM or Ctrl-C, then stop gracefully."""
    server = CloudServer(options)
    port = await server.start()
    scheme = "grpcs" if options.tls_cert else "grpc"
    print(f"cloud-service serving {scheme}://{options.host}:{port} "
          f"({len(server.service.repository.models)} models loaded)", flush=True)
    if server.client_cert_port is not None:
        print(f"cloud-service client certificates on {scheme}://{options.host}:{server.client_cert_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    await server.stop()
    print("cloud-service stopped", flush=True)
