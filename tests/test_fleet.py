"""The fleet protocol against a real `cloud-service serve`: manifests, resumable downloads,
the device's model store (pull, no-op, update, integrity, resume), heartbeats, the token,
and device-only packages.

    .venv/bin/python -m pytest -q tests/test_fleet.py
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest

from cloud_service.fleet import FleetService
from cloud_service.metrics import Metrics
from edge_runtime.agent.model_store import InstalledModel, ModelIntegrityError, ModelStore
from edge_runtime.client.fleet_client import FleetClient
from edge_runtime.client.oip_client import OipClient
from edgefold_proto import pb
from edgefold_proto.fleet import FLEET_METHODS, fleet_pb
from models import MLP_IN, mlp_onnx, write
from server_process import ServerProcess, free_port

KIB = 1 << 10
BIG = 600 * KIB          # three chunks: 256 + 256 + 88 KiB
TOKEN = "fleet-token-for-tests"
DEVICE_TOML = 'backend = "device"\n[parameters]\nstages = ["stage1"]\n'


def add_version(package, version: int, seed: int = 0, big: int = BIG):
    """A device package version: a config.toml, a big file, a small one, an ONNX file in a subfolder."""
    write(package / "config.toml", DEVICE_TOML)
    folder = package / str(version)
    (folder / "stages").mkdir(parents=True, exist_ok=True)
    (folder / "big.bin").write_bytes(np.random.default_rng(seed).bytes(big))
    write(folder / "chain.json", json.dumps({"stages": ["stages/stage1.onnx"], "seed": seed}))
    mlp_onnx(folder / "stages" / "stage1.onnx", seed=seed)
    return package


def repo_files(package, version: str) -> dict[str, bytes]:
    files = {"config.toml": (package / "config.toml").read_bytes()}
    for path in sorted((package / version).rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[path.relative_to(package).as_posix()] = path.read_bytes()
    return files


def store_files(model: InstalledModel) -> dict[str, bytes]:
    return {p.relative_to(model.path).as_posix(): p.read_bytes() for p in sorted(model.path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fleet_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet_repo")
    mlp_onnx(root / "mlp" / "1" / "model.onnx")
    write(root / "mlp" / "config.toml", "max_batch_size = 32\n[parameters]\nintra_op_thread_count = 1\n")
    add_version(root / "stages", 1, seed=1)
    add_version(root / "stages", 2, seed=2)
    (root / "secret.txt").write_text("not a model file")
    os.symlink(root / "secret.txt", root / "stages" / "2" / "escape.bin")   # resolves outside the model
    return root


@pytest.fixture(scope="module")
def cloud(fleet_repo):
    metrics_port = free_port()
    proc = ServerProcess(fleet_repo, "--metrics-port", str(metrics_port))
    proc.metrics_port = metrics_port
    yield proc
    proc.kill()


@pytest.fixture
def package(fleet_repo, request):
    """A fresh device package (version 1) of this test's own."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60]
    return add_version(fleet_repo / name, 1, seed=10)


def metric(port: int, line_prefix: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def raw_call(address: str, rpc: str, payload: bytes, timeout: float = 10.0):
    """Call a Fleet RPC with raw request bytes (no client-side checks); streams are drained."""
    method = FLEET_METHODS[rpc]
    with grpc.insecure_channel(address) as channel:
        if method.kind == "server-streaming":
            call = channel.unary_stream(method.path, response_deserializer=method.response.FromString)
            return list(call(payload, timeout=timeout))
        return channel.unary_unary(method.path, response_deserializer=method.response.FromString)(payload, timeout=timeout)


def expect_error(code, fragment, fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()


# --- manifest and download ----------------------------------------------------------------
def test_manifest_lists_files_hashes_and_digest(cloud, fleet_repo):
    with FleetClient(cloud.address) as fleet:
        m = fleet.manifest("stages")
        assert (m.name, m.version) == ("stages", "2")            # "" is the highest version
        files = repo_files(fleet_repo / "stages", "2")
        assert [f.path for f in m.files] == ["2/big.bin", "2/chain.json", "2/stages/stage1.onnx", "config.toml"]
        for f in m.files:                                          # escape.bin (a symlink out) is not listed
            assert (f.size, f.sha256) == (len(files[f.path]), hashlib.sha256(files[f.path]).hexdigest())
        lines = "".join(sorted(f"{f.path}\0{f.sha256}\n" for f in m.files))
        assert m.digest == hashlib.sha256(lines.encode()).hexdigest()
        old = fleet.manifest("stages", "1")
        assert old.version == "1" and old.digest != m.digest and old.files[0].path == "1/big.bin"
        expect_error(grpc.StatusCode.NOT_FOUND, "'nope'", fleet.manifest, "nope")
        expect_error(grpc.StatusCode.NOT_FOUND, "version: model 'stages' has no version '9'", fleet.manifest, "stages", "9")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "version 'x'", fleet.manifest, "stages", "x")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "name '../etc'", fleet.manifest, "../etc")


