"""Automatic rollback on the device, for real: `edge-runtime agent` subprocesses pulling from a real
`cloud-service`. A new version that does not open, or opens and fails its smoke inference, is
rolled back: the old version keeps serving, CURRENT points at it, the heartbeat carries the
rollback, the bad digest is not downloaded again, and the next good version installs.

    .venv/bin/python -m pytest -q tests/test_rollback.py

The agent talks to the cloud through RecordingProxy (in this process: it forwards every Fleet
call to the real cloud byte for byte and keeps a copy), so a test reads exactly what the agent
sent in its heartbeats and which files it downloaded.
"""
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from edge_runtime.agent.model_store import ModelStore
from edge_runtime.agent.pipeline import Pipeline, TensorInfo
from edge_runtime.agent.rollout import PendingRollbacks, Rollback, smoke_request
from edge_runtime.client.fleet_client import FleetClient
from edge_runtime.client.oip_client import OipClient
from edgefold_proto import pb
from edgefold_proto.fleet import FLEET_METHODS, FLEET_SERVICE, SERVER_STREAMING, fleet_pb
from models import OPSET, _save, mlp_device_package, mlp_onnx, write
from server_process import AgentProcess, ServerProcess
from test_agent import X, agent_toml, reference_mlp, wait_ready

MLP = '[[pipeline]]\nname = "mlp"\nkind = "local"\nmodel = "mlp"\n'


class RecordingProxy:
    """A Fleet proxy: every call forwarded to `target` as raw bytes, (rpc, request bytes) recorded."""

    def __init__(self, target: str):
        self.upstream = grpc.insecure_channel(target)
        self.calls: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        handlers = {}
        for name, method in FLEET_METHODS.items():
            if method.kind == SERVER_STREAMING:
                handlers[name] = grpc.unary_stream_rpc_method_handler(
                    self._stream(name, self.upstream.unary_stream(method.path)))
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(name, self.upstream.unary_unary(method.path)))
        self.server = grpc.server(ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(FLEET_SERVICE, handlers)])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _record(self, name: str, request: bytes) -> None:
        with self._lock:
            self.calls.append((name, request))

    def _unary(self, name, upstream):
        def handle(request, context):
            self._record(name, request)
            try:
                return upstream(request, timeout=30)
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())
        return handle

    def _stream(self, name, upstream):
        def handle(request, context):
            self._record(name, request)
            try:
                yield from upstream(request, timeout=60)
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())
        return handle

    def requests(self, rpc: str, since: int = 0) -> list:
        with self._lock:
            calls = self.calls[since:]
        method = FLEET_METHODS[rpc]
        return [method.request.FromString(data) for name, data in calls if name == rpc]

    def close(self) -> None:
        self.server.stop(0)
        self.upstream.close()


