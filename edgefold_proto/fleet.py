"""The fleet protocol messages, generated from proto/fleet.proto, and the method paths
they are served under (`/edgefold.fleet.Fleet/<Rpc>`, our own service).

    from edgefold_proto.fleet import FLEET_METHODS, fleet_pb
    m = FLEET_METHODS["ModelManifest"]
    m.path                       # "/edgefold.fleet.Fleet/ModelManifest"
    m.request(name="mlp")        # fleet_pb.ModelManifestRequest
    manifest_digest([("config.toml", "ab12..."), ("1/model.onnx", "cd34...")])

The rules both sides apply live here too: what a device id, a version and a manifest path may
look like (and a model name), and how a manifest's digest is computed from its files.
"""
import hashlib
import re

from edgefold_proto import SERVER_STREAMING, Method
from edgefold_proto import fleet_pb2 as fleet_pb

FLEET_SERVICE = "edgefold.fleet.Fleet"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")   # device ids (and rollout group names)
VERSION = re.compile(r"^[0-9]{1,18}$")                          # a model version folder
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a model folder of the repository

FLEET_METHODS = {
    m.name: m
    for m in (
        Method("ModelManifest", fleet_pb.ModelManifestRequest, fleet_pb.ModelManifestResponse, service=FLEET_SERVICE),
        Method("DownloadModelFile", fleet_pb.DownloadRequest, fleet_pb.FileChunk, SERVER_STREAMING, FLEET_SERVICE),
        Method("Heartbeat", fleet_pb.HeartbeatRequest, fleet_pb.HeartbeatResponse, service=FLEET_SERVICE),
        Method("ListDevices", fleet_pb.ListDevicesRequest, fleet_pb.ListDevicesResponse, service=FLEET_SERVICE),
    )
}


def path_problem(path: str) -> str | None:
    """Why `path` is not a safe manifest path (relative, '/'-separated, no '..'), or None."""
    if not path:
        return "is empty"
    if path.startswith("/") or "\\" in path or ":" in path.split("/")[0]:
        return "must be relative, with '/' between folders"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "must not contain '..', '.' or empty parts"
    if any(ord(c) < 32 for c in path):
        return "must not contain control characters"
    return None


def manifest_digest(files) -> str:
    """sha256 hex over the sorted lines `path\\0sha256\\n` of (path, sha256) pairs."""
    lines = sorted(f"{path}\0{sha256}\n" for path, sha256 in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


__all__ = ["fleet_pb", "FLEET_SERVICE", "FLEET_METHODS", "SERVER_STREAMING", "DEVICE_ID", "VERSION", "MODEL_NAME",
           "path_problem", "manifest_digest"]
