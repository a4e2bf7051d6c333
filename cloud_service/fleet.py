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
mtime_ns), so a repeated manifest reads nothing.

Devices live in the fleet registry (cloud_service/registry.py: the state database, so they survive
a restart). A device credential asking for version "" gets the version it is pinned to (its own
pin, else its group's: `cloud-service rollout pin`), else the highest; operators get the highest.
"""
import asyncio
import hashlib
import logging
import math
import os
import time
from pathlib import Path

import grpc

from cloud_service.caller import current as current_caller
from cloud_service.metrics import Metrics
from cloud_service.registry import DEVICE_ID, VERSION, Registry
from cloud_service.repository import MODEL_NAME, version_dirs
from cloud_service.signing import read_signature
from cloud_service.state import StateStore
from edgefold_proto.fleet import fleet_pb, manifest_digest, path_problem
from edgefold_proto.serving import InvalidArgument, NotFound, ServiceError, Unavailable

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 << 10
MAX_SAMPLES = 1024           # per heartbeat
MAX_ROLLBACKS = 64           # per heartbeat
MAX_ENTRIES = 64             # models, counters, values of one sample
MAX_TEXT = 128               # profile, agent_version, map keys, model and rollback fields
MAX_REASON = 512             # a rollback's reason
RACY_NS = 2_000_000_000      # a file changed this recently is hashed again next time (coarse mtimes)


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


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
    if len(r.rollbacks) > MAX_ROLLBACKS:
        raise InvalidArgument(f"rollbacks: {len(r.rollbacks)} in one heartbeat, at most {MAX_ROLLBACKS}")
    for i, b in enumerate(r.rollbacks):
        if len(b.reason) > MAX_REASON:
            raise InvalidArgument(f"rollbacks[{i}].reason: at most {MAX_REASON} characters, got {len(b.reason)}")
        if max(len(b.name), len(b.version), len(b.digest), len(b.restored_version)) > MAX_TEXT:
            raise InvalidArgument(f"rollbacks[{i}]: name, version, digest and restored_version have at most "
                                  f"{MAX_TEXT} characters")
        if not math.isfinite(b.unix_time):
            raise InvalidArgument(f"rollbacks[{i}].unix_time must be finite, got {b.unix_time}")


# --- the service ---------------------------------------------------------------------------
class FleetService:
    """The servicer of edgefold_proto.fleet.FLEET_METHODS (served through edgefold_proto.serving.rpc_handler)."""

    def __init__(self, repository_root: Path, metrics: Metrics, heartbeat_interval_s: float = 5.0,
                 state: StateStore | None = None):
        self.root = Path(repository_root)
        self.metrics = metrics
        self.interval_s = heartbeat_interval_s
        self.hashes = FileHashes()
        self.registry = Registry(state or StateStore(self.root))
        metrics.fleet_devices.set_function(self.active_devices)
        for device_id, seen in self.registry.last_seen().items():
            metrics.device_last_seen.labels(device_id).set(seen)

    def start(self) -> None:
        self.registry.start()

    async def close(self) -> None:
        await self.registry.close()

    def active_devices(self) -> int:
        """Devices that sent a heartbeat in the last 3 intervals."""
        return self.registry.active(time.time() - 3 * self.interval_s)

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
        if not version and (pin := self._pin(name)) is not None:
            if pin.version not in versions:
                raise NotFound(f"version: model '{name}' is pinned to version '{pin.version}' for {pin.source}, "
                               f"which the repository does not have; it has {', '.join(versions)}")
            return model_dir, pin.version
        return model_dir, version or versions[-1]

    def _pin(self, name: str):
        """The pin of the device credential calling (reads the database: call off the event loop)."""
        caller = current_caller()
        if caller is None or caller.role != "device" or not caller.device_id:
            return None
        return self.registry.pinned(name, caller.device_id)

    def manifest(self, name: str, version: str = "") -> fleet_pb.ModelManifestResponse:
        """Reads and hashes files: call off the event loop."""
        model_dir, version = self._resolve(name, version)
        try:
            files = [fleet_pb.ModelFile(path=path, size=size, sha256=sha)
                     for path, local in sorted(model_files(model_dir, version).items())
                     for size, sha in [self.hashes.sha256(local)]]
        except OSError as err:
            raise Unavailable(f"model '{name}' version {version} changed while it was read ({err}); retry") from None
        signature, key_id = read_signature(model_dir, version)      # (b"", "") when unsigned
        return fleet_pb.ModelManifestResponse(name=name, version=version, files=files,
                                              digest=manifest_digest((f.path, f.sha256) for f in files),
                                              signature=signature, key_id=key_id)

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
        now = time.time()
        accepted = self.registry.heartbeat(request, now)
        self.metrics.fleet_heartbeats.inc()
        self.metrics.device_last_seen.labels(request.device_id).set(now)
        return fleet_pb.HeartbeatResponse(interval_s=self.interval_s, server_unix_time=now, accepted_samples=accepted)

    async def ListDevices(self, request: fleet_pb.ListDevicesRequest):
        await self.registry.flush()
        devices = await asyncio.to_thread(self.registry.list_devices, request.device_id, request.include_samples)
        return fleet_pb.ListDevicesResponse(devices=[fleet_pb.DeviceStatus(**d) for d in devices])