def test_manifest_hashes_are_cached(tmp_path):
    add_version(tmp_path / "pkg", 1)
    past = time.time() - 60
    for path in (tmp_path / "pkg").rglob("*"):
        os.utime(path, (past, past))
    fleet = FleetService(tmp_path, Metrics())
    first = fleet.manifest("pkg")
    assert fleet.hashes.files_read == 4
    assert fleet.manifest("pkg") == first and fleet.hashes.files_read == 4      # nothing read again
    (tmp_path / "pkg" / "1" / "chain.json").write_text('{"changed": true}')
    os.utime(tmp_path / "pkg" / "1" / "chain.json", (past + 1, past + 1))
    changed = fleet.manifest("pkg")
    assert fleet.hashes.files_read == 5 and changed.digest != first.digest


def test_download_in_chunks_and_resume(cloud, fleet_repo, tmp_path):
    data = (fleet_repo / "stages" / "2" / "big.bin").read_bytes()
    with FleetClient(cloud.address) as fleet:
        chunks = []
        got = fleet.download_file("stages", "2", "2/big.bin", tmp_path / "a" / "big.bin", on_bytes=chunks.append,
                                  size=len(data))
        assert got == len(data) and chunks == [256 * KIB, 256 * KIB, 88 * KIB]
        assert (tmp_path / "a" / "big.bin").read_bytes() == data
        resumed = tmp_path / "resumed.bin"
        resumed.write_bytes(data[:1000] + b"junk past the offset is cut")
        assert fleet.download_file("stages", "2", "2/big.bin", resumed, offset=1000) == len(data) - 1000
        assert resumed.read_bytes() == data
        past_end = tmp_path / "past_end.bin"
        past_end.write_bytes(data + b"12345")
        expect_error(grpc.StatusCode.OUT_OF_RANGE, "offset", fleet.download_file, "stages", "2", "2/big.bin",
                     past_end, offset=len(data) + 5)


@pytest.mark.parametrize("version,path,code", [
    ("2", "../x", grpc.StatusCode.INVALID_ARGUMENT),
    ("2", "/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
    ("2", "2/../../mlp/config.toml", grpc.StatusCode.INVALID_ARGUMENT),
    ("2", "", grpc.StatusCode.INVALID_ARGUMENT),
    ("2", "2/escape.bin", grpc.StatusCode.NOT_FOUND),      # a symlink that resolves outside the model
    ("2", "2/nothere.bin", grpc.StatusCode.NOT_FOUND),
    ("2", "1/big.bin", grpc.StatusCode.NOT_FOUND),         # a file of another version
    ("2", "2/stages", grpc.StatusCode.NOT_FOUND),          # a folder
    ("", "secret.txt", grpc.StatusCode.NOT_FOUND),
])
def test_download_only_manifest_paths(cloud, version, path, code):
    request = fleet_pb.DownloadRequest(name="stages", version=version, path=path)
    expect_error(code, "path", raw_call, cloud.address, "DownloadModelFile", request.SerializeToString())


def test_malformed_requests_are_invalid_argument(cloud):
    for rpc in FLEET_METHODS:
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "not a valid", raw_call, cloud.address, rpc, b"\xff\xff\xff")
    request = fleet_pb.DownloadRequest(name="stages", path="2/chain.json", offset=-1)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "offset", raw_call, cloud.address, "DownloadModelFile",
                 request.SerializeToString())


