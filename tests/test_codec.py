"""The wire codec: round-trip error bounds, and compressed tensors through a real cloud-service."""
import grpc
import numpy as np
import pytest
import torch

from edge_runtime.client.oip_client import OipClient
from server_process import ServerProcess
from split.codec import CodecError, decode, encode
from split.png import PngError, decode_png, encode_png

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("codec,levels", [("int8", 255), ("int4", 15)])
@pytest.mark.parametrize("shape,axis", [((2, 8, 5, 7), 1), ((3, 65, 16), -1), ((4, 6), None)])
def test_round_trip_error_is_at_most_half_a_step(codec, levels, shape, axis):
    x = (RNG.standard_normal(shape) * RNG.uniform(0.1, 10, shape[axis] if axis is not None else 1)
         .reshape([-1 if i == (axis or 0) % len(shape) and axis is not None else 1 for i in range(len(shape))])
         ).astype(np.float32)
    enc = encode(x, codec, axis)
    y = decode(enc.data, enc.parameters)
    assert y.shape == x.shape and y.dtype == np.float32
    scale = np.array([float(s) for s in enc.parameters["scale"].split(",")], np.float32)
    if axis is not None:
        bshape = [1] * x.ndim
        bshape[axis] = -1
        scale = scale.reshape(bshape)
    assert np.all(np.abs(x - y) <= scale / 2 * (1 + 1e-5) + 1e-7)
    # range check: the step is (max - min) / levels per channel
    assert np.all(scale <= (np.abs(x).max() * 2 / levels) * (1 + 1e-6))


def test_int4_packs_two_per_byte_with_odd_last_dim():
    x = RNG.random((1, 3, 4, 5)).astype(np.float32)
    enc = encode(x, "int4")
    assert enc.data.shape == (1, 3, 4, 3) and enc.parameters["last_dim"] == 5
    assert np.abs(decode(enc.data, enc.parameters) - x).max() <= 0.5 / 15 + 1e-6
    assert encode(x, "int8").data.nbytes == 60 and enc.data.nbytes == 36


def test_relu_activation_has_zero_point_zero_and_exact_zeros():
    x = np.maximum(RNG.standard_normal((2, 4, 3, 3)), 0).astype(np.float32)
    enc = encode(x, "int8")
    assert set(enc.parameters["zero_point"].split(",")) == {"0"}
    y = decode(enc.data, enc.parameters)
    assert np.all(y[x == 0] == 0)


def test_png_frames():
    frames = np.round(RNG.random((2, 1, 16, 9)) * 255).astype(np.float32) / 255
    enc = encode(frames, "png")
    assert enc.datatype == "BYTES" and enc.data.shape == (2,)
    np.testing.assert_allclose(decode(enc.data, enc.parameters), frames, atol=1e-6)
    image = (RNG.random((7, 5)) * 255).astype(np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)
    with pytest.raises(PngError, match="signature"):
        decode_png(b"GIF89a")


@pytest.mark.parametrize("change,fragment", [
    ({"codec": "int3"}, "'codec' is 'int3'"),
    ({"scale": "1,2"}, "'scale' has 2 values, expected one per index of axis 1 (4)"),
    ({"scale": "0,1,1,1"}, "finite values > 0"),
    ({"scale": "a,b"}, "comma-separated numbers"),
    ({"zero_point": "0,0,0,300"}, "'zero_point' must lie in 0..255"),
    ({"axis": 7}, "'axis' is 7"),
])
def test_bad_parameters_are_named(change, fragment):
    enc = encode(RNG.random((1, 4, 2, 2)).astype(np.float32), "int8")
    with pytest.raises(CodecError) as err:
        decode(enc.data, {**enc.parameters, **change})
    assert fragment in str(err.value)


# --- through the cloud service: the tail dequantizes before it runs ------------------------
@pytest.fixture(scope="module")
def split_server(tmp_path_factory):
    from split.vision.cut import cut
    from split.vision.export import export_onnx, write_tail
    from split.vision.models import build
    repo = tmp_path_factory.mktemp("split-repo")
    model = build("res_cnn").eval()
    x = torch.rand(2, 1, 64, 64)
    s = cut(model, "stage2", x)
    write_tail(repo, "tail", s.tail, s.head(x).detach())
    whole = repo / "whole"
    export_onnx(model, x, whole / "1" / "model.onnx", "image", ["logits"])
    (whole / "config.toml").write_text("max_batch_size = 4\n")
    proc = ServerProcess(repo)
    yield proc, model, s, x
    proc.kill()


def test_compressed_activation_through_the_cloud(split_server):
    proc, model, s, x = split_server
    with torch.no_grad():
        z, expected = s.head(x).numpy(), model(x).numpy()
    with OipClient(proc.address) as client:
        for codec, tol in (("int8", 0.05), ("int4", 0.6)):
            enc = encode(z, codec)
            out = client.infer("tail", {"z": enc.data}, input_parameters={"z": enc.parameters})["logits"]
            assert out.shape == expected.shape
            assert np.abs(out - expected).max() < tol * np.abs(expected).max(), codec
        frame = np.round(x.numpy() * 255) / 255
        enc = encode(frame, "png")
        out = client.infer("whole", {"image": enc.data}, input_parameters={"image": enc.parameters})["logits"]
        with torch.no_grad():
            np.testing.assert_allclose(out, model(torch.from_numpy(frame).float()).numpy(), atol=1e-4)


@pytest.mark.parametrize("change,fragment", [
    ({"codec": "int3"}, "input 'z': parameter 'codec' is 'int3'"),
    ({"scale": "1,2"}, "input 'z': parameter 'scale' has 2 values"),
    ({"zero_point": "-1"}, "input 'z': parameter 'zero_point'"),
    ({"axis": 9}, "input 'z': parameter 'axis' is 9"),
])
def test_wrong_codec_parameters_get_invalid_argument(split_server, change, fragment):
    proc, model, s, x = split_server
    with torch.no_grad():
        enc = encode(s.head(x).numpy(), "int8")
    with OipClient(proc.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.infer("tail", {"z": enc.data}, input_parameters={"z": {**enc.parameters, **change}})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in err.value.details()
        with torch.no_grad():
            wrong_shape = encode(s.head(x).numpy()[:, :, :8], "int8")   # decodes, but not the model's shape
        with pytest.raises(grpc.RpcError) as err:
            client.infer("tail", {"z": wrong_shape.data}, input_parameters={"z": wrong_shape.parameters})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'z': shape" in err.value.details()
        assert client.infer("tail", {"z": enc.data}, input_parameters={"z": enc.parameters})["logits"].shape == (2, 10)
