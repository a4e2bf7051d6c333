"""Cloud streaming generation (`--mode cloud-stream`, issue 21 item 1): the cloud's full model
generates the whole answer (backend llm_stream, a decoupled model) and streams a token per
response over ModelStreamInfer; concurrent streams are batched step by step. Against a real
cloud-service subprocess, on the tiny random Llama of llm_models.py; every token is compared with
split.llama.generate on the same checkpoint here."""
import json
import queue
import socket
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from cloud_service.config import ConfigError
from cloud_service.repository import Repository
from edge_runtime.cli import main as edge_runtime_main
from edge_runtime.client.errors import DeadlineExceeded, ServerError
from edge_runtime.client.oip_client import OipClient, build_request
from edge_runtime.collab.device import CollabLlm
from edge_runtime.collab.stream import CloudStream, request_parameters
from edgefold_proto import pb
from llm_models import make_model, write_model
from server_process import ServerProcess
from split.llama import Sampling, Stop, generate, load_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [5, 17, 3, 42, 8, 11]
EOS_PROMPT = [60, 61, 62, 63, 64, 65, 66, 67, 68]   # its greedy answer reaches the checkpoint's EOS (2)
N_NEW = 12


def write_stream_model(repo, name, model_dir, **params):
    d = repo / name
    (d / "1").mkdir(parents=True)
    params.setdefault("intra_op_thread_count", 1)   # the machine is shared: no spinning thread pools
    extra = "".join(f"{key} = {value}\n" for key, value in params.items())
    (d / "config.toml").write_text(f'backend = "llm_stream"\n[model_transaction_policy]\ndecoupled = true\n'
                                   f'[parameters]\ncheckpoint = "{model_dir}"\n{extra}')


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("lm")
    make_model(model_dir)
    repo = tmp_path_factory.mktemp("stream_repo")
    write_model(repo, "llm_full", model_dir, 0)
    write_stream_model(repo, "llm_stream", model_dir, gather_microseconds=5000)
    write_stream_model(repo, "llm_stream_one", model_dir, max_streams=1)
    write_stream_model(repo, "llm_stream_4rows", model_dir, max_batch_rows=4)
    proc = ServerProcess(repo)
    yield model_dir, proc
    proc.kill()


@pytest.fixture(scope="module")
def full(cloud):
    return load_llama(cloud[0])


def local(model, prompt, n, sampling=None, stop_sequences=()):
    with torch.no_grad():
        return list(generate(model, prompt, n, sampling, Stop.of(model.config, stop_sequences)))


def stream(cloud, prompt, n, sampling=None, stop=(), model="llm_stream", timeout_s=10.0):
    with CloudStream(cloud[1].address, model, timeout_s) as c:
        return c.generate(prompt, n, sampling, stop)


def raw_replies(cloud, requests, timeout_s=20.0):
    """Every ModelStreamInferResponse of a stream that sends `requests` and then closes its side."""
    with OipClient(cloud[1].address) as client:
        return list(client.stream(iter(requests), timeout_s=timeout_s))


def final_flags(replies):
    return [r.infer_response.parameters["triton_final_response"].bool_param for r in replies]


def test_greedy_equals_local_generation_and_cloud_only(cloud, full):
    want = local(full, PROMPT, N_NEW)
    r = stream(cloud, PROMPT, N_NEW)
    assert r.tokens == want and r.finish_reason == "length" and set(r.sources) == {"cloud"}
    assert r.round_trips == 1 and r.bytes_sent > 8 * len(PROMPT) and r.bytes_received > 8 * N_NEW
    assert len(r.seconds_per_token) == N_NEW and r.time_to_first_token_s > 0
    assert r.cloud_layer_evals == (len(PROMPT) + N_NEW - 1) * full.config.num_hidden_layers
    per_token = CollabLlm(cloud[0], mode="cloud-only", cloud=cloud[1].address).generate(
        PROMPT, N_NEW, stop=Stop.of(full.config))
    assert per_token.tokens == want


def test_eos_and_stop_sequences_end_the_stream(cloud, full):
    want = local(full, EOS_PROMPT, 30)
    assert want[-1] == 2 and len(want) < 30            # the checkpoint's EOS stops it
    replies = raw_replies(cloud, [build_request("llm_stream", {"input_ids": np.array(EOS_PROMPT, np.int64)},
                                                parameters={"max_tokens": 30})])
    tokens = [int(np.frombuffer(r.infer_response.raw_output_contents[0], np.int64)[0]) for r in replies]
    assert tokens == want
    assert final_flags(replies) == [False] * (len(want) - 1) + [True]
    last = replies[-1].infer_response.parameters
    assert last["finish_reason"].string_param == "stop" and last["completion_tokens"].int64_param == len(want)

    greedy = local(full, PROMPT, N_NEW)
    seq = greedy[4:6]
    want = local(full, PROMPT, N_NEW, stop_sequences=[seq])
    assert want[-2:] == seq and len(want) < N_NEW
    r = stream(cloud, PROMPT, N_NEW, stop=[seq])
    assert r.tokens == want and r.finish_reason == "stop"
    # ignore_eos: the answer runs past the EOS to max_tokens
    replies = raw_replies(cloud, [build_request("llm_stream", {"input_ids": np.array(EOS_PROMPT, np.int64)},
                                                parameters={"max_tokens": 12, "ignore_eos": True})])
    assert len(replies) == 12 and final_flags(replies)[-1]


