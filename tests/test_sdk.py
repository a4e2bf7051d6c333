"""The app SDK (edge_runtime.client.sdk) against real cloud-service processes: the examples run as
subprocesses; the typed errors come from real failures (unreachable port, bad input, unknown
model, token, a slow model or a hung server past the deadline, size limit); the asyncio client
agrees with the synchronous one; the stub recipe of docs/mobile.md produces stubs that reach
the server."""
import ast
import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_runtime.client import sdk
from edge_runtime.client.oip_client import OipClient, build_request, decode_response   # the project's import path
from models import MLP_IN, MLP_OUT, TYPES
from server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sdk-token-for-tests"
X = np.ones((2, MLP_IN), np.float32)
CODE = grpc.StatusCode

# name -> (a call on a sync or async client, the typed error it must raise, the status code)
FAILURES = {
    "wrong input name": (lambda c: c.infer("mlp", {"x_typo": X}), sdk.InvalidInput, CODE.INVALID_ARGUMENT),
    "wrong shape": (lambda c: c.infer("mlp", {"x": np.ones((2, MLP_IN + 1), np.float32)}), sdk.InvalidInput,
                    CODE.INVALID_ARGUMENT),
    "wrong datatype": (lambda c: c.infer("mlp", {"x": X.astype(np.int64)}), sdk.InvalidInput, CODE.INVALID_ARGUMENT),
    "not an array": (lambda c: c.infer("mlp", {"x": np.array([object()])}), sdk.InvalidInput, CODE.INVALID_ARGUMENT),
    "unknown model": (lambda c: c.infer("no_such_model", {"x": X}), sdk.NotFound, CODE.NOT_FOUND),
    "unknown model metadata": (lambda c: c.metadata("no_such_model"), sdk.NotFound, CODE.NOT_FOUND),
    "past its deadline": (lambda c: c.infer("slow", {"x": np.array([0.5], np.float32)}, timeout_s=0.1),
                          sdk.DeadlineExceeded, CODE.DEADLINE_EXCEEDED),   # the model sleeps 0.5 s
}


