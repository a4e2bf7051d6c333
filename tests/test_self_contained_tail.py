"""Self-contained compressed tails (issue 17, item 1): the tail's ONNX graph starts with the
dequantization (DequantizeLinear, int4 unpacked by graph ops), the codec values travel as
ordinary input tensors, so any Open Inference Protocol server serves it. Checked on ONNX
Runtime directly, through the real cloud-service with the device Runtime in both codec forms,
with tritonclient, with wrong-length codec inputs, and served by MLServer (a stock server that
knows nothing of our codec)."""
import json
import subprocess
import time

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_runtime.client.oip_client import OipClient
from edge_runtime.vision.runtime import Runtime, codec_inputs
from loadgen import free_port
import mlserver_venv
from server_process import ServerProcess
from split.codec import decode, encode
from split.vision.bottleneck import Bottleneck
from split.vision.cut import cut
from split.vision.deploy import build_deployment
from split.vision.exits import attach_exits
from split.vision.export import write_tail
from split.vision.models import build

NEVER = {"stage1": 1.0, "stage2": 1.0}
CODECS = ("int8", "int4")


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """res_cnn (seed 0, untrained) with exits, cut after stage2 and a b8 bottleneck there, its tails
    written in both forms."""
    root = tmp_path_factory.mktemp("contained")
    torch.manual_seed(0)
    net = attach_exits(build("res_cnn").eval(), ["stage1", "stage2"], torch.rand(1, 1, 64, 64)).eval()
    with torch.no_grad():
        activation = net.backbone[:3](torch.rand(1, 1, 64, 64))             # after stage2: (1, 32, 16, 16)
    bottleneck = Bottleneck.at(activation, 8).eval()
    device = build_deployment(net, "res_cnn", root / "device", root / "repository", (1, 64, 64), cuts=["stage2"],
                              bottlenecks={("stage2", 8): bottleneck}, self_contained=CODECS, codec_form="inputs")
    return device, root / "repository"


