"""The deploy agent for real: `edge-runtime agent` subprocesses against a real `cloud-service`,
called through the Open Inference Protocol (our client and tritonclient) on loopback.

    .venv/bin/python -m pytest -q tests/test_agent.py
"""
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.agent.config import AgentConfigError, PolicyConfig, load_agent_config
from edge_runtime.agent.policy import Decision, decide, device_state, link_quality
from edge_runtime.client.fleet_client import FleetClient
from edge_runtime.client.oip_client import OipClient
from edge_runtime.vision.switch import DeviceState
from edgefold_proto import pb
from models import mlp_onnx, write
from server_process import AgentProcess, ServerProcess, free_port

FRAME = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
X = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, split_deployment):
    """An ONNX model, the split deployment's cloud tails, and its device stage chain as a
    download-only package."""
    root = tmp_path_factory.mktemp("agent_repo")
    mlp_onnx(root / "mlp" / "1" / "model.onnx")
    write(root / "mlp" / "config.toml", "max_batch_size = 32\n")
    device_dir, tails, _, _ = split_deployment
    for model in tails.iterdir():
        shutil.copytree(model, root / model.name)
    shutil.copytree(device_dir, root / "res_cnn_device" / "1")
    write(root / "res_cnn_device" / "config.toml", 'backend = "device"\n')
    return root


def agent_toml(path: Path, cloud: str | None, pipelines: str, heartbeat_s: float = 0.2, update_s: float = 60.0,
               state: str = "state", cloud_extra: str = "") -> Path:
    cloud_table = f'[cloud]\naddress = "{cloud}"\ntimeout_s = 1.0\nheartbeat_s = {heartbeat_s}\n' \
                  f'update_s = {update_s}\n{cloud_extra}' if cloud else ""
    path.write_text(f'device_id = "test-pi"\nprofile = "raspberry-pi-4"\nstate_dir = "{state}"\n'
                    f'{cloud_table}[serve]\nhost = "127.0.0.1"\nport = 0\n{pipelines}')
    return path


MLP = '[[pipeline]]\nname = "mlp"\nkind = "local"\nmodel = "mlp"\n'


