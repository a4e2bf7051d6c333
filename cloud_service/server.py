"""Start and stop the gRPC server: OIP service, Fleet service, health, reflection, auth, TLS, metrics."""
import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloud_service import reflection
from cloud_service.auth import BearerTokenInterceptor
from cloud_service.fleet import FleetService
from cloud_service.metrics import Metrics
from cloud_service.repository import Repository
from cloud_service.service import InferenceService
from cloud_service.state import StateStore
from edgefold_proto import METHODS, SERVICE
from edgefold_proto.fleet import FLEET_METHODS, FLEET_SERVICE
from edgefold_proto.serving import rpc_handler

log = logging.getLogger(__name__)
SESSION_SWEEP_S = 1.0


@dataclass
class ServerOptions:
    repository: Path
    host: str = "0.0.0.0"
    port: int = 8001                     # 0 picks a free port
    metrics_port: int | None = None
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    max_message_bytes: int = 64 << 20
    grace_s: float = 10.0                # in-flight requests get this long to finish on stop
    heartbeat_interval_s: float = 5.0    # what Heartbeat tells devices


class CloudServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.service = InferenceService(Repository(options.repository), self.metrics)
        self.state = StateStore(options.repository)     # credentials, fleet registry, rollout pins
        self.fleet = FleetService(options.repository, self.metrics, options.heartbeat_interval_s)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> int:
        o = self.options
        limits = [("grpc.max_receive_message_length", o.max_message_bytes),
                  ("grpc.max_send_message_length", o.max_message_bytes),
                  ("grpc.so_reuseport", 0)]
        interceptors = [BearerTokenInterceptor(o.token)] if o.token else []
        self._server = grpc.aio.server(options=limits, interceptors=interceptors)
        self._server.add_generic_rpc_handlers((rpc_handler(METHODS, self.service, aio=True),
                                               rpc_handler(FLEET_METHODS, self.fleet, aio=True)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable(self._server)
        address = f"{o.host}:{o.port}"
        if o.tls_cert:
            creds = grpc.ssl_server_credentials([(o.tls_key, o.tls_cert)])
            self.port = self._server.add_secure_port(address, creds)
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self.service.load_all()
        await self._server.start()
        if o.metrics_port is not None:
            self._metrics_http = self.metrics.serve(o.metrics_port, "0.0.0.0" if o.host in ("0.0.0.0", "") else o.host)
        self._sweeper = asyncio.create_task(self._sweep_sessions())
        self.service.ready = True
        for name in ("", SERVICE, FLEET_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _sweep_sessions(self) -> None:
        while True:
            await asyncio.sleep(SESSION_SWEEP_S)
            self.service.sweep_sessions()

    async def stop(self) -> None:
        """Stop taking new calls, let in-flight ones finish (up to grace_s), release models."""
        self.service.ready = False
        await self.health.enter_graceful_shutdown()
        if self._sweeper:
            self._sweeper.cancel()
        await self._server.stop(self.options.grace_s)
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    await server.stop()
    print("cloud-service stopped", flush=True)
