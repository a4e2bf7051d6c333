"""Each kind of bad request gets its status code and a message naming the tensor; the
server keeps serving (a good request right after each one succeeds)."""
import grpc
import numpy as np
import pytest

from edge_runtime.client.oip_client import OipClient, build_request
from edgefold_proto import pb
from models import MLP_IN

GOOD_X = np.ones((2, MLP_IN), np.float32)


@pytest.fixture(scope="module")
def client(server):
    with OipClient(server.address, timeout_s=30) as c:
        yield c


def mlp_request(**changes) -> pb.ModelInferRequest:
    return build_request("mlp", {"x": GOOD_X}, **changes)


def with_raw(request, raw):
    del request.raw_input_contents[:]
    request.raw_input_contents.extend(raw)
    return request


def _shape(request, shape):
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend(shape)
    return request


def _typed(values, shape):
    request = pb.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values)
    return request


def _nan():
    x = GOOD_X.copy()
    x[1, 3] = np.nan
    return build_request("mlp", {"x": x})


def _datatype(request, datatype):
    request.inputs[0].datatype = datatype
    return request


CASES = [
    ("unknown model", lambda: build_request("nope", {"x": GOOD_X}), grpc.StatusCode.NOT_FOUND, "'nope'"),
    ("unknown version", lambda: mlp_request(version="9"), grpc.StatusCode.NOT_FOUND, "version '9'"),
    ("wrong datatype", lambda: build_request("mlp", {"x": GOOD_X.astype(np.float64)}),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'x': datatype FP64, expected FP32"),
    ("unknown datatype", lambda: _datatype(mlp_request(), "FP8"), grpc.StatusCode.INVALID_ARGUMENT, "FP8"),
    ("wrong shape", lambda: build_request("mlp", {"x": np.ones((2, MLP_IN + 1), np.float32)}),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'x': shape [17]"),
    ("wrong rank", lambda: build_request("mlp", {"x": np.ones(MLP_IN, np.float32)}),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'x'"),
    ("batch too large", lambda: build_request("mlp", {"x": np.ones((33, MLP_IN), np.float32)}),
     grpc.StatusCode.INVALID_ARGUMENT, "batch dimension of 1..32"),
    ("negative dim", lambda: _shape(mlp_request(), [2, -16]), grpc.StatusCode.INVALID_ARGUMENT, "input 'x'"),
    ("raw length mismatch", lambda: with_raw(mlp_request(), [b"\x00" * 60]),
     grpc.StatusCode.INVALID_ARGUMENT, "tensor 'x': 60 raw bytes, expected 128"),
    ("shape/element count mismatch", lambda: _shape(mlp_request(), [3, MLP_IN]),
     grpc.StatusCode.INVALID_ARGUMENT, "expected 192"),
    ("raw count mismatch", lambda: with_raw(mlp_request(), [GOOD_X.tobytes(), b""]),
     grpc.StatusCode.INVALID_ARGUMENT, "2 raw_input_contents for 1 inputs"),
    ("missing input", lambda: build_request("mlp", {}), grpc.StatusCode.INVALID_ARGUMENT, "missing input(s) 'x'"),
    ("extra input", lambda: build_request("mlp", {"x": GOOD_X, "z": GOOD_X}),
     grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'z'"),
    ("duplicate input", lambda: _duplicate(),
     grpc.StatusCode.INVALID_ARGUMENT, "given twice"),
    ("non-finite", _nan, grpc.StatusCode.INVALID_ARGUMENT, "input 'x': contains NaN or Inf"),
    ("unknown output", lambda: mlp_request(outputs=["logits"]), grpc.StatusCode.INVALID_ARGUMENT, "'logits'"),
    ("typed contents count", lambda: _typed([1.0] * 5, [1, MLP_IN]), grpc.StatusCode.INVALID_ARGUMENT,
     "5 values in fp32_contents, expected 16"),
    ("truncated BYTES", lambda: _bytes_request(b"\x05\x00\x00\x00ab"), grpc.StatusCode.INVALID_ARGUMENT,
     "claims 5 bytes"),
    ("BYTES not UTF-8 for a string tensor", lambda: _bytes_request(_strings([b"\xff"] * 6)),
     grpc.StatusCode.INVALID_ARGUMENT, "not UTF-8"),
    ("sequence_id of wrong type", lambda: _with_param(mlp_request(), "sequence_id", pb.InferParameter(bool_param=True)),
     grpc.StatusCode.INVALID_ARGUMENT, "'sequence_id' must be an integer or a string"),
    ("stateful model without sequence_id", lambda: build_request("counter", {"x": np.ones(4)}),
     grpc.StatusCode.INVALID_ARGUMENT, "set the 'sequence_id' parameter"),
    ("bad model name", lambda: build_request("../etc", {"x": GOOD_X}), grpc.StatusCode.NOT_FOUND, "'../etc'"),
]


def _duplicate():
    request = mlp_request()
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    return request


def _strings(items):
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


def _bytes_request(raw_bytes_tensor):
    """A request to the "types" model whose BYTES input carries `raw_bytes_tensor`."""
    from models import TYPES
    arrays = {f"in_{n.lower()}": (np.zeros((2, 3), d) if d is not object else np.full((2, 3), b"ok", dtype=object))
              for n, _, d in TYPES}
    request = build_request("types", arrays)
    index = [t.name for t in request.inputs].index("in_bytes")
    request.raw_input_contents[index] = raw_bytes_tensor
    return request


def _with_param(request, key, param):
    request.parameters[key].CopyFrom(param)
    return request


@pytest.mark.parametrize("name,make,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_request_then_good_one(client, name, make, code, fragment):
    with pytest.raises(grpc.RpcError) as err:
        client.call("ModelInfer", make())
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()
    np.testing.assert_array_equal(client.infer("mlp", {"x": GOOD_X})["y"].shape, (2, 4))


def test_typed_contents_are_accepted(client):
    x = np.arange(MLP_IN, dtype=np.float32).reshape(1, MLP_IN)
    via_contents = client.call("ModelInfer", _typed(x.ravel().tolist(), [1, MLP_IN]))
    assert np.frombuffer(via_contents.raw_output_contents[0], np.float32).tolist() == \
        client.infer("mlp", {"x": x})["y"].ravel().tolist()


def test_stream_reports_errors_in_band_and_continues(client):
    requests = [build_request("nope", {"x": GOOD_X}), mlp_request(request_id="ok")]
    replies = list(client.stream(iter(requests)))
    assert "'nope'" in replies[0].error_message
    assert replies[1].infer_response.id == "ok" and not replies[1].error_message