def reference_mlp(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def wait_ready(client: OipClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.ready(timeout_s=2.0):
        if time.monotonic() > deadline:
            raise TimeoutError("the agent did not become ready")
        time.sleep(0.05)


def test_pulls_a_model_and_serves_it_like_onnxruntime(repo, tmp_path):
    cloud = ServerProcess(repo)
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", cloud.address, MLP))
    try:
        with OipClient(agent.address) as client:
            wait_ready(client)
            y = client.infer("mlp", {"x": X})["y"]
            np.testing.assert_array_equal(y, reference_mlp(repo / "mlp" / "1" / "model.onnx", X))
            meta = client.call("ModelMetadata", pb.ModelMetadataRequest(name="mlp"))
            assert [t.name for t in meta.inputs] == ["x"] and meta.versions == ["1"]
            with pytest.raises(grpc.RpcError) as bad:
                client.infer("mlp", {"x": X[:, :3]})
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'x'" in bad.value.details()
            with pytest.raises(grpc.RpcError) as unknown:
                client.infer("nope", {"x": X})
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        import tritonclient.grpc as triton              # a client nobody here wrote
        tc = triton.InferenceServerClient(agent.address)
        inp = triton.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        np.testing.assert_array_equal(tc.infer("mlp", [inp]).as_numpy("y"), y)
        assert tc.is_server_live() and tc.is_model_ready("mlp")
        # the model is on the device, swapped in atomically: CURRENT names a complete folder
        assert (tmp_path / "state" / "models" / "mlp" / "CURRENT").is_file()
        # the cloud saw the device's heartbeats and telemetry
        with FleetClient(cloud.address) as fleet:
            deadline = time.monotonic() + 10
            while True:
                devices = {d.device_id: d for d in fleet.list_devices()}
                if "test-pi" in devices and devices["test-pi"].samples_received >= 2:
                    break
                assert time.monotonic() < deadline, devices
                time.sleep(0.1)
            assert devices["test-pi"].profile == "raspberry-pi-4"
            assert [m.name for m in devices["test-pi"].models] == ["mlp"]
    finally:
        assert agent.terminate() == 0, agent.output()
        cloud.kill()
    assert "agent stopped" in agent.output()


def test_split_pipeline_offloads_then_degrades_when_the_cloud_dies(repo, tmp_path):
    cloud = ServerProcess(repo)
    pipes = ('[[pipeline]]\nname = "digits"\nkind = "split"\nmodel = "res_cnn_device"\n'
             'placement = "split:stage2:b4:int8"\ndeadline_s = 2.0\n')
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", cloud.address, pipes))
    try:
        with OipClient(agent.address, timeout_s=10) as client:
            wait_ready(client)
            out = client.infer("digits", {"x": FRAME})
            assert list(out["where"]) == [b"cloud", b"cloud"] and not out["degraded"].any()
            assert out["logits"].shape == (2, 10) and (out["label"] == out["logits"].argmax(1)).all()
            cloud.kill()
            out = client.infer("digits", {"x": FRAME})      # answered on the device, flagged
            assert out["degraded"].all() and all(w != b"cloud" for w in out["where"])
    finally:
        agent.kill()
        cloud.kill()


def test_a_cloud_with_a_token_gets_it_on_every_call(repo, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    cloud = ServerProcess(repo, "--token-file", str(tmp_path / "token"))
    pipes = ('[[pipeline]]\nname = "digits"\nkind = "split"\nmodel = "res_cnn_device"\n'
             'placement = "split:stage2:int8"\ndeadline_s = 2.0\n')
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", cloud.address, pipes, cloud_extra='token_file = "token"\n'))
    try:
        with OipClient(agent.address, timeout_s=10) as client:
            wait_ready(client)                                       # pulled with the token
            out = client.infer("digits", {"x": FRAME[:1]})
            assert list(out["where"]) == [b"cloud"] and not out["degraded"].any()   # offloaded with it
    finally:
        agent.kill()
        cloud.kill()


def test_cloud_down_at_start_then_the_agent_catches_up(repo, tmp_path):
    port = free_port()
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", f"127.0.0.1:{port}", MLP))
    cloud = None
    try:
        with OipClient(agent.address) as client:
            assert client.live() and not client.ready()
            with pytest.raises(grpc.RpcError) as err:
                client.infer("mlp", {"x": X})
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not" in err.value.details()
            time.sleep(1.0)                                   # a few heartbeats' samples pile up
            cloud = ServerProcess(repo, "--port", str(port))
            wait_ready(client)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"],
                                          reference_mlp(repo / "mlp" / "1" / "model.onnx", X))
        with FleetClient(cloud.address) as fleet:
            deadline = time.monotonic() + 10
            while not any(d.device_id == "test-pi" and d.samples_received >= 3 for d in fleet.list_devices()):
                assert time.monotonic() < deadline, "the buffered samples did not reach the cloud"
                time.sleep(0.1)
    finally:
        agent.kill()
        if cloud:
            cloud.kill()


def test_a_corrupted_download_is_rejected_and_the_old_model_keeps_serving(repo, tmp_path):
    repo = Path(shutil.copytree(repo, tmp_path / "repo"))
    cloud = ServerProcess(repo)
    config = agent_toml(tmp_path / "agent.toml", cloud.address, MLP, heartbeat_s=3.0, update_s=3.0)
    v1, v2 = repo / "mlp" / "1" / "model.onnx", repo / "mlp" / "2" / "model.onnx"
    try:
        agent = AgentProcess(config)
        with OipClient(agent.address) as client:
            wait_ready(client)
        assert agent.terminate() == 0
        mlp_onnx(v2, seed=1)                                    # a new version in the cloud...
        with FleetClient(cloud.address) as fleet:
            manifest = fleet.manifest("mlp")
        assert manifest.version == "2"
        partial = tmp_path / "state" / "models" / ".partial" / f"mlp-{manifest.digest}" / "2" / "model.onnx"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"\0" * v2.stat().st_size)          # ...whose download on the device is corrupt
        agent = AgentProcess(config)
        with OipClient(agent.address) as client:
            wait_ready(client)
            agent.wait_for("rejected", timeout_s=30)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v1, X))
            agent.wait_for("ready from mlp v2", timeout_s=30)   # the next try downloads it cleanly
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v2, X))
    finally:
        agent.kill()
        cloud.kill()