def test_sampling_with_a_seed_is_reproducible_and_equals_local(cloud, full):
    s = Sampling(temperature=0.9, top_k=30, top_p=0.9, seed=7, repetition_penalty=1.2)
    a, b = stream(cloud, PROMPT, N_NEW, s), stream(cloud, PROMPT, N_NEW, s)
    assert a.tokens == b.tokens == local(full, PROMPT, N_NEW, s)
    other = stream(cloud, PROMPT, N_NEW, Sampling(temperature=0.9, top_k=30, top_p=0.9, seed=8))
    assert other.tokens == local(full, PROMPT, N_NEW, Sampling(temperature=0.9, top_k=30, top_p=0.9, seed=8))
    assert other.tokens != a.tokens


@pytest.mark.parametrize("empty_final", [True, False])
def test_tritonclient_stream_api(cloud, full, empty_final):
    want = local(full, PROMPT, N_NEW)
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(cloud[1].address) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=30)
        try:
            inp = grpcclient.InferInput("input_ids", [len(PROMPT)], "INT64")
            inp.set_data_from_numpy(np.array(PROMPT, np.int64))
            client.async_stream_infer("llm_stream", [inp], request_id="r1", enable_empty_final_response=empty_final,
                                      parameters={"max_tokens": N_NEW})
            tokens, finals = [], []
            while not finals or not finals[-1]:
                result, error = results.get(timeout=20)
                assert error is None, error
                response = result.get_response()
                assert response.id == "r1"
                finals.append(response.parameters["triton_final_response"].bool_param)
                if response.outputs:
                    tokens.append(int(result.as_numpy("token")[0]))
            assert response.parameters["finish_reason"].string_param == "length"
        finally:
            client.stop_stream()
        stats = client.get_inference_statistics("llm_stream").model_stats[0]
    assert tokens == want
    assert len(finals) == N_NEW + empty_final and finals[-1] and not any(finals[:-1])
    if empty_final:
        assert not response.outputs       # the flags-only response Triton sends for a decoupled model
    assert stats.inference_stats.success.count >= 1 and stats.execution_count >= N_NEW


def test_concurrent_streams_are_batched_and_each_equals_its_solo_run(cloud, full):
    jobs = [(PROMPT, 20), (EOS_PROMPT, 25), ([7], 30), (list(range(30, 50)), 18), ([90, 3], 24), ([11] * 5, 28)]
    want = [local(full, p, n) for p, n in jobs]
    got: list = [None] * len(jobs)

    def run(i):
        time.sleep(0.01 * i)                 # join the running batch at different steps
        got[i] = stream(cloud, *jobs[i], timeout_s=20)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.tokens for r in got] == want
    assert max(max(r.batch_streams) for r in got) > 1, [r.batch_streams for r in got]
    with OipClient(cloud[1].address) as client:
        stats = client.call("ModelStatistics", pb.ModelStatisticsRequest(name="llm_stream")).model_stats[0]
    assert max(b.batch_size for b in stats.batch_stats) > 1


def test_requests_on_one_stream_run_side_by_side(cloud, full):
    prompts = {"a": PROMPT, "b": [9, 8, 7], "c": list(range(40, 60))}
    replies = raw_replies(cloud, [build_request("llm_stream", {"input_ids": np.array(p, np.int64)}, request_id=rid,
                                                parameters={"max_tokens": 16}) for rid, p in prompts.items()])
    for rid, prompt in prompts.items():
        mine = [r.infer_response for r in replies if r.infer_response.id == rid]
        assert [int(np.frombuffer(r.raw_output_contents[0], np.int64)[0]) for r in mine] == local(full, prompt, 16)
        assert mine[-1].parameters["triton_final_response"].bool_param
    assert max(r.infer_response.parameters["batch_streams"].int64_param for r in replies) > 1


def test_the_row_bound_defers_steps_to_the_next_forward(cloud, full):
    prompts = {"a": [3, 4], "b": [5], "c": [6, 7, 8], "d": list(range(10, 16)), "e": [1]}   # "d" alone is over 4
    replies = raw_replies(cloud, [build_request("llm_stream_4rows", {"input_ids": np.array(p, np.int64)},
                                                request_id=rid, parameters={"max_tokens": 10})
                                  for rid, p in prompts.items()])
    for rid, prompt in prompts.items():
        mine = [r.infer_response for r in replies if r.infer_response.id == rid]
        assert [int(np.frombuffer(r.raw_output_contents[0], np.int64)[0]) for r in mine] == local(full, prompt, 10)
    steps = [(r.infer_response.parameters["batch_streams"].int64_param,
              r.infer_response.parameters["batch_rows"].int64_param) for r in replies]
    assert all(rows <= 4 or streams == 1 for streams, rows in steps), steps
    assert max(streams for streams, _ in steps) > 1