# --- the model store ----------------------------------------------------------------------
def test_pull_installs_then_noop_then_updates(cloud, fleet_repo, package, tmp_path):
    name, store = package.name, ModelStore(tmp_path / "store")
    with FleetClient(cloud.address) as fleet:
        fetched = []
        v1, changed = store.pull(fleet, name, on_bytes=fetched.append)
        assert changed and v1.version == "1" and sum(fetched) == fleet.manifest(name).total_bytes
        assert store_files(v1) == repo_files(package, "1")
        assert (v1.path / v1.version / "stages" / "stage1.onnx").is_file()
        pointer = json.loads((tmp_path / "store" / name / "CURRENT").read_text())
        assert (pointer["version"], pointer["digest"]) == ("1", v1.digest) and store.current(name) == v1

        fetched.clear()
        assert store.pull(fleet, name, on_bytes=fetched.append) == (v1, False) and fetched == []

        add_version(package, 2, seed=20)
        v2, changed = store.pull(fleet, name)
        assert changed and v2.version == "2" and v2.digest != v1.digest and store.current(name) == v2
        assert json.loads((tmp_path / "store" / name / "CURRENT").read_text())["digest"] == v2.digest
        assert store_files(v2) == repo_files(package, "2")
        assert v1.path.is_dir()                                   # the previous one stays for the swap

        add_version(package, 3, seed=30)
        v3, _ = store.pull(fleet, name)
        assert not v1.path.exists() and v2.path.is_dir() and store.installed() == [v3]
        assert not any((tmp_path / "store" / ".partial").iterdir())


class TamperingClient(FleetClient):
    """Changes a repository file right after the manifest is taken: the download no longer matches."""

    def __init__(self, target, victim, content):
        super().__init__(target)
        self.victim, self.content = victim, content

    def manifest(self, name, version="", timeout_s=None):
        m = super().manifest(name, version, timeout_s)
        self.victim.write_bytes(self.content)
        return m


@pytest.mark.parametrize("grow", [0, 64])     # same size: sha256 differs; larger: more bytes than the manifest
def test_corrupted_download_keeps_the_current_model(cloud, package, tmp_path, grow):
    name, store = package.name, ModelStore(tmp_path / "store")
    with FleetClient(cloud.address) as fleet:
        v1, _ = store.pull(fleet, name)
    installed = store_files(v1)
    add_version(package, 2, seed=21)
    victim = package / "2" / "chain.json"
    content = bytes(len(victim.read_bytes()) + grow)
    with TamperingClient(cloud.address, victim, content) as tampering:
        with pytest.raises(ModelIntegrityError) as err:
            store.pull(tampering, name)
    assert f"model '{name}'" in str(err.value) and "'2/chain.json'" in str(err.value)
    assert store.current(name) == v1 and store_files(v1) == installed
    assert not list((tmp_path / "store" / ".partial").rglob("chain.json"))     # the bad partial file is gone
    with FleetClient(cloud.address) as fleet:                                    # the next manifest is right
        v2, changed = store.pull(fleet, name)
    assert changed and (v2.path / "2" / "chain.json").read_bytes() == content


class Interrupted(Exception):
    pass