def wait_until(condition, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


# --- broken packages ----------------------------------------------------------------------------
def unloadable(folder: Path) -> str:
    write(folder / "model.onnx", "this is not an ONNX model")
    return "model.onnx"


def fails_at_run(folder: Path) -> str:
    """Loads (x: (batch, 16) like the good versions), but every run fails: Reshape to (5, -1)."""
    shape = numpy_helper.from_array(np.array([5, -1], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape_fails",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
                              initializer=[shape])
    _save(helper.make_model(graph, opset_imports=OPSET), folder / "model.onnx")
    return "Reshape"


def wrong_smoke_input(folder: Path) -> str:
    """A working model whose package declares a smoke input of the wrong shape."""
    mlp_onnx(folder / "model.onnx", seed=2)
    save_file({"x": np.zeros((1, 3), np.float32)}, str(folder / "smoke.safetensors"))
    return "shape [1, 3]"


@pytest.fixture
def repo(tmp_path):
    return mlp_device_package(tmp_path / "repo")


@pytest.fixture
def cloud(repo):
    proc = ServerProcess(repo)
    proxy = RecordingProxy(proc.address)
    yield proxy
    proxy.close()
    proc.kill()


def cloud_rollbacks(cloud) -> list:
    """The device's rollbacks as the cloud's ListDevices shows them (its registry writes them to its
    database within about a second)."""
    with FleetClient(cloud.address) as fleet:
        return wait_until(lambda: [r for d in fleet.list_devices(device_id="test-pi") for r in d.rollbacks],
                          "the rollback in ListDevices")


def publish(repo: Path, version: int, build) -> str:
    """Build a version folder beside the repository, then rename it in: the cloud, polled by the
    agent all along, never serves a half-written file. Returns what `build` returns."""
    staging = repo.parent / "staging" / str(version)
    result = build(staging)
    os.rename(staging, repo / "mlp" / str(version))
    return result


def good(seed: int):
    return lambda folder: mlp_onnx(folder / "model.onnx", seed=seed)


def current_version(state: Path) -> str:
    return json.loads((state / "models" / "mlp" / "CURRENT").read_text())["version"]


def served_version(client: OipClient) -> list:
    return list(client.call("ModelMetadata", pb.ModelMetadataRequest(name="mlp")).versions)


@pytest.mark.parametrize("breakage", [unloadable, fails_at_run, wrong_smoke_input])
def test_a_broken_version_is_rolled_back_reported_and_not_retried(repo, cloud, tmp_path, breakage):
    config = agent_toml(tmp_path / "agent.toml", cloud.address, MLP, heartbeat_s=0.2, update_s=0.5)
    state = tmp_path / "state"
    v1, v3 = repo / "mlp" / "1" / "model.onnx", repo / "mlp" / "3" / "model.onnx"
    agent = AgentProcess(config)
    try:
        with OipClient(agent.address) as client:
            wait_ready(client)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v1, X))
            what = publish(repo, 2, breakage)                         # version 2 appears, broken
            with FleetClient(cloud.address) as fleet:
                bad_digest = fleet.manifest("mlp").digest
            agent.wait_for("rolled back", timeout_s=60)
            # version 1 keeps serving, and is what the device has installed
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v1, X))
            assert served_version(client) == ["1"] and client.ready()
            assert current_version(state) == "1"
            rejected = json.loads((state / "models" / "mlp" / "REJECTED").read_text())
            assert list(rejected) == [bad_digest] and rejected[bad_digest]["version"] == "2"
            assert not (state / "models" / "mlp" / bad_digest).exists()
            # the heartbeat carried the rollback, with its reason and the version restored
            beats = wait_until(lambda: [r for h in cloud.requests("Heartbeat") for r in h.rollbacks],
                               "a heartbeat with the rollback")
            assert {(r.name, r.version, r.digest, r.restored_version) for r in beats} == {("mlp", "2", bad_digest, "1")}
            assert what in beats[0].reason and len(beats[0].reason) <= 512 and beats[0].unix_time > 0
            assert [(r.version, r.digest, r.reason) for r in cloud_rollbacks(cloud)] == \
                [("2", bad_digest, beats[0].reason)]                   # and operators see it
            # the rejected digest is not downloaded again: two more update rounds, no download
            after = len(cloud.calls)
            wait_until(lambda: len(cloud.requests("ModelManifest", since=after)) >= 2, "two more update rounds")
            assert cloud.requests("DownloadModelFile", since=after) == []
            assert all(not h.rollbacks for h in cloud.requests("Heartbeat", since=after))   # acknowledged once
            # a newer version that works is installed
            publish(repo, 3, good(3))
            agent.wait_for("ready from mlp v3", timeout_s=60)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v3, X))
            assert served_version(client) == ["3"] and current_version(state) == "3"
    finally:
        assert agent.terminate() == 0, agent.output()