def test_sigterm_during_a_request_finishes_it(split_deployment, tmp_path):
    device_dir = split_deployment[0]
    pipes = (f'[[pipeline]]\nname = "slow"\nkind = "early-exit"\npath = "{device_dir}"\n'
             'slowdown = 1500.0\n')                              # each stage stretched: a request takes ~2 s
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", None, pipes))
    result = {}
    with OipClient(agent.address, timeout_s=60) as client:
        wait_ready(client)
        client.infer("slow", {"x": FRAME[:1]})                   # warm: the stretch is measured once
        call = threading.Thread(target=lambda: result.update(client.infer("slow", {"x": FRAME[:1]})))
        call.start()
        time.sleep(0.3)
        agent.proc.send_signal(__import__("signal").SIGTERM)
        call.join(60)
    assert agent.proc.wait(30) == 0, agent.output()
    assert result["label"].shape == (1,), "the in-flight request did not finish"
    assert "agent stopped" in agent.output()


def test_collab_llm_and_tensor_parallel_pipelines(tmp_path):
    import torch

    from edge_runtime.tp.prepare import prepare
    from llm_models import make_model
    from split.llama import generate, load_llama
    model_dir = tmp_path / "lm"
    make_model(model_dir)
    prepare(model_dir, 2, [1.0, 1.0], tmp_path / "shards", progress=False)
    pipes = (f'[[pipeline]]\nname = "chat"\nkind = "collab-llm"\npath = "{model_dir}"\nmode = "standalone"\n'
             f'[[pipeline]]\nname = "big"\nkind = "tp"\npath = "{tmp_path / "shards"}"\n')
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", None, pipes))
    prompt = np.array([5, 17, 3, 42, 8, 11], np.int64)
    try:
        with OipClient(agent.address, timeout_s=60) as client:
            wait_ready(client, timeout_s=120)
            with torch.no_grad():
                reference = list(generate(load_llama(model_dir), prompt.tolist(), 8))
            tp = client.infer("big", {"prompt_ids": prompt}, parameters={"max_new_tokens": 8})["tokens"].tolist()
            assert tp == reference[:len(tp)] and len(tp) >= 1   # stops early only at an eos id
            chat = client.infer("chat", {"prompt_ids": prompt}, parameters={"max_new_tokens": 5})
            assert len(chat["tokens"]) == 5 and set(chat["sources"]) == {b"edge"}
            with pytest.raises(grpc.RpcError) as err:
                client.infer("chat", {"prompt_ids": prompt}, parameters={"max_new_tokens": -1})
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert agent.terminate() == 0, agent.output()


# --- units: the config file and the policy ---------------------------------------------------------
@pytest.mark.parametrize("body, field", [
    ('profile = "raspberry-pi-4"\n' + MLP, "device_id"),
    ('device_id = "a b"\n' + MLP, "device_id"),
    ('device_id = "d"\n[[pipeline]]\nname = "m"\nkind = "magic"\npath = "x"\n', "kind"),
    ('device_id = "d"\n' + MLP, "address"),                                  # pulled, but no cloud
    ('device_id = "d"\n[cloud]\naddress = "h:1"\nheartbeat_s = -1\n' + MLP, "heartbeat_s"),
    ('device_id = "d"\n[serve]\nport = "x"\n' + MLP, "port"),
    ('device_id = "d"\n', "pipeline"),
    ('device_id = ', "TOML"),
])
def test_config_errors_name_the_file_and_field(tmp_path, body, field):
    path = tmp_path / "agent.toml"
    path.write_text(body)
    with pytest.raises(AgentConfigError) as err:
        load_agent_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_policy_rules():
    policy = PolicyConfig(low_battery=0.2, hot_c=80.0, min_link_quality=0.3)
    assert link_quality(None, False) == 0.0 and link_quality(20.0, True) == 1.0
    assert link_quality(500.0, True) == pytest.approx(0.1)
    assert not decide(DeviceState(1.0, 50.0, 0.1), policy).allow_cloud
    low = DeviceState(0.1, 50.0, 1.0)
    assert decide(low, policy) == Decision(True, "energy", "battery 10% < 20%", low)
    assert decide(DeviceState(1.0, 85.0, 1.0), policy).objective == "energy"
    assert decide(DeviceState(1.0, 50.0, 1.0), policy).reason == "normal"
    assert device_state({"battery_percent": 15.0, "power_plugged": False}, 1.0).battery == 0.15
    assert device_state({"battery_percent": 15.0, "power_plugged": True}, 1.0).battery == 1.0
    assert device_state({}, 0.5) == DeviceState(1.0, 50.0, 0.5)