def test_config_errors_name_the_field(cloud, tmp_path):
    write_stream_model(tmp_path, "coupled", cloud[0])
    (tmp_path / "coupled" / "config.toml").write_text(
        (tmp_path / "coupled" / "config.toml").read_text().replace("decoupled = true", "decoupled = false"))
    write_stream_model(tmp_path, "no_rows", cloud[0], max_batch_rows=0)
    repo = Repository(tmp_path)
    with pytest.raises(ConfigError, match="decoupled = true"):
        repo.build("coupled")
    with pytest.raises(ConfigError, match="max_batch_rows"):
        repo.build("no_rows")


def test_malformed_requests_fail_in_band_and_the_stream_goes_on(cloud, full):
    def request(rid, ids=PROMPT, **params):
        return build_request("llm_stream", {"input_ids": np.array(ids, np.int64)}, request_id=rid,
                             parameters={"max_tokens": 4, **params})
    bad = {"empty": request("empty", ids=[]), "vocab": request("vocab", ids=[5, 97]),
           "max_tokens": request("max_tokens", max_tokens=0), "too_long": request("too_long", max_tokens=251),
           "temperature": request("temperature", temperature=-1.0), "top_p": request("top_p", temperature=1.0, top_p=1.5),
           "stop": request("stop", stop="[[1, 2], []]"), "seed": request("seed", seed="x"),
           "kind": request("kind", max_tokens=2.5), "long": request("long", ids=[1] * 256)}
    replies = raw_replies(cloud, [*bad.values(), request("good")])
    errors = {r.infer_response.id: r.error_message for r in replies if r.error_message}
    assert set(errors) == set(bad)
    for word, rid in [("input_ids", "empty"), ("input_ids", "vocab"), ("max_tokens", "max_tokens"),
                      ("max_position_embeddings", "too_long"), ("temperature", "temperature"), ("top_p", "top_p"),
                      ("stop", "stop"), ("seed", "seed"), ("max_tokens", "kind"),
                      ("max_position_embeddings", "long")]:
        assert word in errors[rid], (rid, errors[rid])
    good = [r for r in replies if r.infer_response.id == "good" and not r.error_message]
    assert [int(np.frombuffer(r.infer_response.raw_output_contents[0], np.int64)[0]) for r in good] == \
        local(full, PROMPT, 4)
    with OipClient(cloud[1].address) as client:   # unary ModelInfer cannot carry a decoupled model's answer
        with pytest.raises(ServerError, match="ModelStreamInfer"):
            client.infer("llm_stream", {"input_ids": np.array(PROMPT, np.int64)})


def test_a_silent_stream_is_a_deadline_not_a_hang(cloud):
    with socket.socket() as silent:   # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            with CloudStream(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5) as c:
                c.generate(PROMPT, 4)
        assert time.monotonic() - t0 < 5
    # a real cloud whose only slot is busy: the second stream hears nothing within its deadline
    started = threading.Event()

    def hold_the_slot():
        with CloudStream(cloud[1].address, "llm_stream_one", 10) as c:
            c.generate([1], 250, on_token=lambda *_: started.set(), ignore_eos=True)

    busy = threading.Thread(target=hold_the_slot)
    busy.start()
    assert started.wait(10)
    with pytest.raises(DeadlineExceeded, match="no response"):
        stream(cloud, PROMPT, 4, model="llm_stream_one", timeout_s=0.1)
    busy.join(30)
    assert stream(cloud, PROMPT, 4, model="llm_stream_one").tokens   # the slot is free again


def test_a_client_that_leaves_stops_its_generation(cloud):
    class Leave(Exception):
        pass

    def leave(step, token, source):
        raise Leave

    def executions():
        with OipClient(cloud[1].address) as client:
            return client.call("ModelStatistics", pb.ModelStatisticsRequest(name="llm_stream_one")).model_stats[0] \
                .execution_count

    first = executions()
    with CloudStream(cloud[1].address, "llm_stream_one", 10) as c:
        with pytest.raises(Leave):
            c.generate([1], 250, on_token=leave, ignore_eos=True)
    time.sleep(0.3)
    before = executions()
    time.sleep(0.3)
    assert executions() == before < first + 250     # nothing runs for the stream that was left
    assert stream(cloud, PROMPT, 4, model="llm_stream_one", timeout_s=2).tokens   # and its slot is free


def test_cli_cloud_stream_json(cloud, full, capsys):
    rc = edge_runtime_main(["generate", "--model", str(cloud[0]), "--mode", "cloud-stream", "--cloud",
                            cloud[1].address, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                            str(N_NEW), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["tokens"] == local(full, PROMPT, N_NEW) and out["sources"] == ["cloud"] * N_NEW
    assert out["round_trips"] == 1 and out["bytes_sent"] > 0 and out["bytes_received"] > 0
    assert out["time_to_first_token_ms"] > 0 and out["ms_per_token"] > 0
    assert request_parameters(3, Sampling(), ())["max_tokens"] == 3
