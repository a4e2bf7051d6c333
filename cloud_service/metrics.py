"""Prometheus metrics for operators, served as text on --metrics-port."""
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        self.requests = Counter("edgefold_inference_requests", "Inference requests by outcome",
                                (*labels, "status"), registry=self.registry)
        self.queue_seconds = Histogram("edgefold_queue_duration_seconds", "Time a request waited for a batch",
                                       labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram("edgefold_compute_duration_seconds", "Backend execution time per run",
                                         labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("edgefold_batch_size", "Rows in the backend execution that served each request",
                                    labels, buckets=_BATCH_BUCKETS, registry=self.registry)
        self.sessions = Gauge("edgefold_sessions", "Sessions held by stateful models", labels, registry=self.registry)
        self.session_bytes = Gauge("edgefold_session_bytes", "Bytes of session state held", labels,
                                   registry=self.registry)
        self.bytes_in = Counter("edgefold_request_bytes", "Tensor bytes received", labels, registry=self.registry)
        self.bytes_out = Counter("edgefold_response_bytes", "Tensor bytes sent", labels, registry=self.registry)
        # the fleet (cloud_service/fleet.py); the devices gauge is computed when scraped
        self.fleet_devices = Gauge("edgefold_fleet_devices", "Devices that sent a heartbeat in the last 3 intervals",
                                   registry=self.registry)
        self.fleet_heartbeats = Counter("edgefold_fleet_heartbeats", "Heartbeats accepted", registry=self.registry)
        self.fleet_download_bytes = Counter("edgefold_fleet_download_bytes", "Model file bytes sent to devices",
                                            ("model",), registry=self.registry)
        self.device_last_seen = Gauge("edgefold_device_last_seen_timestamp_seconds",
                                      "Unix time of the device's last heartbeat", ("device",), registry=self.registry)
        # cloud_service/auth.py: calls refused for their credential (UNAUTHENTICATED, PERMISSION_DENIED)
        self.auth_denied = Counter("edgefold_auth_denied", "RPCs refused by authentication or role checks",
                                   ("code",), registry=self.registry)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics over HTTP; returns the server so it can be shut down."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def bound(self, model: str, version: str) -> "BoundMetrics":
        """The metric children of one model version, looked up once instead of per request."""
        return BoundMetrics(
            success=self.requests.labels(model, version, "success"),
            failure=self.requests.labels(model, version, "failure"),
            queue=self.queue_seconds.labels(model, version),
            compute=self.compute_seconds.labels(model, version),
            batch=self.batch_size.labels(model, version),
            sessions=self.sessions.labels(model, version),
            session_bytes=self.session_bytes.labels(model, version),
            bytes_in=self.bytes_in.labels(model, version),
            bytes_out=self.bytes_out.labels(model, version),
        )


@dataclass
class BoundMetrics:
    success: object
    failure: object
    queue: object
    compute: object
    batch: object
    sessions: object
    session_bytes: object
    bytes_in: object
    bytes_out: object