def test_a_broken_current_version_at_start_falls_back_to_the_one_before(repo, cloud, tmp_path):
    """Installed and then found broken on the next start (the device was updated offline, say): the
    agent opens the version before it, reports the rollback, and does not pull the bad one again."""
    state = tmp_path / "state"
    store = ModelStore(state / "models")
    with FleetClient(cloud.address) as fleet:
        store.pull(fleet, "mlp")
        fails_at_run(repo / "mlp" / "2")
        bad, _ = store.pull(fleet, "mlp")
    assert current_version(state) == "2"
    start = len(cloud.calls)                  # what the agent does from here on
    config = agent_toml(tmp_path / "agent.toml", cloud.address, MLP, heartbeat_s=0.2, update_s=0.5)
    agent = AgentProcess(config)
    try:
        with OipClient(agent.address) as client:
            wait_ready(client)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"],
                                          reference_mlp(repo / "mlp" / "1" / "model.onnx", X))
            assert served_version(client) == ["1"] and current_version(state) == "1"
            beats = wait_until(lambda: [r for h in cloud.requests("Heartbeat") for r in h.rollbacks],
                               "a heartbeat with the rollback")
            assert [(r.version, r.digest, r.restored_version) for r in beats] == [("2", bad.digest, "1")]
            after = len(cloud.calls)
            wait_until(lambda: len(cloud.requests("ModelManifest", since=after)) >= 2, "two more update rounds")
            assert cloud.requests("DownloadModelFile", since=start) == []   # v1 and v2 were on the device
    finally:
        assert agent.terminate() == 0, agent.output()


def test_a_first_install_that_fails_leaves_the_pipeline_waiting_with_the_reason(repo, cloud, tmp_path):
    unloadable(repo / "mlp" / "1")
    config = agent_toml(tmp_path / "agent.toml", cloud.address, MLP, heartbeat_s=0.2, update_s=0.5)
    agent = AgentProcess(config)
    try:
        with OipClient(agent.address) as client:
            agent.wait_for("rolled back", timeout_s=60)
            assert not client.ready()
            with pytest.raises(grpc.RpcError) as err:
                client.infer("mlp", {"x": X})
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "rolled back" in err.value.details()
            index = client.call("RepositoryIndex", pb.RepositoryIndexRequest())
            assert [(m.name, m.state) for m in index.models] == [("mlp", "UNAVAILABLE")]
            assert "no earlier version" in index.models[0].reason
            beats = wait_until(lambda: [r for h in cloud.requests("Heartbeat") for r in h.rollbacks],
                               "a heartbeat with the rollback")
            assert [(r.version, r.restored_version) for r in beats] == [("1", "")]
            assert [(r.version, r.restored_version) for r in cloud_rollbacks(cloud)] == [("1", "")]
            assert not (tmp_path / "state" / "models" / "mlp" / "CURRENT").exists()
            publish(repo, 2, good(2))                                  # a fixed version appears
            wait_ready(client)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"],
                                          reference_mlp(repo / "mlp" / "2" / "model.onnx", X))
    finally:
        assert agent.terminate() == 0, agent.output()


# --- units ----------------------------------------------------------------------------------------
def test_smoke_inputs_follow_the_declared_inputs(tmp_path):
    pipe = Pipeline("p", "local", inputs=(TensorInfo("x", "FP32", (-1, 3, -1)), TensorInfo("ids", "INT64", (2,)),
                                          TensorInfo("text", "BYTES", (-1,))))
    inputs, params = smoke_request(pipe, tmp_path)
    assert params == {}
    assert inputs["x"].shape == (1, 3, 1) and inputs["x"].dtype == np.float32 and not inputs["x"].any()
    assert inputs["ids"].dtype == np.int64 and inputs["ids"].shape == (2,)
    assert inputs["text"].dtype == object and isinstance(inputs["text"][0], bytes)
    save_file({"x": np.ones((2, 3, 4), np.float32)}, str(tmp_path / "smoke.safetensors"))
    inputs, _ = smoke_request(pipe, tmp_path)                   # the package's own input wins
    assert list(inputs) == ["x"] and inputs["x"].shape == (2, 3, 4)


def test_pending_rollbacks_are_kept_until_acknowledged():
    pending = PendingRollbacks()
    first = Rollback("m", "2", "a" * 64, "boom", 1.0, "1")
    pending.add(first)
    sent = pending.sending()
    second = Rollback("m", "3", "b" * 64, "boom", 2.0, "1")
    pending.add(second)                                         # arrives while a heartbeat is in flight
    pending.acknowledge(sent)
    assert pending.sending() == [second]
    message = fleet_pb.HeartbeatRequest(rollbacks=[fleet_pb.Rollback(**second.__dict__)])
    assert message.rollbacks[0].reason == "boom"
