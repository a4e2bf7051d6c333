"""The collaborative LLM's cloud continuation hosted by MLServer (issue 17, item 2): the custom
runtime cloud_service.mlserver_runtime, over the same llm_continuation backend, in a real MLServer
1.7.1 (its own venv, installed on first use by scripts/mlserver_venv.py), checked against the real
cloud-service on the tiny random Llama of tests/llm_models.py (exit head after layer 2 of 4): the
same tokens, sources and cloud work over the int8, fp16 and fp32 wires and cloud-only; a session
MLServer does not hold (a restart mid-conversation, a sequence it never saw) is FAILED_PRECONDITION
and the device resyncs to the same tokens; malformed requests are INVALID_ARGUMENT with
cloud-service's own messages, and the session survives them. One MLServer serves the module."""
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_runtime.client.oip_client import OipClient
from edge_runtime.collab.device import CollabLlm
from llm_models import K, make_model, write_model
from loadgen import free_port
import mlserver_venv
from server_process import ServerProcess

PROMPT = [5, 17, 3, 42, 8, 11]
N_NEW = 12
C = 64                                   # the tiny model's hidden size
FP16_INPUT = '[[input]]\nname = "hidden_states"\ndata_type = "TYPE_FP16"\ndims = [-1, 64]\n'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ee_lm")
    make_model(path)
    return path


@pytest.fixture(scope="module")
def cloud(model_dir, tmp_path_factory):
    """cloud-service serving the continuation (k = K), the whole model (llm_full) and an fp16 wire."""
    repo = tmp_path_factory.mktemp("llm_repo")
    write_model(repo, "llm", model_dir, K)
    write_model(repo, "llm_full", model_dir, 0)
    write_model(repo, "llm_fp16", model_dir, K, extra=FP16_INPUT)
    proc = ServerProcess(repo)
    yield proc
    proc.kill()


class MLServer:
    """`mlserver start ROOT` on a fixed port, which can be stopped and started again (a restart)."""

    def __init__(self, root: Path, cmd: list, env: dict, port: int, models: list[str]):
        self.root, self.cmd, self.env, self.models = root, cmd, env, models
        self.address = f"127.0.0.1:{port}"
        self.proc = None
        self.start()

    def start(self) -> None:
        with open(self.root / "mlserver.log", "a") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        with OipClient(self.address, timeout_s=2.0) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if all(client.model_ready(m) for m in self.models):
                        return
                except grpc.RpcError:   # not listening yet
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("MLServer did not start: " + (self.root / "mlserver.log").read_text()[-3000:])
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def mlserver(model_dir, tmp_path_factory):
    if why := mlserver_venv.ensure(log=lambda m: None):
        pytest.skip(f"no MLServer to host the LLM continuation: {why}")
    root, port = tmp_path_factory.mktemp("mlserver"), free_port()
    common = {"checkpoint": str(model_dir), "top_k": 3, "catch_up": "exact",
              "max_sequence_idle_microseconds": 600_000_000, "max_state_bytes": 64 << 20}
    models = {"llm": {**common, "first_layer": K}, "llm_full": {**common, "first_layer": 0},
              "llm_fp16": {**common, "first_layer": K}}
    fp16 = {"llm_fp16": {"inputs": [{"name": "hidden_states", "datatype": "FP16", "shape": [-1, C]}]}}
    cmd, env = mlserver_venv.llm_repository(root, models, port, settings=fp16)
    server = MLServer(root, cmd, env, port, list(models))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def threshold(model_dir):
    """The median exit-head confidence: about half the tokens are decided on the device."""
    return float(np.median(CollabLlm(model_dir, mode="standalone").generate(PROMPT, N_NEW).confidences))


def cloud_work(r):
    c = r.counters
    return (c.requests, c.states_sent, c.bytes_sent, c.resends, c.cloud_layer_evals, c.cloud_kv_evals)