def test_interrupted_pull_resumes(cloud, package, tmp_path):
    name, store = package.name, ModelStore(tmp_path / "store")

    def stop_after_first_chunk(n):
        raise Interrupted

    with FleetClient(cloud.address) as fleet:
        total = fleet.manifest(name).total_bytes
        with pytest.raises(Interrupted):
            store.pull(fleet, name, on_bytes=stop_after_first_chunk)
        assert store.current(name) is None
        partial = next((tmp_path / "store" / ".partial").iterdir())
        assert (partial / "1" / "big.bin").stat().st_size == 256 * KIB
        write(partial / "1" / "chain.json", "x" * 10_000)                     # longer than the file: discarded

        fetched = []
        model, changed = store.pull(fleet, name, on_bytes=fetched.append)
        assert changed and sum(fetched) == total - 256 * KIB
        assert store_files(model) == repo_files(package, "1") and not partial.exists()

        shutil.rmtree(model.path)                                             # CURRENT points at nothing
        assert store.current(name) is None
        fetched.clear()
        again, changed = store.pull(fleet, name, on_bytes=fetched.append)
        assert changed and again == model and sum(fetched) == total


def test_store_recovers_from_leftovers(cloud, package, tmp_path):
    name, store = package.name, ModelStore(tmp_path / "store")
    pointer = tmp_path / "store" / name / "CURRENT"
    with FleetClient(cloud.address) as fleet:
        v1, _ = store.pull(fleet, name)
        add_version(package, 2, seed=22)
        v2, _ = store.pull(fleet, name)
        pointer.write_text(json.dumps({"version": "1", "digest": v1.digest}))  # a crash before CURRENT moved on
        assert store.current(name) == v1
        fetched = []
        assert store.pull(fleet, name, on_bytes=fetched.append) == (v2, True) and fetched == []

        (v2.path / "2" / "chain.json").unlink()                              # a file of the current model lost
        repaired, changed = store.pull(fleet, name, on_bytes=fetched.append)
        assert changed and repaired == v2 and sum(fetched) == fleet.manifest(name).total_bytes
        assert store_files(v2) == repo_files(package, "2") and v1.path.is_dir()   # the previous one is kept
    pointer.write_text("{not json")
    assert store.current(name) is None and store.installed() == []


# --- heartbeats ---------------------------------------------------------------------------
def test_heartbeats_and_list_devices(cloud):
    t0 = time.time() - 100
    model = InstalledModel("stages", "2", "ab" * 32, None)
    beats_before = metric(cloud.metrics_port, "edgefold_fleet_heartbeats_total")
    with FleetClient(cloud.address) as fleet:
        first = [(t0, {"cpu_percent": 10.0}), (t0 + 1, {"cpu_percent": 20.0, "temperature_c": 50.5})]
        reply = fleet.heartbeat("pi-1", profile="raspberry_pi_5", agent_version="0.1.0", uptime_s=12.5,
                                models=[model], counters={"requests_local": 7}, samples=first)
        assert reply.accepted_samples == 2 and reply.interval_s == 5.0 and abs(reply.server_unix_time - time.time()) < 5
        resent = first + [(t0 + 2, {"cpu_percent": 30.0})]                    # the cloud missed the reply
        assert fleet.heartbeat("pi-1", profile="raspberry_pi_5", samples=resent, counters={"requests_local": 9},
                               models=[model]).accepted_samples == 1
        late = [(t0 + 0.5, {"cpu_percent": 15.0})]                               # out of order: kept in time order
        assert fleet.heartbeat("pi-1", profile="raspberry_pi_5", samples=late, counters={"requests_local": 9},
                               models=[model]).accepted_samples == 1
        buffered = [(t0 + i, {"cpu_percent": float(i)}) for i in range(300)]   # sent after an outage
        assert fleet.heartbeat("pi-2", samples=buffered).accepted_samples == 300
        assert fleet.heartbeat("pi-2", samples=buffered).accepted_samples == 0   # all held or older than the window

        devices = {d.device_id: d for d in fleet.list_devices()}
        pi1 = devices["pi-1"]
        assert (pi1.profile, pi1.samples_received, pi1.counters["requests_local"]) == ("raspberry_pi_5", 4, 9)
        assert dict(pi1.telemetry) == {"cpu_percent": 30.0} and not pi1.samples
        assert [(m.name, m.version, m.digest) for m in pi1.models] == [("stages", "2", "ab" * 32)]
        assert abs(pi1.last_seen_unix_time - time.time()) < 5
        assert [d.device_id for d in fleet.list_devices(device_id="pi-2")] == ["pi-2"]
        assert fleet.list_devices(device_id="unknown") == []
        detailed = {d.device_id: d for d in fleet.list_devices(include_samples=True)}
        assert [s.unix_time for s in detailed["pi-1"].samples] == [t0, t0 + 0.5, t0 + 1, t0 + 2]
        kept = detailed["pi-2"].samples
        assert len(kept) == 256 and kept[0].values["cpu_percent"] == 44.0 and detailed["pi-2"].samples_received == 300

    port = cloud.metrics_port
    assert metric(port, "edgefold_fleet_heartbeats_total") - beats_before == 5
    assert metric(port, "edgefold_fleet_devices") >= 2
    assert abs(metric(port, 'edgefold_device_last_seen_timestamp_seconds{device="pi-1"}') - time.time()) < 10