@pytest.fixture(scope="module")
def server(deployment):
    proc = ServerProcess(deployment[1])
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def mlserver(deployment, tmp_path_factory):
    """MLServer 1.7.1 (its own venv, installed on first use by scripts/mlserver_venv.py, as the serving
    benchmark does) serving the self-contained tails through scripts/mlserver_onnx_runtime.py."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    if why := mlserver_venv.ensure(log=lambda m: None):
        pytest.skip(f"no MLServer to serve the self-contained tails: {why}")
    _, repo = deployment
    root, port = tmp_path_factory.mktemp("mlserver"), free_port()
    names = [f"res_cnn_tail_stage2_{codec}" for codec in CODECS]
    cmd, env = mlserver_venv.repository(root, {n: repo / n / "1" / "model.onnx" for n in names}, port)
    log = open(root / "mlserver.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        with grpcclient.InferenceServerClient(address) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if all(client.is_model_ready(n) for n in names):
                        break
                except Exception:  # not listening yet
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, \
                    "MLServer did not start: " + (root / "mlserver.log").read_text()[-2000:]
                time.sleep(0.5)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.parametrize("codec", CODECS)
def test_mlserver_serves_the_self_contained_tail_as_cloud_service_serves_the_codec_form(deployment, server,
                                                                                        mlserver, codec):
    device, _ = deployment
    frames = np.random.default_rng(6).random((4, 1, 64, 64), dtype=np.float32)
    with Runtime(device, f"split:stage2:{codec}", cloud=mlserver, deadline_s=10.0, thresholds=NEVER) as stock, \
         Runtime(device, f"split:stage2:{codec}", cloud=server.address, deadline_s=10.0, thresholds=NEVER,
                 codec_form="parameters") as ours:
        for frame in frames:
            a, b = stock.infer(frame), ours.infer(frame)
            assert a.where == b.where == "cloud" and not a.degraded and not b.degraded, (a.error, b.error)
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
            assert a.label == b.label


@pytest.mark.parametrize("model, size, stage", [("seq_cnn", 60, "conv2"), ("res_cnn", 64, "stage2")])
@pytest.mark.parametrize("codec", CODECS)
def test_self_contained_tail_equals_plain_tail_on_decoded_input(tmp_path, model, size, stage, codec):
    torch.manual_seed(0)
    net = build(model, seed=0).eval()
    frames = torch.rand(3, 1, size, size)
    split = cut(net, stage, frames[:1])
    with torch.no_grad():
        activation = split.head(frames)           # seq_cnn at 60: (3, 32, 15, 15), an odd width for int4
    write_tail(tmp_path, "plain", split.tail, activation)
    write_tail(tmp_path, "contained", split.tail, activation, codec=codec)
    enc = encode(activation.numpy(), codec)
    want = run(tmp_path / "plain" / "1" / "model.onnx", {"z": decode(enc.data, enc.parameters)})
    got = run(tmp_path / "contained" / "1" / "model.onnx", codec_inputs(enc))
    np.testing.assert_allclose(got, want, atol=1e-5)
    graph = onnx.load(str(tmp_path / "contained" / "1" / "model.onnx")).graph
    (dq,) = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    inputs = {i.name: i for i in graph.input}
    initializers = {i.name for i in graph.initializer}
    assert dq.input[1:] == ["z_scale", "z_zero_point"] and not set(dq.input[1:]) & initializers
    assert {"z_q", "z_scale", "z_zero_point"} <= set(inputs) and "z" not in inputs
    assert inputs["z_q"].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inputs["z_scale"].type.tensor_type.shape.dim] == [activation.shape[1]]
    assert dq.output == ["z"]
    if codec == "int4":
        assert {"BitShift", "Concat", "Slice"} <= {n.op_type for n in graph.node}
    config = (tmp_path / "contained" / "config.toml").read_text()
    assert "max_batch_size = 0" in config


@pytest.mark.parametrize("codec", CODECS)
def test_runtime_inputs_form_matches_parameters_form_through_cloud_service(deployment, server, codec):
    device, _ = deployment
    assert json.loads((device / "deployment.json").read_text())["codec_form"] == "inputs"
    frames = np.random.default_rng(3).random((4, 1, 64, 64), dtype=np.float32)
    with Runtime(device, f"split:stage2:{codec}", cloud=server.address, deadline_s=10.0, thresholds=NEVER) as inputs_rt, \
         Runtime(device, f"split:stage2:{codec}", cloud=server.address, deadline_s=10.0, thresholds=NEVER,
                 codec_form="parameters") as params_rt:
        assert inputs_rt.cloud_model == f"res_cnn_tail_stage2_{codec}" and params_rt.cloud_model == "res_cnn_tail_stage2"
        for frame in frames:
            a, b = inputs_rt.infer(frame), params_rt.infer(frame)
            assert a.where == b.where == "cloud" and not a.degraded and not b.degraded, (a.error, b.error)
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
            assert a.label == b.label
    # bytes: the same payload; 4 + 1 bytes a channel instead of the parameters' text
    payload = 32 * 16 * (16 if codec == "int8" else 8)
    print(f"{codec}: payload {payload} B; codec values as inputs {a.bytes_sent - payload} B "
          f"(total {a.bytes_sent}), as parameters {b.bytes_sent - payload} B (total {b.bytes_sent})")
    assert a.bytes_sent == payload + 5 * 32
    assert payload < b.bytes_sent


@pytest.mark.parametrize("codec", CODECS)
def test_a_bottleneck_placement_in_the_inputs_form_matches_the_parameters_form(deployment, server, codec):
    device, _ = deployment
    frames = np.random.default_rng(7).random((3, 1, 64, 64), dtype=np.float32)
    placement = f"split:stage2:b8:{codec}"
    with Runtime(device, placement, cloud=server.address, deadline_s=10.0, thresholds=NEVER) as inputs_rt, \
         Runtime(device, placement, cloud=server.address, deadline_s=10.0, thresholds=NEVER,
                 codec_form="parameters") as params_rt:
        assert (inputs_rt.cloud_model, params_rt.cloud_model) == (f"res_cnn_tail_stage2_b8_{codec}",
                                                                  "res_cnn_tail_stage2_b8")
        for frame in frames:
            a, b = inputs_rt.infer(frame), params_rt.infer(frame)
            assert a.where == b.where == "cloud" and not a.degraded and not b.degraded, (a.error, b.error)
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
            assert a.bytes_sent < b.bytes_sent


@pytest.mark.parametrize("codec", CODECS)
def test_tritonclient_calls_the_self_contained_tail_with_ordinary_inputs(deployment, server, codec):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, repo = deployment
    z = np.random.default_rng(4).standard_normal((2, 32, 16, 16)).astype(np.float32)
    feeds = codec_inputs(encode(z, codec))
    with grpcclient.InferenceServerClient(server.address) as client:
        inputs = []
        for name, array in feeds.items():
            tensor = grpcclient.InferInput(name, list(array.shape), "UINT8" if array.dtype == np.uint8 else "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        got = client.infer(f"res_cnn_tail_stage2_{codec}", inputs).as_numpy("logits")
    np.testing.assert_allclose(got, run(repo / f"res_cnn_tail_stage2_{codec}" / "1" / "model.onnx", feeds), atol=1e-5)


@pytest.mark.parametrize("bad", ["z_scale", "z_zero_point"])
def test_wrong_length_codec_inputs_are_refused_by_name(deployment, server, bad):
    z = np.random.default_rng(5).standard_normal((1, 32, 16, 16)).astype(np.float32)
    feeds = codec_inputs(encode(z, "int4"))
    feeds[bad] = feeds[bad][:31]
    with OipClient(server.address, timeout_s=10.0) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.infer("res_cnn_tail_stage2_int4", feeds)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"input '{bad}'" in err.value.details(), err.value.details()
        good = client.infer("res_cnn_tail_stage2_int4", codec_inputs(encode(z, "int4")))   # still serving
    assert good["logits"].shape == (1, 10)


def test_forms_are_checked(deployment, tmp_path):
    device, _ = deployment
    with pytest.raises(ValueError, match="no bottleneck 'stage2_b4'"):
        Runtime(device, "split:stage2:b4:int8", cloud="127.0.0.1:1")
    with pytest.raises(ValueError, match="codec_form 'x'"):
        Runtime(device, "split:stage2:int8", cloud="127.0.0.1:1", codec_form="x")
    net = attach_exits(build("seq_cnn").eval(), ["conv2"], torch.rand(1, 1, 64, 64)).eval()
    with pytest.raises(ValueError, match="needs self-contained tails"):
        build_deployment(net, "seq_cnn", tmp_path / "d", tmp_path / "r", (1, 64, 64), codec_form="inputs")
