"""`--mode auto` (edge_runtime/collab/auto.py) against a real cloud-service subprocess: it measures
the link, the device and the cloud, runs the mode it predicts fastest with the full model's greedy
tokens, generates standalone (flagged degraded) when the cloud is unreachable, and loses or repeats
no token when the link is cut in the middle of a cloud stream."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_runtime.collab.auto import AutoLlm
from edge_runtime.collab.chooser import LOSSLESS
from edge_runtime.collab.device import CollabLlm
from llm_models import K, make_model, write_model
from server_process import ServerProcess
from split.llama import generate, load_llama
from test_cloud_stream import write_stream_model
from test_linkemu import LINKEMU, LISTENING

PROMPT = [5, 17, 3, 42, 8, 11]
N_NEW = 16


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ee_lm")
    make_model(model_dir)
    repo = tmp_path_factory.mktemp("llm_repo")
    write_model(repo, "llm", model_dir, K)
    write_model(repo, "llm_full", model_dir, 0)
    write_stream_model(repo, "llm_stream", model_dir)
    proc = ServerProcess(repo)
    yield model_dir, proc
    proc.kill()


@pytest.fixture(scope="module")
@torch.no_grad()
def ref(cloud):
    return list(generate(load_llama(cloud[0]), PROMPT, N_NEW))


def auto_for(model_dir, address, **kw):
    return AutoLlm(CollabLlm(model_dir, mode="speculative", cloud=address, timeout_s=2.0, backoff_s=0.2), **kw)


def test_auto_measures_and_runs_a_lossless_mode_with_the_full_models_tokens(cloud, ref):
    auto = auto_for(cloud[0], cloud[1].address)
    try:
        seen = []
        for _ in range(2):   # the second time with the acceptance the first one measured, if it drafted
            r = auto.generate(PROMPT, N_NEW)
            seen.append(r.observed)
            assert r.mode in LOSSLESS and r.tokens == ref and not r.degraded
            o = r.observed
            assert o.rtt_s > 0 and o.cloud_token_s > 0 and o.device_token_s > 0 and o.layers == 4 and o.exit_layer == K
            assert r.choice.mode == r.mode and {row.mode for row in r.choice.rows} == {
                "standalone", "cloud-only", "cloud-stream", "collaborative", "speculative"}
            assert min(row.seconds_per_token for row in r.choice.rows if row.allowed) == r.choice.predicted_s_per_token
        assert (seen[1].rtt_s, seen[1].cloud_token_s) == (seen[0].rtt_s, seen[0].cloud_token_s)   # measured once
        auto.remeasure_s = 0
        assert auto.generate(PROMPT, 2).observed.cloud_token_s != seen[0].cloud_token_s           # measured again
    finally:
        auto.llm.close()


def test_every_mode_auto_can_run_gives_the_full_models_greedy_tokens(cloud, ref):
    auto = auto_for(cloud[0], cloud[1].address)
    try:
        for mode in ("cloud-only", "speculative", "cloud-stream"):
            r = auto.run(mode, PROMPT, N_NEW)
            assert r.tokens == ref and not r.degraded, mode
        assert auto.run("standalone", PROMPT, N_NEW).sources == ["edge"] * N_NEW

        class Gone(Exception):
            pass

        def reader_gone(step, token, source):
            if step == 2:
                raise Gone
        for mode in ("speculative", "cloud-stream"):     # a consumer that goes away ends the generation there
            with pytest.raises(Gone):
                auto.run(mode, PROMPT, N_NEW, on_token=reader_gone)
            assert auto.run(mode, PROMPT, N_NEW).tokens == ref, mode
    finally:
        auto.llm.close()


def test_unreachable_cloud_generates_standalone_flagged_degraded(cloud):
    auto = auto_for(cloud[0], "127.0.0.1:9")     # nothing listens on the discard port
    try:
        r = auto.generate(PROMPT, 6)
    finally:
        auto.llm.close()
    assert r.observed.rtt_s is None and r.mode == "standalone" and [row.mode for row in r.choice.rows] == ["standalone"]
    alone = CollabLlm(cloud[0], mode="standalone").generate(PROMPT, 6)
    assert r.tokens == alone.tokens and r.sources == ["edge"] * 6


def test_a_link_cut_mid_stream_loses_and_repeats_no_token(cloud, ref, tmp_path):
    """Through the project's link emulator, killed after the stream's 5th token: the 5 streamed tokens
    are kept, the rest come from the device (degraded) as a standalone continuation of prompt + them."""
    emu = subprocess.Popen([sys.executable, str(LINKEMU), "--listen", "127.0.0.1:0", "--target",
                            cloud[1].address], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(LISTENING.match(emu.stdout.readline()).group(1))
        auto = auto_for(cloud[0], f"127.0.0.1:{port}")
        generate_stream = auto.stream.generate

        def cut_after_five(ids, n, sampling, stop, ignore_eos, on_token):
            def relay(step, token, source):
                on_token(step, token, source)
                if step == 4:
                    emu.send_signal(signal.SIGKILL)
                    emu.wait(10)
            return generate_stream(ids, n, sampling, stop, ignore_eos=ignore_eos, on_token=relay)

        auto.stream.generate = cut_after_five
        r = auto.run("cloud-stream", PROMPT, N_NEW)
    finally:
        emu.kill()
        auto.llm.close()
    assert len(r.tokens) == N_NEW
    streamed = r.sources.count("cloud")
    assert 5 <= streamed < N_NEW and r.tokens[:streamed] == ref[:streamed]
    assert set(r.sources[streamed:]) == {"degraded"}
    alone = CollabLlm(cloud[0], mode="standalone").generate(PROMPT + r.tokens[:streamed], N_NEW - streamed)
    assert r.tokens[streamed:] == alone.tokens


def test_cli_auto_json(cloud):
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(cloud[0]),
                          "--mode", "auto", "--cloud", cloud[1].address, "--prompt-ids", "5,17,3,42",
                          "--max-new-tokens", "6", "--link-rate-mbit", "100", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["chose"] in LOSSLESS and len(report["tokens"]) == 6
    assert {p["mode"] for p in report["predictions"]} >= {"cloud-stream", "speculative", "cloud-only"}
    assert report["observed"]["rate_bps"] == 100e6 and report["observed"]["rtt_s"] > 0


def test_the_agents_collab_llm_pipeline_in_auto_mode(cloud, ref):
    from edge_runtime.agent.llm_pipelines import CollabPipeline
    from edge_runtime.agent.pipeline import Context
    from edge_runtime.agent.policy import Decision
    ctx = Context(cloud[1].address, None, None, None)
    pipe = CollabPipeline("chat", cloud[0], {"mode": "auto", "max_new_tokens": N_NEW}, ctx)
    try:
        s = pipe.stream(PROMPT, N_NEW, None, ())
        assert list(s) == ref and s.finish_reason == "length" and len(s.sources) == N_NEW
        assert pipe.describe()["mode"] in LOSSLESS and pipe.describe()["auto"]
        pipe.adapt(Decision(allow_cloud=False, objective="latency", reason="metered link"), None)  # no cloud
        s = pipe.stream(PROMPT, 4, None, ())
        assert len(list(s)) == 4 and s.sources == ["edge"] * 4 and pipe.describe()["mode"] == "standalone"
    finally:
        pipe.close()


def test_a_stream_closed_early_stops_the_auto_generation(cloud):
    """The agent's auto pipeline generates on a thread of its own: a reader that closes its stream
    after 2 of 60 tokens stops it at the next token decided (held here until the close), instead
    of the pipeline waiting for all 60."""
    import time

    from edge_runtime.agent.llm_pipelines import CollabPipeline
    from edge_runtime.agent.pipeline import Context
    pipe = CollabPipeline("chat", cloud[0], {"mode": "auto", "max_new_tokens": 60}, Context(cloud[1].address, None,
                                                                                             None, None))
    decided, streams, generate = [], [], pipe.auto.generate

    def counting(prompt, n, stop, on_token):
        def each(*token):
            decided.append(token)
            deadline = time.monotonic() + 30
            while len(decided) == 3 and not streams[-1].closed and time.monotonic() < deadline:
                time.sleep(0.01)    # the third token waits for the reader to close its stream
            on_token(*token)
        return generate(prompt, n, stop, on_token=each)
    pipe.auto.generate = counting
    try:
        streams.append(pipe.stream(PROMPT, 60, None, ()))
        assert len([next(streams[0]), next(streams[0])]) == 2
        streams[0].close()
        assert len(decided) == 3
        streams.append(pipe.stream(PROMPT, 3, None, ()))
        assert len(list(streams[1])) == 3     # the pipeline serves the next request
    finally:
        pipe.close()
