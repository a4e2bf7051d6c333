"""Sessions routed by sequence id across replicas (issue 17, items 3 and 4): HAProxy from the OS
packages in front of real cloud-service (or MLServer) replicas (scripts/cloud_cluster.py), the
collaborative LLM's device half (CollabLlm) talking to the balancer. Tokens through two replicas
equal one process's; a replica killed while it holds a session ends in a resync with identical
tokens."""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.client.oip_client import build_request, routing_headers
from edge_runtime.collab.conversation import Conversation
from edge_runtime.collab.device import CollabLlm
from cloud_cluster import CloudCluster, haproxy_missing
from llm_models import K, make_model, write_model
import mlserver_venv
from server_process import ServerProcess

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.skipif(haproxy_missing() is not None, reason=f"{haproxy_missing()} (.ci/run installs it)")

PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 2, 64], [33, 1, 7, 7, 90], [12, 60]]
N_NEW = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ee_lm")
    make_model(model_dir)
    repo = tmp_path_factory.mktemp("llm_repo")
    write_model(repo, "llm", model_dir, K)
    write_model(repo, "llm_full", model_dir, 0)
    return model_dir, repo


@pytest.fixture(scope="module")
def cluster(model):
    with CloudCluster(model[1], replicas=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def single(model):
    proc = ServerProcess(model[1])
    yield proc
    proc.kill()


def sessions(cluster, count) -> list[int]:
    """`count` sequence ids, half of them routed to each replica (so both replicas hold sessions)."""
    by_replica = {0: [], 1: []}
    for sid in range(1000, 1200):
        replica = cluster.replica_of(sid)
        if len(by_replica[replica]) < count // 2:
            by_replica[replica].append(sid)
    return by_replica[0] + by_replica[1]


def run(edge, prompt, seq_id=None):
    conversation = Conversation(seq_id, backoff=edge.backoff_s) if seq_id is not None else None
    result = edge.generate(prompt, N_NEW, conversation=conversation)
    return result.tokens, result.sources


@pytest.mark.parametrize("mode,threshold", [("collaborative", 0.3), ("collaborative", 1.0), ("cloud-only", 0.0)])
def test_sessions_across_two_replicas_equal_one_process(model, cluster, single, mode, threshold):
    model_dir = model[0]
    alone = CollabLlm(model_dir, mode=mode, cloud=single.address, threshold=threshold)
    expected = [run(alone, p) for p in PROMPTS]
    edge = CollabLlm(model_dir, mode=mode, cloud=cluster.address, threshold=threshold)
    ids = sessions(cluster, 2 * len(PROMPTS))
    got = {}
    for turn in range(2):   # interleaved: every session's requests go to its own replica
        for i, prompt in enumerate(PROMPTS):
            got[turn, i] = run(edge, prompt, ids[turn * len(PROMPTS) + i])
    assert {cluster.replica_of(sid) for sid in ids} == {0, 1}
    for (turn, i), result in got.items():
        assert result == expected[i], (turn, i)
    if mode != "cloud-only" and threshold == 1.0:
        assert all(source == "cloud" for _, sources in got.values() for source in sources)


@pytest.mark.parametrize("kind,when", [("cloud-service", "between calls"), ("cloud-service", "inside a call"),
                                       ("mlserver", "inside a call")])
def test_replica_killed_mid_generation_resyncs_with_identical_tokens(model, kind, when):
    """Killed between two of the session's calls (the next one finds the replica dead) or while one
    is inside it (stopped, then killed with the request in it): the balancer sends the request to
    the other replica, which answers FAILED_PRECONDITION; the device resyncs there."""
    model_dir, repo = model
    edge_args = dict(mode="collaborative", threshold=1.0)   # every token from the cloud
    if kind == "mlserver" and (why := mlserver_venv.ensure(log=lambda _: None)):
        pytest.skip(why)
    with CloudCluster(repo, replicas=2, kind=kind) as cluster:
        expected = run(CollabLlm(model_dir, cloud=cluster.replicas[0].address, **edge_args), PROMPTS[0])
        edge = CollabLlm(model_dir, cloud=cluster.address, **edge_args)
        turn = edge.turn(PROMPTS[0], N_NEW)
        killed = killer = None
        for step, _ in enumerate(turn):
            if step == 3:
                killed = cluster.replicas[cluster.replica_of(turn.conv.seq_id)]
                if when == "between calls":
                    killed.kill()
                else:   # the next call goes in and hangs there until the kill
                    os.kill(killed.proc.pid, signal.SIGSTOP)
                    killer = threading.Timer(0.5, killed.kill)
                    killer.start()
        if killer is not None:
            killer.join()
        assert killed.proc.poll() is not None
        assert cluster.replicas[cluster.replica_of(turn.conv.seq_id)] is not killed   # taken out
        counters = turn.result.counters
        assert (turn.result.tokens, turn.result.sources) == expected
        assert counters.resends == 1 and counters.degraded_tokens == 0 and counters.failed_requests == 0
        # the survivor holds the session now: the next turn continues it without another resync
        more = edge.generate(PROMPTS[1], 4, conversation=turn.result.conversation)
        assert more.counters.resends == 0 and more.counters.degraded_tokens == 0


def test_cluster_script_starts_and_stops_cleanly(model, tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "cloud_cluster.py"), "--repository", str(model[1]),
                             "--replicas", "2", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("balancer:"):
                break
        assert any(line.startswith("replica 1:") for line in lines), "".join(lines)
        address = lines[-1].split("grpc://")[1].split()[0]
        edge = CollabLlm(model[0], mode="cloud-only", cloud=address)
        assert len(edge.generate(PROMPTS[1], 3).tokens) == 3
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 3, children   # two replicas and the balancer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in children:
            assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0, f"{pid} left running"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_routing_header_is_printable_ascii_for_any_sequence_id():
    for sid, header in [(42, "42"), ("chat/é 1", "chat%2F%C3%A9%201"), ("", "")]:
        request = build_request("llm", {"x": np.zeros(1, np.float32)}, parameters={"sequence_id": sid})
        assert routing_headers(request) == (("x-sequence-id", header),)
    assert routing_headers(build_request("llm", {"x": np.zeros(1, np.float32)})) == ()
