"""The device side of the fleet protocol (proto/fleet.proto): model manifests, resumable
file downloads, heartbeats. The deploy agent uses it through agent/model_store.py.

    with FleetClient("cloud:8001", token="s3cret") as fleet:
        m = fleet.manifest("stages")             # Manifest(name, version, digest, files, signature, key_id)
        f = m.files[0]
        fleet.download_file("stages", m.version, f.path, Path("/tmp/stages") / f.path, size=f.size)
        fleet.heartbeat("pi-1", profile="raspberry_pi_5", samples=[(time.time(), {"cpu_percent": 12.0})])

TLS: `root_certificates` (the cloud's CA, PEM) turns TLS on; with `certificate_chain` and
`private_key` (PEM, together) the device also presents a client certificate whose subject
common name is its device id, which a cloud started with --tls-client-ca accepts instead of a
token.

Deadlines: a unary call has `timeout_s`; a download has timeout_s + (size - offset) /
min_rate_bytes_s (default 128 KiB/s, about 1 Mbit/s), so a slow link still finishes a big
file and a stalled one is cut off. A cut-off download leaves the bytes it got in `dest`;
download again from dest's size to resume. grpc.RpcError propagates: check `.code()`.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from edge_runtime.client.oip_client import channel_credentials
from edgefold_proto.fleet import FLEET_METHODS, SERVER_STREAMING, fleet_pb

DEFAULT_TIMEOUT_S = 10.0
MIN_RATE_BYTES_S = 128 << 10


class FleetProtocolError(RuntimeError):
    """The cloud sent something the protocol does not allow (a gap in a stream, too many bytes)."""


@dataclass(frozen=True)
class ModelFile:
    path: str          # relative to the model folder: "config.toml", "3/model.onnx"
    size: int
    sha256: str        # hex


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    digest: str        # sha256 hex over the sorted "path\0sha256\n" lines
    files: list[ModelFile]
    signature: bytes = b""     # the publisher's Ed25519 signature (edgefold_proto.signing); b"": unsigned
    key_id: str = ""           # "ed25519:<base64>" of the key that signed it

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _sample(sample) -> fleet_pb.TelemetrySample:
    if isinstance(sample, fleet_pb.TelemetrySample):
        return sample
    unix_time, values = sample
    return fleet_pb.TelemetrySample(unix_time=unix_time, values=values)


def _rollback(r) -> fleet_pb.Rollback:
    if isinstance(r, fleet_pb.Rollback):
        return r
    return fleet_pb.Rollback(name=r.name, version=r.version, digest=r.digest, reason=r.reason,
                             unix_time=r.unix_time, restored_version=r.restored_version)


class FleetClient:
    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, min_rate_bytes_s: float = MIN_RATE_BYTES_S,
                 max_message_bytes: int = 64 << 20, certificate_chain: bytes | None = None,
                 private_key: bytes | None = None):
        options = [("grpc.max_receive_message_length", max_message_bytes)]   # ListDevices with samples
        credentials = channel_credentials(root_certificates, certificate_chain, private_key)
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s, self.min_rate_bytes_s = timeout_s, min_rate_bytes_s
        self._calls = {}
        for name, method in FLEET_METHODS.items():
            make = self.channel.unary_stream if method.kind == SERVER_STREAMING else self.channel.unary_unary
            self._calls[name] = make(method.path, request_serializer=method.request.SerializeToString,
                                     response_deserializer=method.response.FromString)

    def _call(self, rpc: str, request, timeout_s: float | None = None):
        return self._calls[rpc](request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def manifest(self, name: str, version: str = "", timeout_s: float | None = None) -> Manifest:
        """The files of `name` at `version` ("" = the highest)."""
        r = self._call("ModelManifest", fleet_pb.ModelManifestRequest(name=name, version=version), timeout_s)
        return Manifest(r.name, r.version, r.digest, [ModelFile(f.path, f.size, f.sha256) for f in r.files],
                        r.signature, r.key_id)

    def download_file(self, name: str, version: str, path: str, dest: Path, offset: int = 0,
                      on_bytes=None, size: int | None = None) -> int:
        """Write file `path` of the model into `dest` from byte `offset` on (dest is cut to
        `offset` first, so dest must hold at least that many bytes). `size`, the manifest's,
        sets the deadline and the most bytes accepted; without it the manifest is asked.
        on_bytes(n) is called after each chunk is written (an exception from it stops the
        download; the bytes so far stay in dest). Returns the bytes received."""
        dest = Path(dest)
        have = dest.stat().st_size if dest.exists() else 0
        if offset < 0 or offset > have:
            raise ValueError(f"offset {offset}: {dest} holds {have} bytes, so a download can start at 0..{have}")
        if size is None:
            size = next((f.size for f in self.manifest(name, version).files if f.path == path), offset)
        deadline_s = self.timeout_s + max(size - offset, 0) / self.min_rate_bytes_s
        dest.parent.mkdir(parents=True, exist_ok=True)
        request = fleet_pb.DownloadRequest(name=name, version=version, path=path, offset=offset)
        stream = self._call("DownloadModelFile", request, deadline_s)
        position = offset
        try:
            with open(dest, "r+b" if dest.exists() else "wb") as out:
                out.truncate(offset)
                out.seek(offset)
                try:
                    for chunk in stream:
                        if chunk.offset != position:
                            raise FleetProtocolError(f"{path}: a chunk at offset {chunk.offset}, expected {position}")
                        if position + len(chunk.data) > size:
                            raise FleetProtocolError(f"{path}: the cloud sent more than the manifest's {size} bytes")
                        out.write(chunk.data)
                        position += len(chunk.data)
                        if on_bytes is not None:
                            on_bytes(len(chunk.data))
                finally:
                    out.flush()
                    os.fsync(out.fileno())
        finally:
            stream.cancel()   # a no-op once the stream has ended
        return position - offset

    def heartbeat(self, device_id: str, profile: str = "", agent_version: str = "", uptime_s: float = 0.0,
                  models=(), counters: dict[str, int] | None = None, samples=(), rollbacks=(),
                  timeout_s: float | None = None) -> fleet_pb.HeartbeatResponse:
        """`models`: objects with .name .version .digest (model_store.InstalledModel works);
        `samples`: (unix_time, {name: value}) pairs or TelemetrySample messages, at most 1024;
        `rollbacks`: fleet_pb.Rollback messages or objects with its fields (name, version, digest,
        reason, unix_time, restored_version), at most 64."""
        request = fleet_pb.HeartbeatRequest(
            device_id=device_id, profile=profile, agent_version=agent_version, uptime_s=uptime_s,
            models=[fleet_pb.InstalledModel(name=m.name, version=m.version, digest=m.digest) for m in models],
            counters=counters or {}, samples=[_sample(s) for s in samples],
            rollbacks=[_rollback(r) for r in rollbacks])
        return self._call("Heartbeat", request, timeout_s)

    def list_devices(self, include_samples: bool = False, device_id: str = "",
                     timeout_s: float | None = None) -> list:
        """One fleet_pb.DeviceStatus per device (or only `device_id`), sorted by device_id."""
        request = fleet_pb.ListDevicesRequest(include_samples=include_samples, device_id=device_id)
        return list(self._call("ListDevices", request, timeout_s).devices)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