def test_split_pipeline_replans_when_the_policy_changes(split_deployment):
    from devices.probe import peak_gflops
    from devices.profiles import load_profile, parse_link
    from edge_runtime.agent.config import PipelineConfig
    from edge_runtime.agent.pipeline import Context
    from edge_runtime.agent.pipeline_factory import open_pipeline
    from split.planner import plan
    device = load_profile("raspberry-pi-4")
    link = parse_link("100mbit,5ms")
    spec = PipelineConfig("digits", "split", path=split_deployment[0], options={"placement": "auto"})
    pipe = open_pipeline(spec, split_deployment[0], Context("127.0.0.1:1", None, device, link))
    try:
        for objective in ("latency", "energy"):
            pipe.adapt(Decision(True, objective, objective), link)
            expected = plan(pipe.candidates, link, device, load_profile("cloud-cpu"), peak_gflops(), objective)
            assert pipe.placement == expected.choice.candidate.placement
        pipe.adapt(Decision(False, "latency", "link down"), link)
        assert pipe.describe() == {"kind": "split", "placement": "local", "why": "link down"}
    finally:
        pipe.close()


def test_adaptive_pipeline_escalates_to_the_cloud_then_to_the_local_big_model(tmp_path):
    import torch

    from split.vision.adaptive import build_adaptive
    from split.vision.models import build
    torch.manual_seed(0)
    small, big = build("frame_small"), build("frame_big")        # untrained: the small one is never confident
    repo = tmp_path / "repo"
    device = build_adaptive(small, big, repo / "frames-device" / "1", (1, 96, 96), switch={"hold": 2},
                            repo_dir=repo, cloud_model="frame_big")
    write(repo / "frames-device" / "config.toml", 'backend = "device"\n')
    frames = np.random.default_rng(2).random((6, 1, 96, 96), dtype=np.float32)
    big_ort = ort.InferenceSession(str(device / "big.onnx"), providers=["CPUExecutionProvider"])
    expected_big = big_ort.run(None, {"x": frames})[0]
    cloud = ServerProcess(repo)
    pipes = '[[pipeline]]\nname = "frames"\nkind = "adaptive"\nmodel = "frames-device"\ndeadline_s = 2.0\n'
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", cloud.address, pipes))
    try:
        with OipClient(agent.address, timeout_s=10) as client:
            wait_ready(client)
            deadline = time.monotonic() + 20
            while True:                          # the first heartbeats establish the link's quality
                out = client.infer("frames", {"x": frames})
                if any(r.endswith(b"cloud") for r in out["ran"]):
                    break
                assert time.monotonic() < deadline, list(out["ran"])
            assert out["ran"][0] in (b"small,cloud", b"cloud")             # escalated, or held there
            escalated = [i for i, r in enumerate(out["ran"]) if r != b"small"]
            np.testing.assert_allclose(out["y"][escalated], expected_big[escalated], rtol=1e-5, atol=1e-5)
            cloud.kill()                         # escalations now run the big model on the device
            out = client.infer("frames", {"x": frames})
            assert all(r.endswith(b"big") for r in out["ran"] if r != b"small")
            assert all(d == r.endswith(b"cloud,big") for d, r in zip(out["degraded"], out["ran"]))
            escalated = [i for i, r in enumerate(out["ran"]) if r != b"small"]
            assert escalated
            np.testing.assert_allclose(out["y"][escalated], expected_big[escalated], rtol=1e-5, atol=1e-5)
    finally:
        agent.kill()
        cloud.kill()
