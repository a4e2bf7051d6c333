"""tritonclient (a client nobody here wrote) against a real cloud-service on loopback;
every result is compared with ONNX Runtime called directly."""
import asyncio
import queue

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from models import MLP_IN, TYPES


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.address) as c:
        yield c


def ort_run(repository, model, feeds):
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def mlp_input(rows=3, seed=1):
    return np.random.default_rng(seed).standard_normal((rows, MLP_IN)).astype(np.float32)


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta.name == "edgefold" and "model_repository" in meta.extensions
    model = client.get_model_metadata("mlp")
    assert model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("x", "FP32", [-1, MLP_IN])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("y", "FP32", [-1, 4])]


def test_mlp_matches_onnxruntime(client, repository):
    x = mlp_input()
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp])
    np.testing.assert_array_equal(result.as_numpy("y"), ort_run(repository, "mlp", {"x": x})[0])


def test_every_datatype_round_trips(client, repository):
    rng = np.random.default_rng(7)
    feeds, inputs = {}, []
    for name, _, dtype in TYPES:
        if dtype is object:
            value = np.array([[b"a", b"", b"\x00bin"], [b"edge", b"fold", "\u00e9".encode()]], dtype=object)
        elif dtype is np.bool_:
            value = rng.integers(0, 2, (2, 3)).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            value = rng.integers(info.min, info.max, (2, 3), dtype=dtype, endpoint=True)
        else:
            value = rng.standard_normal((2, 3)).astype(dtype)
        feeds[f"in_{name.lower()}"] = value
        inp = grpcclient.InferInput(f"in_{name.lower()}", [2, 3], name)
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    result = client.infer("types", inputs)
    text = {k: (np.vectorize(bytes.decode, otypes=[object])(v) if v.dtype == object else v) for k, v in feeds.items()}
    expected = ort_run(repository, "types", text)
    for (name, _, dtype), want in zip(TYPES, expected):
        got = result.as_numpy(f"out_{name.lower()}")
        if dtype is object:
            assert got.tolist() == np.vectorize(str.encode, otypes=[object])(want).tolist() \
                == feeds["in_bytes"].tolist()
        else:
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got, feeds[f"in_{name.lower()}"])


def test_requested_outputs_only(client):
    inputs = []
    for name, _, dtype in TYPES:
        inp = grpcclient.InferInput(f"in_{name.lower()}", [2, 3], name)
        inp.set_data_from_numpy(np.zeros((2, 3), dtype=dtype) if dtype is not object
                                else np.full((2, 3), b"x", dtype=object))
        inputs.append(inp)
    result = client.infer("types", inputs, outputs=[grpcclient.InferRequestedOutput("out_int8")])
    assert [o.name for o in result.get_response().outputs] == ["out_int8"]


def test_versions(client):
    x = np.zeros(1, np.float32)

    def run(version):
        inp = grpcclient.InferInput("x", [1], "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("versioned", [inp], model_version=version).as_numpy("y")[0]
    assert run("1") == 1.0 and run("2") == 2.0 and run("") == 2.0  # default: highest
    assert client.get_model_metadata("versioned").versions == ["1", "2"]


def test_statistics_and_index(client):
    stats = client.get_inference_statistics("mlp").model_stats[0]
    assert stats.name == "mlp" and stats.inference_stats.success.count >= 1
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index["mlp"] == "READY" and index["types"] == "READY"


def test_unload_and_load_without_restart(client):
    client.unload_model("versioned")
    assert not client.is_model_ready("versioned")
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("versioned")
    assert "StatusCode.NOT_FOUND" in str(err.value.status())
    client.load_model("versioned")
    assert client.is_model_ready("versioned", "2")


def test_load_unknown_model_is_clear(client):
    with pytest.raises(InferenceServerException) as err:
        client.load_model("no_such_model")
    assert "not in the repository" in err.value.message()


def test_streaming_infer(client, repository):
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        xs = [mlp_input(rows=1, seed=s) for s in range(5)]
        for i, x in enumerate(xs):
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("mlp", [inp], request_id=str(i))
        bad = grpcclient.InferInput("x", [1, MLP_IN + 1], "FP32")
        bad.set_data_from_numpy(np.zeros((1, MLP_IN + 1), np.float32))
        client.async_stream_infer("mlp", [bad], request_id="bad")
        got = [responses.get(timeout=30) for _ in range(6)]
    finally:
        client.stop_stream()
    results = {r.get_response().id: r.as_numpy("y") for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(results[str(i)], ort_run(repository, "mlp", {"x": x})[0])
    assert len(errors) == 1 and "shape" in errors[0].message()


def test_aio_client(server, repository):
    async def main():
        async with aioclient.InferenceServerClient(server.address) as c:
            assert await c.is_server_live()
            xs = [mlp_input(rows=2, seed=s) for s in range(8)]

            async def one(x):
                inp = aioclient.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                return (await c.infer("mlp", [inp], client_timeout=30)).as_numpy("y")
            return xs, await asyncio.gather(*(one(x) for x in xs))
    xs, ys = asyncio.run(main())
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(y, ort_run(repository, "mlp", {"x": x})[0])