@pytest.fixture(scope="module")
def client(server):
    with sdk.connect(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdk") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def auth_server(repository, token_file):
    proc = ServerProcess(repository, "--token-file", str(token_file))
    yield proc
    proc.kill()


def example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def seeded_x(seed: int) -> np.ndarray:
    """What the examples send for seed `seed` to mlp (input shape (-1, 16) -> (1, 16))."""
    return np.random.default_rng(seed).standard_normal((1, MLP_IN)).astype(np.float32)


def parse_output(line: str) -> tuple[str, str, list, np.ndarray]:
    """`y float32 [1, 4] [[...]]` -> (name, dtype, shape, values)."""
    name, dtype, rest = line.split(" ", 2)
    shape, values = rest.split("] ", 1)
    return name, dtype, ast.literal_eval(shape + "]"), np.array(ast.literal_eval(values), np.float32)


# --- examples ----------------------------------------------------------------------------------

def test_infer_example_prints_what_the_client_computes(server, client):
    run = example("infer.py", "--target", server.address)
    assert run.returncode == 0, run.stderr
    name, dtype, shape, values = parse_output(run.stdout.strip())
    assert (name, dtype, shape) == ("y", "float32", [1, MLP_OUT])
    np.testing.assert_array_equal(values, client.infer("mlp", {"x": seeded_x(0)})["y"])


def test_infer_example_fills_a_bytes_input_with_the_text(server):
    run = example("infer.py", "--target", server.address, "--model", "types", "--text", "to be")
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert set(lines) == {f"out_{name.lower()}" for name, _, _ in TYPES}
    assert lines["out_bytes"] == "object [2, 3] " + str([[b"to be"] * 3] * 2)


def test_infer_async_example_sends_concurrent_requests(server, client):
    run = example("infer_async.py", "--target", server.address, "--requests", "5")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 6 and re.fullmatch(r"5 concurrent requests in [\d.]+ ms", lines[-1]), run.stdout
    for i, line in enumerate(lines[:5]):
        prefix = f"request {i}: "
        assert line.startswith(prefix)
        name, dtype, shape, values = parse_output(line[len(prefix):])
        assert (name, dtype, shape) == ("y", "float32", [1, MLP_OUT])
        np.testing.assert_allclose(values, client.infer("mlp", {"x": seeded_x(i)})["y"], rtol=1e-6)


def _outcomes(stdout: str) -> dict[str, str]:
    """`what: ErrorClass -> ...` lines -> {what: ErrorClass or ok}."""
    return {what: rest.split()[0] for what, rest in (line.split(": ", 1) for line in stdout.strip().splitlines())}


def test_errors_example_shows_each_typed_error(server):
    run = example("errors.py", "--target", server.address, "--unreachable", f"127.0.0.1:{free_port()}")
    assert run.returncode == 0, run.stderr
    assert _outcomes(run.stdout) == {
        "right request": "ok", "wrong input name": "InvalidInput", "wrong shape": "InvalidInput",
        "not an array": "InvalidInput", "unknown model": "NotFound",
        "wrong token": "ok",                 # this server checks no token
        "unreachable server": "Unavailable", "hung server": "DeadlineExceeded"}, run.stdout
    assert "x_typo" in run.stdout and "on-device answer" in run.stdout


def test_examples_with_a_token_server(auth_server, token_file):
    refused = example("infer.py", "--target", auth_server.address)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    run = example("infer.py", "--target", auth_server.address, "--token-file", str(token_file))
    assert run.returncode == 0, run.stderr
    assert parse_output(run.stdout.strip())[:3] == ("y", "float32", [1, MLP_OUT])
    run = example("errors.py", "--target", auth_server.address, "--token-file", str(token_file))
    outcomes = _outcomes(run.stdout)
    assert outcomes["right request"] == "ok" and outcomes["wrong token"] == "Unauthenticated", run.stdout


# --- typed errors, synchronous client ----------------------------------------------------------

@pytest.mark.parametrize("case", list(FAILURES))
def test_real_failures_raise_typed_errors(client, case):
    call, kind, code = FAILURES[case]
    with pytest.raises(kind) as err:
        call(client)
    assert isinstance(err.value, grpc.RpcError)                  # `except grpc.RpcError` code keeps working
    assert err.value.code() == code and err.value.details()
    assert client.infer("mlp", {"x": X})["y"].shape == (2, MLP_OUT)


def test_unreachable_server_is_unavailable():
    with sdk.connect(f"127.0.0.1:{free_port()}", timeout_s=5) as offline:
        for call in (offline.live, offline.ready, lambda: offline.infer("mlp", {"x": X})):
            with pytest.raises(sdk.Unavailable) as err:
                call()
            assert err.value.code() == CODE.UNAVAILABLE and isinstance(err.value.cause, grpc.RpcError)
            assert str(err.value).startswith("UNAVAILABLE: ")


def test_hung_server_is_deadline_exceeded():
    with socket.create_server(("127.0.0.1", 0)) as hung:      # accepts connections, never answers
        with sdk.connect(f"127.0.0.1:{hung.getsockname()[1]}", timeout_s=0.3) as stuck:
            with pytest.raises(sdk.DeadlineExceeded) as err:
                stuck.infer("mlp", {"x": X})
    assert err.value.code() == CODE.DEADLINE_EXCEEDED


def test_bad_local_input_is_refused_before_sending():
    """Nothing listens at the target: InvalidInput (not Unavailable) shows the client refused it."""
    bad_inputs = [({"x": np.array([object()])}, "input 'x'"),
                  ({"x": np.array([1, "one"], dtype=object)}, "input 'x': element 0 is int"),
                  ({"x": np.array([1 + 2j])}, "input 'x'"),
                  ({"x": [[1.0], [2.0, 3.0]]}, "input 'x'"),
                  ({"": X}, "input name ''"),
                  ([X], "inputs: expected a dict")]
    with sdk.connect(f"127.0.0.1:{free_port()}", timeout_s=5) as offline:
        for inputs, fragment in bad_inputs:
            with pytest.raises(sdk.InvalidInput) as err:
                offline.infer("mlp", inputs)
            assert fragment in err.value.details() and err.value.cause is None
            assert isinstance(err.value, ValueError) and err.value.code() == CODE.INVALID_ARGUMENT


def test_message_over_the_size_limit_is_resource_exhausted(server):
    with sdk.Client(server.address, max_message_bytes=1000) as small:
        with pytest.raises(sdk.ResourceExhausted) as err:
            small.infer("mlp", {"x": np.ones((100, MLP_IN), np.float32)})
    assert err.value.code() == CODE.RESOURCE_EXHAUSTED


def test_token_server(auth_server, token_file):
    for token in (None, "wrong", TOKEN + "x"):
        with sdk.connect(auth_server.address, token=token) as c:
            for call in (lambda: c.infer("mlp", {"x": X}), lambda: c.metadata("mlp"),
                         lambda: list(c.stream(iter([build_request("mlp", {"x": X})])))):
                with pytest.raises(sdk.Unauthenticated) as err:
                    call()
                assert err.value.code() == CODE.UNAUTHENTICATED
    with sdk.connect(auth_server.address, token_file=token_file) as c:
        assert c.infer("mlp", {"x": X})["y"].shape == (2, MLP_OUT)
    with sdk.connect(auth_server.address, token=TOKEN) as c:
        assert c.live()


def test_connect_refuses_conflicting_or_empty_credentials(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        sdk.connect("127.0.0.1:1", token="a", token_file=tmp_path / "t")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        sdk.connect("127.0.0.1:1", token_file=tmp_path / "empty")
    with pytest.raises(OSError):
        sdk.connect("127.0.0.1:1", tls_ca=tmp_path / "missing.pem")


def test_from_rpc_error_maps_every_status_code():
    class Failed(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "why"

    expected = {CODE.INVALID_ARGUMENT: sdk.InvalidInput, CODE.OUT_OF_RANGE: sdk.InvalidInput,
                CODE.UNAUTHENTICATED: sdk.Unauthenticated, CODE.PERMISSION_DENIED: sdk.Unauthenticated,
                CODE.UNAVAILABLE: sdk.Unavailable, CODE.DEADLINE_EXCEEDED: sdk.DeadlineExceeded,
                CODE.NOT_FOUND: sdk.NotFound, CODE.RESOURCE_EXHAUSTED: sdk.ResourceExhausted,
                CODE.FAILED_PRECONDITION: sdk.FailedPrecondition}
    for code in CODE:
        if code is CODE.OK:
            continue
        err = sdk.from_rpc_error(Failed(code))
        assert type(err) is expected.get(code, sdk.ServerError), code
        assert (err.code(), err.details()) == (code, "why") and isinstance(err, sdk.EdgefoldError)
        assert sdk.from_rpc_error(err) is err


# --- metadata, model_ready, streaming ---------------------------------------------------------

def test_metadata_and_model_ready(client):
    md = client.metadata("mlp")
    assert md == sdk.ModelMetadata("mlp", ("1",), "onnxruntime_onnx",
                                   (sdk.TensorSpec("x", "FP32", (-1, MLP_IN)),),
                                   (sdk.TensorSpec("y", "FP32", (-1, MLP_OUT)),))
    assert client.metadata("versioned").versions == ("1", "2")
    assert client.model_ready("mlp") and client.model_ready("versioned", "2")
    assert not client.model_ready("no_such_model") and not client.model_ready("versioned", "3")


def test_stream_reports_bad_requests_in_band(client):
    replies = list(client.stream(iter([build_request("no_such_model", {"x": X}),
                                       build_request("mlp", {"x": X}, request_id="ok")])))
    assert "no_such_model" in replies[0].error_message
    assert replies[1].infer_response.id == "ok"
    np.testing.assert_array_equal(decode_response(replies[1].infer_response)["y"], client.infer("mlp", {"x": X})["y"])


# --- the asyncio client -----------------------------------------------------------------------

async def _outcome(awaitable):
    try:
        await awaitable
        return "ok"
    except sdk.EdgefoldError as err:
        return type(err), err.code()


def test_async_client_agrees_with_the_sync_one(server, client):
    xs = [seeded_x(i) for i in range(4)]

    async def main():
        async with sdk.connect_async(server.address) as c:
            assert await c.live() and await c.ready()
            meta = await c.metadata("mlp")
            ready = (await c.model_ready("mlp"), await c.model_ready("no_such_model"))
            outputs = await asyncio.gather(*(c.infer("mlp", {"x": x}) for x in xs))
            requests = [build_request("no_such_model", {"x": X}), build_request("mlp", {"x": xs[0]}, request_id="ok")]
            replies = [r async for r in c.stream(requests)]
            return meta, ready, outputs, replies

    meta, ready, outputs, replies = asyncio.run(main())
    assert meta == client.metadata("mlp") and ready == (True, False)
    for x, out in zip(xs, outputs):
        np.testing.assert_array_equal(out["y"], client.infer("mlp", {"x": x})["y"])
    assert "no_such_model" in replies[0].error_message and replies[1].infer_response.id == "ok"
    np.testing.assert_array_equal(decode_response(replies[1].infer_response)["y"], outputs[0]["y"])


def test_async_client_raises_the_same_typed_errors(server, auth_server, token_file):
    async def main():
        async with sdk.connect_async(server.address) as c:
            found = {case: await _outcome(call(c)) for case, (call, _, _) in FAILURES.items()}
        async with sdk.connect_async(f"127.0.0.1:{free_port()}", timeout_s=5) as c:
            found["unreachable"] = await _outcome(c.live())
        with socket.create_server(("127.0.0.1", 0)) as hung:
            async with sdk.connect_async(f"127.0.0.1:{hung.getsockname()[1]}", timeout_s=0.3) as c:
                found["hung"] = await _outcome(c.infer("mlp", {"x": X}))
        async with sdk.connect_async(auth_server.address, token="wrong") as c:
            found["wrong token"] = await _outcome(c.infer("mlp", {"x": X}))
            found["wrong token, stream"] = await _outcome(_drain(c.stream([build_request("mlp", {"x": X})])))
        async with sdk.connect_async(auth_server.address, token_file=token_file) as c:
            found["right token"] = await _outcome(c.infer("mlp", {"x": X}))
        return found

    found = asyncio.run(main())
    expected = {case: (kind, code) for case, (_, kind, code) in FAILURES.items()}
    expected.update({"unreachable": (sdk.Unavailable, CODE.UNAVAILABLE),
                     "hung": (sdk.DeadlineExceeded, CODE.DEADLINE_EXCEEDED),
                     "wrong token": (sdk.Unauthenticated, CODE.UNAUTHENTICATED),
                     "wrong token, stream": (sdk.Unauthenticated, CODE.UNAUTHENTICATED),
                     "right token": "ok"})
    assert found == expected


async def _drain(stream):
    return [reply async for reply in stream]


# --- TLS, and the mobile doc's stub recipe ------------------------------------------------------

def test_tls_ca_as_a_path_or_bytes(repository, tmp_path):
    from test_security import _self_signed
    cert_pem = _self_signed(tmp_path)
    proc = ServerProcess(repository, "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    try:
        for ca in (tmp_path / "cert.pem", str(tmp_path / "cert.pem"), cert_pem):
            with sdk.connect(proc.address, tls_ca=ca) as c:
                assert c.infer("mlp", {"x": X})["y"].shape == (2, MLP_OUT)

        async def over_tls():
            async with sdk.connect_async(proc.address, tls_ca=cert_pem) as c:
                return await c.infer("mlp", {"x": X})
        assert asyncio.run(over_tls())["y"].shape == (2, MLP_OUT)
        with sdk.connect(proc.address, timeout_s=3) as plaintext:
            with pytest.raises(sdk.Unavailable):
                plaintext.live()
    finally:
        proc.kill()


def test_mobile_doc_stub_recipe_reaches_the_server(server, client, tmp_path):
    """Run the doc's own sed and printf lines, generate (Python) stubs from the copy with protoc,
    and call ModelInfer through them in a fresh process (their `inference` package would clash
    with tritonclient's in this one)."""
    doc = (ROOT / "docs" / "mobile.md").read_text()
    sed = "sed 's/^package edgefold\\.inference;/package inference;/' proto/oip.proto > app/src/main/proto/oip.proto"
    printf = "printf 'option java_multiple_files = true;\\n' >> app/src/main/proto/oip.proto"
    assert sed in doc and printf in doc
    (tmp_path / "app/src/main/proto").mkdir(parents=True)
    (tmp_path / "proto").symlink_to(ROOT / "proto")
    subprocess.run(f"{sed} && {printf}", shell=True, check=True, cwd=tmp_path, timeout=30)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iapp/src/main/proto", "--python_out=.",
                    "--grpc_python_out=.", "oip.proto"], check=True, cwd=tmp_path, timeout=60)
    script = (
        "import sys, grpc, numpy as np, oip_pb2 as pb, oip_pb2_grpc as rpc\n"
        "x = np.ones((1, 16), np.float32)\n"
        "tensor = pb.ModelInferRequest.InferInputTensor(name='x', datatype='FP32', shape=[1, 16])\n"
        "request = pb.ModelInferRequest(model_name='mlp', inputs=[tensor],\n"
        "                               raw_input_contents=[x.astype('<f4').tobytes()])\n"
        "with grpc.insecure_channel(sys.argv[1]) as channel:\n"
        "    reply = rpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)\n"
        "print(np.frombuffer(reply.raw_output_contents[0], '<f4').tolist())\n")
    run = subprocess.run([sys.executable, "-c", script, server.address], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    want = client.infer("mlp", {"x": np.ones((1, MLP_IN), np.float32)})["y"]
    np.testing.assert_array_equal(np.array(ast.literal_eval(run.stdout), np.float32), want.ravel())
    assert isinstance(client, OipClient)          # sdk.Client is the project's synchronous client
