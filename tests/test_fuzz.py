"""Throw random and mutated ModelInferRequest bytes at a real server; afterwards it must
still answer health and a good request. Every reply must be a gRPC status, never a hang."""
import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.client.oip_client import OipClient, build_request
from edgefold_proto import METHODS, pb
from edgefold_proto.tensors import DTYPES
from models import MLP_IN

SEED_REQUESTS = [
    build_request("mlp", {"x": np.ones((2, MLP_IN), np.float32)}).SerializeToString(),
    build_request("counter", {"x": np.ones(4)}, parameters={"sequence_id": 7, "sequence_start": True}).SerializeToString(),
    build_request("types", {"in_bytes": np.full((2, 3), b"abc", dtype=object)}).SerializeToString(),
]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def raw_infer(server):
    channel = grpc.insecure_channel(server.address)
    call = channel.unary_unary(METHODS["ModelInfer"].path)  # bytes in, bytes out

    def send(payload: bytes):
        try:
            call(payload, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            assert err.code() in ACCEPTABLE, (err.code(), err.details())
            return err.code()
    yield send
    channel.close()


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEED_REQUESTS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            data += data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def structured(draw):
    """Well-formed protobuf, nonsense contents: shapes, datatypes and raw lengths that disagree."""
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["mlp", "types", "counter", "versioned", ""])))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(st.sampled_from(["x", "in_bytes", "in_fp16", "y", ""])),
                                    datatype=draw(st.sampled_from([*DTYPES, "BF16", ""])))
        tensor.shape.extend(draw(st.lists(st.integers(-2, 1 << 40), max_size=4)))
        request.raw_input_contents.append(draw(st.binary(max_size=256)))
    if draw(st.booleans()):
        request.parameters["sequence_id"].int64_param = draw(st.integers(-5, 5))
    return request.SerializeToString()


@FUZZ
@given(payload=st.binary(max_size=512))
def test_random_bytes(raw_infer, payload):
    raw_infer(payload)


@FUZZ
@given(payload=mutated())
def test_mutated_requests(raw_infer, payload):
    raw_infer(payload)


@FUZZ
@given(payload=structured())
def test_structured_nonsense(raw_infer, payload):
    raw_infer(payload)


def test_still_serving_after_fuzzing(server):
    assert server.proc.poll() is None, server.output()
    with OipClient(server.address) as client:
        assert client.live() and client.ready()
        assert client.infer("mlp", {"x": np.ones((1, MLP_IN), np.float32)})["y"].shape == (1, 4)
