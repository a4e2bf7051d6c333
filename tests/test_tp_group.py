"""An elastic tensor-parallel group (edge_runtime/tp/group.py, peer.py) that survives lost peers.

    .venv/bin/python -m pytest -q tests/test_tp_group.py

Real peer processes (`edge-runtime tp worker --model --listen`) on loopback, killed (SIGKILL) or
stalled (SIGSTOP) mid-generation at world sizes 3 and 4: the generation completes with exactly
`transformers`' greedy tokens (so none lost or repeated), the group re-forms over the rest, and the
peer that comes back is taken in at the next request. With int4 / int8 weights a kill at world 3
leaves every token equal to the uninterrupted run's and to one device's. A rank that misbehaves (a
wrong shape, a replayed message, a stale epoch) is dropped like a dead one with a log line; a
re-plan that no longer fits the peers' memory fails with the figures.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edge_runtime.tp.budget import rank_memory  # noqa: E402
from server_process import AgentProcess  # noqa: E402
from test_tp_engine import _write_tokenizer  # noqa: E402
from edge_runtime.tp.config import TPConfig  # noqa: E402
from edge_runtime.tp.group import Group, GroupError, replay  # noqa: E402
from edge_runtime.tp.launch import free_port  # noqa: E402
from edge_runtime.tp.prepare import make_format_plan  # noqa: E402
from split.llama import LlamaConfig  # noqa: E402
from split.llama.quantize import handler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 77, 31, 190, 2, 64, 123]
N_NEW = 24
FAULT_AFTER = 5  # tokens streamed before the fault


def write_model(path: Path, initializer_range: float = 0.2, **shape) -> list[int]:
    """A random Llama (8 query / 4 KV heads, so worlds 2, 3 and 4 all split it) written to `path`;
    returns transformers' greedy ids after PROMPT."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, max_position_embeddings=128, initializer_range=initializer_range,
                                   num_attention_heads=8, num_key_value_heads=4, **shape)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path, safe_serialization=True)
    _write_tokenizer(path, 256)  # "t0".."t255": the agent's HTTP API answers in text
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N_NEW, do_sample=False)
    return ids[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, transformers' greedy ids) of a tiny model."""
    path = tmp_path_factory.mktemp("group-model")
    return path, write_model(path, hidden_size=64, intermediate_size=128, num_hidden_layers=3)


class PeerProcess:
    """`edge-runtime tp worker --model --listen` on a fixed loopback port, restartable."""

    def __init__(self, model: Path, cache: Path, name: str, *extra: str):
        self.model, self.cache, self.name, self.extra = model, cache, name, extra
        self.address = f"127.0.0.1:{free_port()}"
        self.log = cache / f"{name}.log"
        self.proc = None
        self.start()

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_runtime.cli", "tp", "worker", "--model", str(self.model), "--listen",
                 self.address, "--cache-dir", str(self.cache), "--name", self.name, *self.extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while f"tp peer {self.name}: listening" not in self.log.read_text(errors="replace").split("--- start")[-1]:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "peer did not start"
            time.sleep(0.1)

    def restart(self) -> None:
        self.stop()
        with open(self.log, "a") as log:
            log.write("--- start\n")
        self.start()

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def peers(model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("group-cache")
    procs = [PeerProcess(model[0], cache, f"p{i}") for i in range(1, 4)]
    yield procs, cache
    for p in procs:
        p.stop()


def make_group(model_dir, addresses, cache, logs, timeout_s=1.0, join_timeout_s=20.0, profile=None,
               quantize=None, dtype="fp32") -> Group:
    config = TPConfig(master=f"127.0.0.1:{free_port()}", timeout_s=timeout_s, join_timeout_s=join_timeout_s,
                      dtype=dtype)
    return Group(model_dir, addresses, config, cache_dir=cache, log=logs.append, profile=profile, quantize=quantize)


def wait_until(predicate, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def generate_with_fault(group: Group, fault, n_new: int = N_NEW, after: int = FAULT_AFTER) -> list[int]:
    """Stream n_new greedy tokens, calling fault() after `after` of them."""
    got = []
    for tok in group.generate(PROMPT, n_new):
        got.append(tok)
        if len(got) == after:
            fault()
    return got


@pytest.mark.parametrize("world,how", [(3, "kill"), (4, "kill"), (3, "stall"), (4, "stall")])
def test_a_lost_peer_mid_generation_costs_no_token_and_rejoins_at_the_next_request(model, peers, world, how):
    procs, cache = peers
    members = procs[:world - 1]
    victim = members[-1]
    logs = []
    group = make_group(model[0], [p.address for p in members], cache, logs)
    try:
        assert group.describe()["world_size"] == world
        sig = signal.SIGKILL if how == "kill" else signal.SIGSTOP
        got = generate_with_fault(group, lambda: victim.signal(sig))
        assert got == model[1]  # every token once, in order, equal to an uninterrupted run
        state = group.describe()
        assert state["world_size"] == world - 1 and victim.name in state["absent"]
        assert state["recoveries"] == 1 and state["last_recovery"]["lost"] == [victim.name]
        assert any(f"lost {victim.name}" in line for line in logs), logs

        # the next request runs on the smaller plan
        assert list(group.generate(PROMPT, N_NEW)) == model[1]
        assert group.describe()["world_size"] == world - 1

        # the peer comes back (restarted, or resumed), and is taken in at the next request boundary
        if how == "kill":
            victim.restart()
        else:
            victim.signal(signal.SIGCONT)
        wait_until(lambda: group.describe()["returning"] == [victim.name], what="the group to see the returned peer")
        assert list(group.generate(PROMPT, N_NEW)) == model[1]
        assert group.describe()["world_size"] == world and group.describe()["absent"] == [], "\n".join(logs)
    finally:
        group.close()
        if victim.proc.poll() is not None:
            victim.restart()
        victim.signal(signal.SIGCONT)


def test_replay_feeds_the_decode_steps_again_as_rows_of_their_own():
    """(start, stop, steps_from) calls: a step of several ids (a prompt) starts a call, each one-id step
    after it is a row attended on its own."""
    assert replay([0], 7) == [(0, 7, 7)]
    assert replay([0, 7, 8, 9], 10) == [(0, 10, 7)]
    assert replay([0, 1, 2], 3) == [(0, 3, 1)]
    assert replay([0, 7, 8, 12, 13], 14) == [(0, 8, 7), (8, 14, 4)]


Q_NEW, Q_FAULT_AFTER = 40, 12


@pytest.fixture(scope="module")
def qpeers(tmp_path_factory):
    """A tiny model for int4-g32 / int8 (head_dim 16: a KV group's 32 o_proj columns are one int4
    group) with flat logits (small weights), so greedy tokens meet near ties, and 2 peers holding it."""
    path = tmp_path_factory.mktemp("group-qmodel")
    write_model(path, initializer_range=0.05, hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    cache = tmp_path_factory.mktemp("group-qcache")
    procs = [PeerProcess(path, cache, f"q{i}") for i in (1, 2)]
    yield path, procs, cache
    for p in procs:
        p.stop()


@pytest.mark.parametrize("scheme", ["int4", "int8", "bf16"])
def test_quantized_weights_keep_every_token_bit_for_bit_through_a_re_plan(qpeers, scheme):
    """A peer killed mid-generation at world 3 with int4-g32 (int8) weights, or float weights computed
    in bf16: every token equals the uninterrupted world-3 run's and a one-device run's. The re-prefill
    attends each generated row as its decode step did, and every plan sums the same fixed units'
    partials exactly; with a plain re-prefill and per-rank bf16 partials (the code before, run against
    this test) the run with the kill parted from the uninterrupted one at its 14th token (int4) and
    37th (int8), and bf16's world-3 run parted from the one-device run at its 25th."""
    model, procs, cache = qpeers
    for p in procs:  # the one an earlier case killed
        if p.proc.poll() is not None:
            p.restart()
    h, dtype = (None, "bf16") if scheme == "bf16" else (handler(scheme, 32), "fp32")
    logs = []
    alone = make_group(model, [], cache, logs, quantize=h, dtype=dtype)
    try:
        one = list(alone.generate(PROMPT, Q_NEW))
    finally:
        alone.close()
    group = make_group(model, [p.address for p in procs], cache, logs, quantize=h, dtype=dtype)
    try:
        assert group.describe()["world_size"] == 3
        uninterrupted = list(group.generate(PROMPT, Q_NEW))
        got = generate_with_fault(group, lambda: procs[-1].signal(signal.SIGKILL), Q_NEW, Q_FAULT_AFTER)
        assert group.describe()["world_size"] == 2 and group.describe()["recoveries"] == 1, "\n".join(logs)
        assert got == uninterrupted
        assert uninterrupted == one
    finally:
        group.close()


ROGUE = textwrap.dedent('''
    """A peer that answers like a real one, then misbehaves in the group: MODE wrong-shape | replay | stale."""
    import sys
    import numpy as np
    import torch
    from pathlib import Path
    from split.llama import LlamaConfig
    from edge_runtime.tp.collective import STEP
    from edge_runtime.tp.config import TPConfig
    from edge_runtime.tp.control import ControlServer
    from edge_runtime.tp.launch import plan_checksum
    from edge_runtime.tp.launch import model_fingerprint
    from edge_runtime.tp.prepare import make_format_plan
    from edge_runtime.tp.star_worker import StarWorker
    from edge_runtime.tp.wire import DType, Header, Msg, encode
    from edge_runtime.tp import shm
    shm.available = lambda: False  # partials over the socket, where a wrong one can be seen

    listen, model, mode = sys.argv[1:4]
    config = LlamaConfig.from_dir(model)
    with ControlServer(listen) as server:
        print("tp peer rogue: listening", flush=True)
        while True:
            got = server.next(1.0)
            if got is None:
                continue
            reply, req, sender = got
            if req["op"] == "describe":
                reply({"ok": True, "name": "rogue", "profile": {}, "model": model_fingerprint(Path(model)),
                       "state": "idle"})
                continue
            reply({"ok": True})
            world, rank = req["world_size"], req["rank"]
            plan = make_format_plan(config, world, req["weights"], None, req["max_rank_memory"])
            epoch = req["epoch"] - 1 if mode == "stale" else req["epoch"]
            try:
                w = StarWorker(TPConfig(world_size=world, master=f"{sender}:{req['master_port']}", join_timeout_s=5),
                               rank, plan_checksum(plan) + f".{epoch}".encode())
                while w.broadcast(0)[0] != STEP:
                    pass
                if mode == "wrong-shape":
                    w.allreduce(torch.zeros(1, 3, 5), layer=0, kind=0)
                else:  # replay: the same partial twice
                    x = np.zeros((1, 7, config.hidden_size), np.float32)  # the prompt's prefill
                    head = Header(Msg.PARTIAL, rank, world, 0, 0, 0, w._seq + 1, DType.F32, x.shape).pack()
                    w._sock.send_multipart([head, *encode(x, DType.F32)])
                    w._sock.send_multipart([head, *encode(x, DType.F32)])
                    w.broadcast(0)
            except Exception as err:
                print(f"rogue: {err}", flush=True)
''')


@pytest.mark.parametrize("mode,why", [("wrong-shape", "partial of shape"), ("replay", "out of sync"),
                                      ("stale", "did not join")])
def test_a_misbehaving_rank_is_dropped_like_a_dead_one(model, peers, tmp_path, mode, why):
    procs, cache = peers
    script = tmp_path / "rogue.py"
    script.write_text(ROGUE)
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "rogue.log"
    with open(log, "wb") as f:
        rogue = subprocess.Popen([sys.executable, str(script), address, str(model[0]), mode], stdout=f,
                                 stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        wait_until(lambda: "listening" in log.read_text(), 60, "the rogue peer")
        logs = []
        group = make_group(model[0], [procs[0].address, address], cache, logs, join_timeout_s=5.0)
        try:
            assert list(group.generate(PROMPT, N_NEW)) == model[1]
            state = group.describe()
            assert state["members"] == ["rank 0 (this device)", procs[0].name] and "rogue" in state["absent"]
            assert any(why in line for line in logs), logs
        finally:
            group.close()
    finally:
        rogue.kill()
        rogue.wait()


def _smallest_budget(config, world: int, resident: bool = False) -> int:
    """The least memory every rank of an equal `world`-way plan fits in: all blocks resident, or with
    its cheapest window."""
    plan = make_format_plan(config, world, None)
    windows = [0] if resident else range(2 * config.num_hidden_layers)
    return max(min(rank_memory(config, plan, r, w) for w in windows) for r in range(world))


def test_a_re_plan_pages_when_memory_requires_it_and_fails_with_the_figures_when_nothing_fits(tmp_path):
    """Every rank offering a budget that three ranks fit resident: after a loss the two left page their
    blocks (a smaller window), and after a second loss the one left cannot fit at all: the request
    fails with the figures, without a hang or a crash. (Blocks large enough that paging saves memory
    next to the streamed head's 4 MiB buffer.)"""
    folder = tmp_path / "model"
    model = (folder, write_model(folder, hidden_size=256, intermediate_size=1024, num_hidden_layers=6))
    config = LlamaConfig.from_dir(model[0])
    budget = _smallest_budget(config, 3, resident=True)
    assert _smallest_budget(config, 2) <= budget < _smallest_budget(config, 2, resident=True)
    assert budget < _smallest_budget(config, 1)
    cache = tmp_path / "cache"
    cache.mkdir()
    procs = [PeerProcess(model[0], cache, f"b{i}", "--max-memory", str(budget)) for i in (1, 2)]
    logs = []
    group = make_group(model[0], [p.address for p in procs], cache, logs, profile={"memory_bytes": budget})
    try:
        assert group.describe()["windows"] == [0, 0, 0]
        assert generate_with_fault(group, lambda: procs[1].signal(signal.SIGKILL)) == model[1]
        windows = group.describe()["windows"]
        assert group.describe()["world_size"] == 2 and all(0 < w < 2 * config.num_hidden_layers for w in windows)
        with pytest.raises(GroupError, match=r"no plan fits 1 rank\(s\).*MiB"):
            generate_with_fault(group, lambda: procs[0].signal(signal.SIGKILL))
    finally:
        group.close()
        for p in procs:
            p.stop()


def test_a_peer_offering_too_little_memory_is_left_out_with_a_log_line(model, peers, tmp_path):
    procs, cache = peers
    small = PeerProcess(model[0], cache, "small", "--max-memory", "1MiB")
    logs = []
    group = make_group(model[0], [procs[0].address, small.address], cache, logs)
    try:
        assert group.describe()["members"][1:] == [procs[0].name]
        assert any("leaving out small" in line and "MiB" in line for line in logs), logs
        assert list(group.generate(PROMPT, N_NEW)) == model[1]
    finally:
        group.close()
        small.stop()


def test_a_peer_holding_other_weights_of_the_same_shape_is_left_out(model, peers, tmp_path):
    """A fine-tune of the same architecture is another model: mixing its shards would give garbage."""
    import shutil

    from safetensors.torch import load_file, save_file
    procs, cache = peers
    other = tmp_path / "fine-tune"
    shutil.copytree(model[0], other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    stranger = PeerProcess(other, cache, "tuned")
    logs = []
    group = make_group(model[0], [procs[0].address, stranger.address], cache, logs)
    try:
        assert group.describe()["members"][1:] == [procs[0].name]
        assert any("peer tuned holds model" in line and "left out" in line for line in logs), logs
    finally:
        group.close()
        stranger.stop()


def test_a_peer_refuses_garbage_and_keeps_serving(model, peers):
    """Requests a stranger (or a broken master) could send to a peer's control port: each gets a clear
    refusal, nothing crashes the peer, and a group forms over it afterwards."""
    import zmq

    from edge_runtime.tp.control import ask
    from edge_runtime.tp.launch import model_fingerprint
    procs, cache = peers
    address = procs[0].address
    good = {"op": "serve", "model": model_fingerprint(model[0]), "world_size": 2, "rank": 1, "weights": None,
            "quantize": None, "max_rank_memory": None, "epoch": 1, "master_port": 1, "timeout_s": 1.0}
    garbage = [{"op": "dance"}, {"op": "serve", "model": "feed"}, {**good, "world_size": "2"}, {**good, "rank": 0},
               {**good, "rank": 2}, {**good, "world_size": 10**9}, {**good, "weights": "abc"},
               {**good, "weights": [1.0]}, {**good, "weights": {"a": 1}}, {**good, "quantize": {"scheme": "int3"}},
               {**good, "quantize": "int4"}, {**good, "max_rank_memory": -5}, {**good, "max_rank_memory": 1},
               {**good, "timeout_s": [1]}, {**good, "master_port": 0}, {**good, "epoch": None}]
    for request in garbage:
        answer = ask(address, request, 10.0)
        assert answer is not None and answer["ok"] is False and answer["error"], (request, answer)
    ctx = zmq.Context.instance()  # not JSON, not an object, no id: dropped without an answer
    with ctx.socket(zmq.DEALER) as sock:
        sock.connect(f"tcp://{address}")
        for frames in ([b"\xff\xfe"], [b"[1, 2]"], [b'{"op": "describe"}'], [b"a", b"b"]):
            sock.send_multipart(frames)
    assert ask(address, {"op": "describe"}, 10.0)["state"] == "idle"
    logs = []
    group = make_group(model[0], [address], cache, logs)
    try:
        assert list(group.generate(PROMPT, N_NEW)) == model[1]
    finally:
        group.close()


def test_cli_generate_over_peers_reports_the_group(model, peers, capsys):
    import json

    from edge_runtime import cli as edge_cli
    procs, cache = peers
    code = edge_cli.main(["tp", "generate", "--model", str(model[0]), "--peers", ",".join(p.address for p in procs[:2]),
                          "--master", f"127.0.0.1:{free_port()}", "--prompt-ids", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", str(N_NEW), "--ignore-eos", "--cache-dir", str(cache), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["token_ids"] == model[1] and result["world_size"] == 3
    assert result["group"]["members"][1:] == ["p1", "p2"]


def test_cli_worker_argument_errors(capsys):
    from edge_runtime import cli as edge_cli
    assert edge_cli.main(["tp", "worker", "--model", "m"]) == 2
    assert "--listen" in capsys.readouterr().err
    assert edge_cli.main(["tp", "worker", "--model", "m", "--listen", "0.0.0.0:1", "--shards", "s"]) == 2
    assert edge_cli.main(["tp", "worker", "--model", "m", "--listen", "0.0.0.0:29600"]) == 2
    assert "beyond this machine" in capsys.readouterr().err


def test_the_agent_tp_pipeline_serves_through_a_lost_peer(model, peers, tmp_path):
    """A real agent with a tp pipeline over two peers, two streamed OpenAI completions at once (one
    running, one queued): a peer killed mid-stream costs neither a token; /health and /metrics show
    the smaller group and the recovery; the restarted peer is back for the next request."""
    import json
    import threading
    import urllib.request

    openai = pytest.importorskip("openai")
    procs, cache = peers
    (tmp_path / "agent.toml").write_text(
        f'device_id = "tp-box"\nstate_dir = "state"\n[serve]\nhost = "127.0.0.1"\nport = 0\nhttp_port = 0\n'
        f'[[pipeline]]\nname = "big"\nkind = "tp"\npath = "{model[0]}"\ncache_dir = "{cache}"\n'
        f'peers = ["{procs[0].address}", "{procs[1].address}"]\nmaster = "127.0.0.1:{free_port()}"\n'
        f'timeout_s = 1.0\n')
    agent = AgentProcess(tmp_path / "agent.toml")
    try:
        base = agent.wait_for("serving http://").split("serving ")[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
        wait_until(lambda: client.models.list().data, 120, "the tp pipeline to open")
        expected = [f"t{i}" for i in model[1]]
        texts, chunks_seen = {}, threading.Event()

        def complete(i):
            stream = client.completions.create(model="big", prompt=PROMPT, max_tokens=N_NEW, stream=True, temperature=0)
            parts = []
            for chunk in stream:
                parts.append(chunk.choices[0].text if chunk.choices else "")
                if i == 0 and len(parts) == FAULT_AFTER:
                    chunks_seen.set()
            texts[i] = "".join(parts).split()

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(2)]
        threads[0].start()
        assert chunks_seen.wait(120)
        threads[1].start()  # queued behind the first
        procs[1].signal(signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert texts == {0: expected, 1: expected}

        def get(path):
            with urllib.request.urlopen(base.removesuffix("/v1") + path, timeout=30) as r:
                return r.read().decode()

        big = json.loads(get("/health"))["pipelines"]["big"]
        assert big["world_size"] == 2 and big["recoveries"] == 1 and big["absent"] == [procs[1].name]
        metrics = get("/metrics")
        assert 'edgefold_tp_group_recoveries_total{pipeline="big"} 1.0' in metrics
        assert 'edgefold_tp_group_world_size{pipeline="big"} 2.0' in metrics

        procs[1].restart()
        wait_until(lambda: json.loads(get("/health"))["pipelines"]["big"]["returning"] == [procs[1].name],
                   60, "the group to see the restarted peer")
        again = client.completions.create(model="big", prompt=PROMPT, max_tokens=N_NEW, temperature=0)
        assert again.choices[0].text.split() == expected
        assert json.loads(get("/health"))["pipelines"]["big"]["world_size"] == 3
    finally:
        agent.kill()
        if procs[1].proc.poll() is not None:
            procs[1].restart()