@pytest.mark.parametrize("wire, model", [("int8", "llm"), ("fp32", "llm"), ("fp16", "llm_fp16")])
def test_collaborative_generation_matches_cloud_service(model_dir, cloud, mlserver, threshold, wire, model):
    ours, theirs = (CollabLlm(model_dir, cloud=address, threshold=threshold, wire=wire, cloud_model=model)
                    .generate(PROMPT, N_NEW) for address in (cloud.address, mlserver.address))
    assert {"edge", "cloud"} <= set(ours.sources) and not ours.degraded
    assert (theirs.tokens, theirs.sources) == (ours.tokens, ours.sources) and not theirs.degraded
    assert cloud_work(theirs) == cloud_work(ours)


def test_cloud_only_matches_cloud_service(model_dir, cloud, mlserver):
    ours, theirs = (CollabLlm(model_dir, mode="cloud-only", cloud=address).generate(PROMPT, N_NEW)
                    for address in (cloud.address, mlserver.address))
    assert theirs.tokens == ours.tokens and set(theirs.sources) == {"cloud"}
    assert cloud_work(theirs) == cloud_work(ours)


def test_a_restarted_mlserver_fails_the_precondition_and_the_device_resyncs(model_dir, cloud, mlserver):
    want = CollabLlm(model_dir, cloud=cloud.address, threshold=1.0).generate(PROMPT, N_NEW)   # int8 wire
    e = CollabLlm(model_dir, cloud=mlserver.address, threshold=1.0, timeout_s=10.0)

    def restart(step, token, source):
        if step == 4:   # MLServer loses every session; the device's next request is not a sequence_start
            mlserver.stop()
            mlserver.start()
            grpc.channel_ready_future(e.client.channel).result(timeout=30)

    r = e.generate(PROMPT, N_NEW, on_token=restart)
    assert r.tokens == want.tokens and r.sources == ["cloud"] * N_NEW and not r.degraded
    assert r.counters.resends == 1 and r.counters.recomputed_states > 0


def call(client, sequence_id, h, start, exited, begin=False, params=None):
    return client.infer("llm", {"hidden_states": h, "start": np.array([start], np.int64),
                                "exited": np.array(exited, np.uint8)},
                        parameters={"sequence_id": sequence_id, **({"sequence_start": True} if begin else {})},
                        input_parameters=params)


def refusal(client, *args, **kw) -> tuple:
    with pytest.raises(grpc.RpcError) as err:
        call(client, *args, **kw)
    return err.value.code(), err.value.details()


def test_a_sequence_mlserver_never_saw_is_failed_precondition(mlserver):
    with OipClient(mlserver.address) as client:
        code, details = refusal(client, 4242, np.zeros((1, C), np.float32), 0, [0])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == "sequence 4242 is unknown (never started, or ended); resend its context with sequence_start=true"


def test_malformed_requests_are_invalid_argument_with_cloud_services_messages(cloud, mlserver):
    bad_scales = {"hidden_states": {"codec": "int8", "scale": "1,2", "zero_point": "0,0", "axis": 0}}
    cases = [
        (np.zeros((1, C), np.float32), 5, [0], None),                  # skips positions 3, 4
        (np.full((1, C), np.nan, np.float32), 3, [0], None),           # NaN
        (np.zeros((1, C), np.uint8), 3, [0], bad_scales),              # an int8 row with two scales
        (np.zeros((1, C + 1), np.float32), 3, [0], None),              # the wrong hidden size
    ]
    details = {}
    for address in (cloud.address, mlserver.address):
        with OipClient(address) as client:
            assert call(client, 777, np.zeros((3, C), np.float32), 0, [0, 0, 0], begin=True)["work"][4] == 3
            refusals = [refusal(client, 777, h, start, exited, params=params) for h, start, exited, params in cases]
            assert {code for code, _ in refusals} == {grpc.StatusCode.INVALID_ARGUMENT}, refusals
            details[address] = [message for _, message in refusals]
            after = call(client, 777, np.zeros((1, C), np.float32), 3, [0])   # the session is intact
            assert after["work"][3] == 4 and after["work"][4] == 4
    assert details[mlserver.address] == details[cloud.address]
    assert details[mlserver.address][:2] == [
        "input 'start': first position is 5, expected 3 (this session holds positions 0..2; send only the ones "
        "it has not seen)",
        "input 'hidden_states': contains NaN or Inf, which this model does not accept"]
