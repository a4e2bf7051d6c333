"""The Fleet service: devices pull their models from the repository and report heartbeats.

Served at `/edgefold.fleet.Fleet/<Rpc>` beside the inference service (same port, token, TLS):

    ModelManifest(name="stages")                     -> version "2", digest, files:
        config.toml, 2/chain.json, 2/stages/stage1.onnx   (path, size, sha256 each)
    DownloadModelFile(name, version, path, offset)   -> FileChunk stream, 256 KiB each
    Heartbeat(device_id="pi-1", samples=[...])       -> interval_s, server_unix_time, accepted_samples
    ListDevices()                                    -> one DeviceStatus per device

The files of a model version are its config.toml plus every regular file under
`<repository>/<name>/<version>/`; a symlink counts only when it resolves inside the model
folder, and symlinked folders are not entered. File hashes are cached by (path, size,
mtime_ns), so a repeated manifest reads nothing. Device state lives in memory: the newest
256 samples of each device, a resent sample (same unix_time) counted once.
"""
import asyncio
import bisect
import hashlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cloud_service.caller import current as current_caller
from cloud_service.metrics import Metrics
from cloud_service.repository import MODEL_NAME, version_dirs
from edgefold_proto.fleet import fleet_pb, manifest_digest, path_problem
from edgefold_proto.serving import InvalidArgument, NotFound, ServiceError, Unavailable

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 << 10
KEEP_SAMPLES = 256           # per device
MAX_SAMPLES = 1024           # per heartbeat
MAX_ENTRIES = 64             # models, counters, values of one sample
MAX_TEXT = 128               # profile, agent_version, map keys, model fields
MAX_DEVICES = 1024           # devices held in memory (a new one past this is RESOURCE_EXHAUSTED)
RACY_NS = 2_000_000_000      # a file changed this recently is hashed again next time (coarse mtimes)
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION = re.compile(r"^[0-9]{1,18}$")


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class TooManyDevices(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# --- model files ---------------------------------------------------------------------------
def model_files(model_dir: Path, version: str) -> dict[str, Path]:
    """Manifest path -> file on disk: config.toml (if present) and every file under <version>/."""
    inside = model_dir.resolve()
    candidates = [model_dir / "config.toml"]
    for folder, subfolders, names in os.walk(model_dir / version):   # does not enter symlinked folders
        subfolders.sort()
        candidates += [Path(folder) / n for n in sorted(names)]
    files = {}
    for path in candidates:
        relative = path.relative_to(model_dir).as_posix()
        if not path.is_file() or path_problem(relative):
            continue
        if not path.resolve().is_relative_to(inside):
            log.warning("%s: skipped, it resolves outside the model folder", path)
            continue
        files[relative] = path
    return files


class FileHashes:
    """sha256 of files, cached by (path, size, mtime_ns)."""

    def __init__(self):
        self._cache: dict[str, tuple[int, int, str]] = {}
        self.files_read = 0     # files hashed for real (tests check the cache with it)

    def sha256(self, path: Path) -> tuple[int, str]:
        before = path.stat()
        key = (before.st_size, before.st_mtime_ns)
        hit = self._cache.get(str(path))
        if hit and hit[:2] == key:
            return hit[0], hit[2]
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                size += len(block)
        self.files_read += 1
        after = path.stat()
        unchanged = (after.st_size, after.st_mtime_ns) == key and size == key[0]
        if unchanged and time.time_ns() - key[1] > RACY_NS:
            self._cache[str(path)] = (*key, digest.hexdigest())
        return size, digest.hexdigest()


# --- devices -------------------------------------------------------------------------------
@dataclass
class Device:
    status: fleet_pb.DeviceStatus
    samples: list = field(default_factory=list)       # the newest KEEP_SAMPLES TelemetrySample, oldest first
    times: set = field(default_factory=set)           # unix_time of each kept sample

    def add(self, samples) -> int:
        """Keep new samples in time order; one already held (a resend) or older than a full
        window is not new. Returns how many were new."""
        new = 0
        for sample in samples:
            t = sample.unix_time
            if t in self.times or (len(self.samples) == KEEP_SAMPLES and t < self.samples[0].unix_time):
                continue
            kept = fleet_pb.TelemetrySample()
            kept.CopyFrom(sample)              # a copy: a kept sample must not pin the whole request
            bisect.insort(self.samples, kept, key=lambda s: s.unix_time)
            self.times.add(t)
            if len(self.samples) > KEEP_SAMPLES:
                self.times.discard(self.samples.pop(0).unix_time)
            new += 1
        if new:
            self.status.samples_received += new
            self.status.telemetry.clear()
            self.status.telemetry.update(self.samples[-1].values)
        return new


def check_heartbeat(r: fleet_pb.HeartbeatRequest) -> None:
    if not DEVICE_ID.match(r.device_id):
        raise InvalidArgument(f"device_id '{r.device_id[:80]}' must match {DEVICE_ID.pattern}")
    if len(r.samples) > MAX_SAMPLES:
        raise InvalidArgument(f"samples: {len(r.samples)} in one heartbeat, at most {MAX_SAMPLES}")
    for name, value in (("profile", r.profile), ("agent_version", r.agent_version)):
        if len(value) > MAX_TEXT:
            raise InvalidArgument(f"{name}: at most {MAX_TEXT} characters, got {len(value)}")
    if not math.isfinite(r.uptime_s) or r.uptime_s < 0:
        raise InvalidArgument(f"uptime_s must be a finite number >= 0, got {r.uptime_s}")
    tables = [("models", r.models, ()), ("counters", r.counters, r.counters)]
    tables += [(f"samples[{i}].values", s.values, s.values) for i, s in enumerate(r.samples)]
    for name, entries, keys in tables:
        if len(entries) > MAX_ENTRIES:
            raise InvalidArgument(f"{name}: at most {MAX_ENTRIES} entries, got {len(entries)}")
        if any(len(k) > MAX_TEXT for k in keys):
            raise InvalidArgument(f"{name}: keys have at most {MAX_TEXT} characters")
    for i, m in enumerate(r.models):
        if max(len(m.name), len(m.version), len(m.digest)) > MAX_TEXT:
            raise InvalidArgument(f"models[{i}]: name, version and digest have at most {MAX_TEXT} characters")
    for i, s in enumerate(r.samples):
        if not math.isfinite(s.unix_time):
            raise InvalidArgument(f"samples[{i}].unix_time must be finite, got {s.unix_time}")


# --- the service ---------------------------------------------------------------------------
class FleetService:
    """The servicer of edgefold_proto.fleet.FLEET_METHODS (served through edgefold_proto.serving.rpc_handler)."""

    def __init__(self, repository_root: Path, metrics: Metrics, heartbeat_interval_s: float = 5.0):
        self.root = Path(repository_root)
        self.metrics = metrics
        self.interval_s = heartbeat_interval_s
        self.hashes = FileHashes()
        self.devices: dict[str, Device] = {}
        metrics.fleet_devices.set_function(self.active_devices)

    def active_devices(self) -> int:
        """Devices that sent a heartbeat in the last 3 intervals."""
        since = time.time() - 3 * self.interval_s
        return sum(d.status.last_seen_unix_time >= since for d in list(self.devices.values()))

    def _resolve(self, name: str, version: str) -> tuple[Path, str]:
        """The model folder and the version ("" is the highest); errors name the field."""
        if not MODEL_NAME.match(name) or name in (".", ".."):
            raise InvalidArgument(f"name '{name[:80]}' must be letters, digits, '_', '.', '-' (a repository folder)")
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise NotFound(f"name: model '{name}' is not in the repository")
        if version and not VERSION.match(version):
            raise InvalidArgument(f"version '{version[:80]}' must be a number (a version folder), "
                                  "or empty for the highest")
        versions = [p.name for p in version_dirs(model_dir)]
        if not versions:
            raise NotFound(f"version: model '{name}' has no numeric version folder")
        if version and version not in versions:
            raise NotFound(f"version: model '{name}' has no version '{version}'; it has {', '.join(versions)}")
        return model_dir, version or versions[-1]

    def manifest(self, name: str, version: str = "") -> fleet_pb.ModelManifestResponse:
        """Reads and hashes files: call off the event loop."""
        model_dir, version = self._resolve(name, version)
        try:
            files = [fleet_pb.ModelFile(path=path, size=size, sha256=sha)
                     for path, local in sorted(model_files(model_dir, version).items())
                     for size, sha in [self.hashes.sha256(local)]]
        except OSError as err:
            raise Unavailable(f"model '{name}' version {version} changed while it was read ({err}); retry") from None
        return fleet_pb.ModelManifestResponse(name=name, version=version, files=files,
                                              digest=manifest_digest((f.path, f.sha256) for f in files))

    async def ModelManifest(self, request: fleet_pb.ModelManifestRequest):
        return await asyncio.to_thread(self.manifest, request.name, request.version)

    def _locate(self, request: fleet_pb.DownloadRequest) -> Path:
        """The file a download asks for: one of the manifest's paths, or an error naming the field."""
        model_dir, version = self._resolve(request.name, request.version)
        if problem := path_problem(request.path):
            raise InvalidArgument(f"path '{request.path[:200]}' {problem}")
        local = model_files(model_dir, version).get(request.path)
        if local is None:
            raise NotFound(f"path: '{request.path}' is not a file of model '{request.name}' version {version}")
        if request.offset < 0:
            raise InvalidArgument(f"offset must be >= 0, got {request.offset}")
        return local

    async def DownloadModelFile(self, request: fleet_pb.DownloadRequest):
        local = await asyncio.to_thread(self._locate, request)
        f = await asyncio.to_thread(open, local, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            if request.offset > size:
                raise OutOfRange(f"offset {request.offset} is past the end of '{request.path}' ({size} bytes)")
            await asyncio.to_thread(f.seek, request.offset)
            offset, sent = request.offset, self.metrics.fleet_download_bytes.labels(request.name)
            while data := await asyncio.to_thread(f.read, CHUNK_BYTES):
                yield fleet_pb.FileChunk(offset=offset, data=data)
                offset += len(data)
                sent.inc(len(data))
        finally:
            f.close()

    async def Heartbeat(self, request: fleet_pb.HeartbeatRequest):
        check_heartbeat(request)
        if (caller := current_caller()) is not None:
            caller.require_device(request.device_id)
        device = self.devices.get(request.device_id)
        if device is None:
            if len(self.devices) >= MAX_DEVICES:
                raise TooManyDevices(f"device_id: this server already tracks {MAX_DEVICES} devices")
            device = self.devices[request.device_id] = Device(fleet_pb.DeviceStatus(device_id=request.device_id))
        now = time.time()
        s = device.status
        s.profile, s.agent_version, s.uptime_s, s.last_seen_unix_time = \
            request.profile, request.agent_version, request.uptime_s, now
        del s.models[:]
        s.models.extend(request.models)
        s.counters.clear()
        s.counters.update(request.counters)
        accepted = device.add(request.samples)
        self.metrics.fleet_heartbeats.inc()
        self.metrics.device_last_seen.labels(request.device_id).set(now)
        return fleet_pb.HeartbeatResponse(interval_s=self.interval_s, server_unix_time=now, accepted_samples=accepted)

    async def ListDevices(self, request: fleet_pb.ListDevicesRequest):
        statuses = []
        wanted = [request.device_id] if request.device_id else sorted(self.devices)
        for device in [self.devices[d] for d in wanted if d in self.devices]:
            status = fleet_pb.DeviceStatus()
            status.CopyFrom(device.status)
            if request.include_samples:
                status.samples.extend(device.samples)
            statuses.append(status)
        return fleet_pb.ListDevicesResponse(devices=statuses)