def test_download_bytes_metric(cloud, fleet_repo, tmp_path):
    key = 'edgefold_fleet_download_bytes_total{model="stages"}'
    before = metric(cloud.metrics_port, key)
    with FleetClient(cloud.address) as fleet:
        fleet.download_file("stages", "2", "2/chain.json", tmp_path / "chain.json")
    assert metric(cloud.metrics_port, key) - before == (fleet_repo / "stages" / "2" / "chain.json").stat().st_size


@pytest.mark.parametrize("device_id", ["", "-pi", "pi/1", "pi 1", "x" * 65, "pï"])
def test_bad_device_id(cloud, device_id):
    with FleetClient(cloud.address) as fleet:
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "device_id", fleet.heartbeat, device_id)


def test_heartbeat_limits(cloud):
    with FleetClient(cloud.address) as fleet:
        too_many = [(float(i), {"x": 1.0}) for i in range(1025)]
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "samples: 1025", fleet.heartbeat, "pi-9", samples=too_many)
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "uptime_s", fleet.heartbeat, "pi-9", uptime_s=float("nan"))
        assert "pi-9" not in {d.device_id for d in fleet.list_devices()}


# --- the token, device packages, the edge's imports -----------------------------------------
def test_fleet_needs_the_token(fleet_repo, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = ServerProcess(fleet_repo, "--token-file", str(token_file))
    try:
        for token in (None, "wrong"):
            with FleetClient(proc.address, token=token) as fleet:
                denied = grpc.StatusCode.UNAUTHENTICATED
                expect_error(denied, "Bearer", fleet.manifest, "stages")
                expect_error(denied, "Bearer", fleet.download_file, "stages", "2", "config.toml",
                             tmp_path / "c.toml", size=10)
                expect_error(denied, "Bearer", fleet.heartbeat, "pi-1")
                expect_error(denied, "Bearer", fleet.list_devices)
        with FleetClient(proc.address, token=TOKEN) as fleet:
            model, changed = ModelStore(tmp_path / "store").pull(fleet, "stages", version="1")
            assert changed and model.version == "1"
            assert fleet.heartbeat("pi-1", models=[model]).accepted_samples == 0
    finally:
        proc.kill()


def test_device_package_is_download_only(cloud):
    with OipClient(cloud.address) as client:
        expect_error(grpc.StatusCode.NOT_FOUND, "device package: download only",
                     client.infer, "stages", {"x": np.ones((1, MLP_IN), np.float32)})
        client.call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="stages"))   # skipped, no error
        index = {m.name: m for m in client.call("RepositoryIndex", pb.RepositoryIndexRequest()).models}
        assert (index["stages"].state, index["stages"].reason) == ("UNAVAILABLE", "device package: download only")
        assert index["mlp"].state == "READY"
        assert client.infer("mlp", {"x": np.ones((1, MLP_IN), np.float32)})["y"].shape == (1, 4)


def test_edge_side_imports_without_cloud_service():
    code = ("import sys, edge_runtime.client.fleet_client, edge_runtime.agent.model_store; "
            "bad = [m for m in sys.modules if m.startswith(('cloud_service', 'torch'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
