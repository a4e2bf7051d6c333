"""Allreduce backends of edge_runtime/tp: star (ZeroMQ) and gloo, with real worker processes and real
sockets on 127.0.0.1 (the wire format alone: test_tp_wire.py; the fast paths: test_tp_fastpath.py).

Worker ranks run as `python -c` subprocesses playing a JSON scenario list (`_rank_main` below);
the test process is rank 0. Fault tests use raw ZeroMQ sockets to play a broken worker or master.

Error bounds of the compressed payloads (per element, `p_r` the partial of rank r, `S` the exact
fp32 sum in rank order; rank 0's own partial never travels, so including it only loosens them):
    fp16: |y - S| <= 2^-11 * (sum_r |p_r| + |S|) * 1.01 + 1e-6
    int8: |y - S| <= (sum_r rowmax|p_r| * 1.01 + rowmax|S|) / 254 * 1.01 + 1e-6
          (one rounding of each partial and one of the sum, half a step each, step = absmax/127)
"""
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from edge_runtime.tp.collective import MLP, RESET, SHUTDOWN, STEP, ATTN, CollectiveError, LocalCollective
from edge_runtime.tp.config import TPConfig
from edge_runtime.tp.connect import make_collective
from edge_runtime.tp.curve import make_keys
from edge_runtime.tp.launch import free_port  # a free port pair: gloo uses port + 1
from edge_runtime.tp.star_master import StarMaster
from edge_runtime.tp.star_worker import StarWorker
from edge_runtime.tp.wire import HEADER, DType, Header, Msg, unpack

ROOT = Path(__file__).resolve().parents[1]
C = 48  # hidden size of the test tensors


# ---------------------------------------------------------------- what every rank plays

def _partial(seed: int, rank: int, op: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + op * 10 + rank)
    return torch.randn(shape, generator=g) * (1 + rank)  # ranks of different magnitude


def _config(world: int, port: int, backend: str = "star", payload: str = "fp32", **options) -> TPConfig:
    return TPConfig(world, f"127.0.0.1:{port}", backend, payload, **options)


def _gathered(seed: int, rank: int) -> bytes:
    """What rank `rank` sends to the scenario's gather: JSON of a different length per rank (rank 2: nothing)."""
    return b"" if rank == 2 else json.dumps({"rank": rank, "seed": seed, "pad": "x" * (37 * rank)}).encode()


def _digest(t) -> str | None:
    return None if t is None else hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _ops(seed: int):
    """(kind, args) of one scenario: broadcasts of commands and tensors ((step, steps_from)), 4 allreduces
    of fp32 partials and 2 of float64 ones holding bf16 values (the quantized ranks' exact partials:
    one through shared memory where local ranks have it, one too large for it)."""
    hidden = _partial(seed, 9, 9, (1, 5, C))
    return [("bcast", RESET, None, (0, -1)), ("bcast", STEP, hidden, (3, 2)),
            ("ar", 0, ATTN, (1, 5, C)), ("ar", 0, MLP, (1, 5, C)),
            ("bcast", STEP, torch.arange(7, dtype=torch.int64).reshape(1, 7) * seed, (8, -1)),
            ("ar", 1, ATTN, (1, 1, C)), ("ar", 1, MLP, (1, 1, C)),
            ("ar64", 2, ATTN, (1, 3, C)), ("ar64", 2, MLP, (1, 2800, C)), ("gather", None, None, None),
            ("bcast", SHUTDOWN, None, (0, -1))]


def _partial64(seed: int, rank: int, op: int, shape) -> torch.Tensor:
    """A float64 partial of bf16 values: any sum of them is exact in float64."""
    return _partial(seed, rank, op, shape).bfloat16().double()


def _play(comm, seed: int, die_after: int | None = None) -> list[dict]:
    """Run the scenario's operations on one rank; one record per operation."""
    records = []
    for op, (what, a, b, c) in enumerate(_ops(seed)):
        if what == "bcast":
            cmd, t = comm.broadcast(a, b, *c) if comm.rank == 0 else comm.broadcast(0)
            records.append({"cmd": cmd, "step": comm.last_step, "steps_from": comm.last_steps_from,
                            "digest": _digest(t), "dtype": None if t is None else str(t.dtype)})
        elif what == "gather":
            got = comm.gather(_gathered(seed, comm.rank))
            records.append({"digest": None, "gathered": got})
        else:
            y = comm.allreduce((_partial64 if what == "ar64" else _partial)(seed, comm.rank, op, c), layer=a, kind=b)
            records.append({"digest": _digest(y), "y": y if comm.rank == 0 else None})
            if die_after is not None and sum("y" in r for r in records) == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
    return records


def _rank_main(rank: int, scenarios_json: str) -> None:
    """Entry point of a worker subprocess: play every scenario this rank belongs to."""
    torch.set_num_threads(1)
    for sc in json.loads(scenarios_json):
        if rank >= sc["world"]:
            continue
        out = {"name": sc["name"], "rank": rank, "error": None}
        t0 = time.monotonic()
        try:
            config = _config(sc["world"], sc["port"], sc["backend"], sc.get("payload", "fp32"),
                             curve_keys=sc.get("curve_keys"), join_timeout_s=30.0)
            with make_collective(config, rank) as comm:
                role = sc.get("roles", {}).get(str(rank))
                if role == "master_then_hang":
                    comm.broadcast(STEP, torch.ones(2))
                    print(json.dumps({"ready": True}), flush=True)
                    threading.Event().wait(60)  # hang: the test kills this process
                if role == "wait_forever":
                    while True:
                        cmd, _ = comm.broadcast(0)
                        print(json.dumps({"got": cmd}), flush=True)
                die = sc.get("die_after") if rank == sc.get("die_rank") else None
                out["records"] = [{k: v for k, v in r.items() if k != "y"} for r in _play(comm, sc["seed"], die)]
                out["bytes"] = [comm.bytes_sent, comm.bytes_received]
                out["transport"] = getattr(comm, "transport", None)
        except CollectiveError as e:
            out["error"] = str(e)
        out["seconds"] = time.monotonic() - t0
        print(json.dumps(out), flush=True)


class _Ranks:
    """Worker subprocesses 1..n-1 (or any ranks), with their stdout as JSON lines."""

    def __init__(self, ranks, scenarios):
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from test_tp_comm import _rank_main; "
                "_rank_main(int(sys.argv[1]), sys.argv[2])")
        self.procs = {r: subprocess.Popen([sys.executable, "-c", code, str(r), json.dumps(scenarios)], cwd=ROOT,
                                          env=env, stdout=subprocess.PIPE, text=True) for r in ranks}
        self.lines = {r: queue.Queue() for r in ranks}
        for r, p in self.procs.items():
            threading.Thread(target=self._pump, args=(p, self.lines[r]), daemon=True).start()

    @staticmethod
    def _pump(proc, q):
        for line in proc.stdout:
            q.put(json.loads(line))
        q.put(None)

    def next(self, rank, timeout=60.0) -> dict:
        item = self.lines[rank].get(timeout=timeout)
        assert item is not None, f"rank {rank} exited early with {self.procs[rank].wait()}"
        return item

    def finish(self, timeout=30.0) -> dict:
        return {r: p.wait(timeout=timeout) for r, p in self.procs.items()}

    def kill(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- star and gloo with real processes

def _sweep_scenarios(keys: Path):
    sc = []
    for world in (2, 3, 4):
        sc.append({"name": f"star-w{world}", "backend": "star", "world": world, "seed": world})
    sc += [{"name": "star-w3-fp16", "backend": "star", "world": 3, "payload": "fp16", "seed": 5},
           {"name": "star-w4-int8", "backend": "star", "world": 4, "payload": "int8", "seed": 6},
           {"name": "star-w2-curve", "backend": "star", "world": 2, "curve_keys": str(keys), "seed": 7}]
    for world in (2, 3, 4):
        sc.append({"name": f"gloo-w{world}", "backend": "gloo", "world": world, "seed": 10 + world})
    for s in sc:
        s["port"] = free_port()
    return sc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Every scenario with ranks 1..3 as subprocesses and this process as rank 0."""
    scenarios = _sweep_scenarios(make_keys(tmp_path_factory.mktemp("keys")))
    ranks = _Ranks((1, 2, 3), scenarios)
    results = {}
    try:
        for sc in scenarios:
            config = _config(sc["world"], sc["port"], sc["backend"], sc.get("payload", "fp32"),
                             curve_keys=sc.get("curve_keys"), join_timeout_s=60.0)
            with make_collective(config, 0) as comm:
                master = _play(comm, sc["seed"])
                traffic = (comm.bytes_sent, comm.bytes_received)
            workers = {r: ranks.next(r) for r in range(1, sc["world"])}
            results[sc["name"]] = (sc, master, workers, traffic)
        assert ranks.finish() == {1: 0, 2: 0, 3: 0}
    finally:
        ranks.kill()
    return results


def _reference(seed, world, op, shape):
    total = _partial(seed, 0, op, shape).clone()
    for r in range(1, world):  # the fp32 sum in rank order
        total += _partial(seed, r, op, shape)
    return total


def _check_same_everywhere(sc, master, workers):
    for r, out in workers.items():
        assert out["error"] is None, (sc["name"], r, out["error"])
        assert [x["digest"] for x in out["records"]] == [x["digest"] for x in master], (sc["name"], r)
        bcasts = [(x["cmd"], x["step"], x["steps_from"], x["dtype"]) for x in out["records"] if "cmd" in x]
        assert bcasts == [(RESET, 0, -1, None), (STEP, 3, 2, "torch.float32"), (STEP, 8, -1, "torch.int64"),
                          (SHUTDOWN, 0, -1, None)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_star_fp32_is_the_rank_order_sum_bitwise_on_every_rank(sweep, world):
    sc, master, workers, traffic = sweep[f"star-w{world}"]
    _check_same_everywhere(sc, master, workers)
    for op, (what, _, _, shape) in enumerate(_ops(sc["seed"])):
        if what == "ar":
            assert torch.equal(master[op]["y"], _reference(sc["seed"], world, op, shape))
    assert traffic[0] > 0 and traffic[1] > 0 and all(w["bytes"][0] > 0 for w in workers.values())


@pytest.mark.parametrize("name", ["star-w2", "star-w3", "star-w4", "star-w2-curve", "gloo-w2", "gloo-w3", "gloo-w4"])
def test_float64_partials_are_summed_exactly_in_float64_on_every_backend(sweep, name):
    """What the quantized ranks send (parallelize.exact_partials): float64 sums of bf16 values, which
    every backend (star in rank order, through shared memory or ZeroMQ; gloo's ring) adds exactly."""
    sc, master, workers, _ = sweep[name]
    _check_same_everywhere(sc, master, workers)
    for op, (what, _, _, shape) in enumerate(_ops(sc["seed"])):
        if what == "ar64":
            exact = sum(_partial64(sc["seed"], r, op, shape) for r in reversed(range(sc["world"])))
            assert master[op]["y"].dtype == torch.float64 and torch.equal(master[op]["y"], exact)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract unix sockets are Linux-only")
def test_local_workers_reach_the_master_through_its_unix_socket(sweep):
    for name, (sc, _, workers, _) in sweep.items():
        if sc["backend"] == "star":  # CURVE included: it is a ZMTP mechanism, the same on any transport
            assert {w["transport"] for w in workers.values()} == {"ipc"}, name


def test_world_size_one_is_a_no_op():
    comm = make_collective(TPConfig(1, "127.0.0.1:1"), 0)
    x = torch.randn(2, 3)
    assert isinstance(comm, LocalCollective) and comm.allreduce(x, 0, ATTN) is x
    assert comm.broadcast(STEP, x, step=4) == (STEP, x) and comm.last_step == 4


@pytest.mark.parametrize("name,payload", [("star-w3-fp16", "fp16"), ("star-w4-int8", "int8")])
def test_compressed_payloads_stay_within_their_bounds_and_agree_across_ranks(sweep, name, payload):
    sc, master, workers, _ = sweep[name]
    _check_same_everywhere(sc, master, workers)
    for op, (what, _, _, shape) in enumerate(_ops(sc["seed"])):
        if what != "ar":
            continue
        parts = [_partial(sc["seed"], r, op, shape) for r in range(sc["world"])]
        exact, y = _reference(sc["seed"], sc["world"], op, shape), master[op]["y"]
        if payload == "fp16":
            bound = 2.0 ** -11 * (sum(p.abs() for p in parts) + exact.abs()) * 1.01 + 1e-6
        else:
            rowmax = lambda t: t.abs().amax(dim=-1, keepdim=True)  # noqa: E731
            bound = (sum(rowmax(p) for p in parts) * 1.01 + rowmax(exact)) / 254 * 1.01 + 1e-6
        assert torch.all((y - exact).abs() <= bound), (name, op, ((y - exact).abs() / bound).max())
        assert not torch.equal(y, exact)  # the payload really was compressed


def test_star_with_curve_keys_works(sweep):
    sc, master, workers, _ = sweep["star-w2-curve"]
    _check_same_everywhere(sc, master, workers)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_matches_the_rank_order_sum_within_1e_6(sweep, world):
    sc, master, workers, _ = sweep[f"gloo-w{world}"]
    _check_same_everywhere(sc, master, workers)
    for op, (what, _, _, shape) in enumerate(_ops(sc["seed"])):
        if what == "ar":
            assert torch.allclose(master[op]["y"], _reference(sc["seed"], world, op, shape), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- faults

def test_a_killed_worker_fails_the_master_within_the_deadline_naming_it():
    port = free_port()
    sc = [{"name": "kill", "backend": "star", "world": 3, "port": port, "seed": 1, "die_rank": 2, "die_after": 2}]
    ranks = _Ranks((1, 2), sc)
    try:
        comm = make_collective(_config(3, port, timeout_s=2.0, join_timeout_s=60.0), 0)
        ops = _ops(1)
        for op in range(4):  # RESET, STEP, then two allreduces; rank 2 dies after its second
            what, a, b, c = ops[op]
            comm.broadcast(a, b, *c) if what == "bcast" else comm.allreduce(_partial(1, 0, op, c), a, b)
        comm.broadcast(*ops[4][1:3], *ops[4][3])
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match=r"rank 2\b"):
            comm.allreduce(_partial(1, 0, 5, ops[5][3]), 1, ATTN)
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(CollectiveError, match="broken"):  # stays failed, never hangs
            comm.allreduce(torch.zeros(3), 1, MLP)
        comm.close()
        rank1 = ranks.next(1)
        assert "master aborted" in rank1["error"] and "rank 2" in rank1["error"]
        assert ranks.finish() == {1: 0, 2: -signal.SIGKILL}
    finally:
        ranks.kill()


def test_workers_exit_cleanly_when_the_master_goes_away():
    port = free_port()
    sc = {"name": "crash", "backend": "star", "world": 2, "port": port, "seed": 1,
          "roles": {"0": "master_then_hang", "1": "wait_forever"}}
    ranks = _Ranks((0, 1), [sc])
    try:
        assert ranks.next(0)["ready"] and ranks.next(1)["got"] == STEP
        ranks.procs[0].kill()  # the master process dies without a word
        t0 = time.monotonic()
        out = ranks.next(1, timeout=10)
        assert "lost the master" in out["error"] and time.monotonic() - t0 < 5.0
        assert ranks.procs[1].wait(timeout=10) == 0
    finally:
        ranks.kill()


class _FakeWorker:
    """A raw DEALER that speaks the wire format by hand (or sends garbage)."""

    def __init__(self, port, rank=1, world=2, hello=True):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.rank, self.world = rank, world
        if hello:
            self.send(Header(Msg.HELLO, rank, world, DType.F32, -1, 0, 0, DType.BYTES, (0,)), b"")

    def send(self, header, *payload):
        self.sock.send_multipart([header.pack() if isinstance(header, Header) else header, *payload])

    def recv(self, timeout=5.0):
        assert self.sock.poll(int(timeout * 1000)), "no message from the master"
        frames = self.sock.recv_multipart()
        return unpack(frames[0]), frames[1:]

    def partial(self, seq, layer, kind, x: np.ndarray):
        self.send(Header(Msg.PARTIAL, self.rank, self.world, kind, layer, 0, seq, DType.F32, x.shape), x)

    def close(self):
        self.sock.close()
        self.ctx.term()


def test_malformed_messages_are_rejected_and_the_master_survives():
    port, result = free_port(), {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "master", StarMaster(_config(2, port, join_timeout_s=20.0))))
    thread.start()
    stranger = _FakeWorker(port, hello=False)
    stranger.send(b"garbage, not a header")
    h, reason = stranger.recv()  # while the master waits for rank 1
    assert h.type == Msg.REJECT and b"malformed join message" in reason[0]
    worker = _FakeWorker(port)
    thread.join(20)
    master = result["master"]
    try:
        assert worker.recv()[0].type == Msg.WELCOME
        x = np.ones((1, 4), np.float32)
        stranger.send(b"\x00" * HEADER.size)  # garbage from a stranger during an allreduce is dropped
        late = threading.Timer(0.3, worker.partial, (1, 0, ATTN, x))  # the partial comes after the garbage
        late.start()
        assert torch.equal(master.allreduce(torch.ones(1, 4), 0, ATTN), torch.full((1, 4), 2.0))
        late.join()
        assert worker.recv()[0].type == Msg.SUM and master.rejected == 2
        worker.send(b"EFTP" + b"\x07" * (HEADER.size - 4), x)  # a joined worker sends a bad header
        with pytest.raises(CollectiveError, match="rank 1 sent a malformed header: header version"):
            master.allreduce(torch.ones(1, 4), 0, MLP)
        assert worker.recv()[0].type == Msg.ABORT  # the others are told at once
    finally:
        master.close()
        worker.close()
        stranger.close()


@pytest.mark.parametrize("seq,layer,kind", [(2, 0, ATTN), (1, 5, ATTN), (1, 0, MLP)])
def test_an_out_of_order_partial_is_detected(seq, layer, kind):
    port = free_port()
    worker = _FakeWorker(port)
    master = StarMaster(_config(2, port, join_timeout_s=20.0))
    try:
        worker.recv()
        worker.partial(seq, layer, kind, np.ones((1, 4), np.float32))
        with pytest.raises(CollectiveError, match="rank 1 is out of sync"):
            master.allreduce(torch.ones(1, 4), 0, ATTN)
    finally:
        master.close()
        worker.close()


def test_a_hung_worker_fails_the_master_after_timeout_s():
    port = free_port()
    worker = _FakeWorker(port)
    master = StarMaster(_config(2, port, timeout_s=1.0, join_timeout_s=20.0))
    try:
        worker.recv()
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match=r"rank\(s\) \[1\] sent no partial for layer 3 kind 1"):
            master.allreduce(torch.ones(4), 3, MLP)
        assert 0.9 < time.monotonic() - t0 < 5.0
    finally:
        master.close()
        worker.close()


def test_duplicate_and_out_of_range_ranks_are_rejected_at_join():
    port, result = free_port(), {}
    first, dup, wrong = _FakeWorker(port, world=3), _FakeWorker(port, world=3), _FakeWorker(port, rank=5, world=3)
    thread = threading.Thread(target=lambda: result.setdefault(
        "master", StarMaster(_config(3, port, join_timeout_s=20.0))))
    thread.start()
    last = None
    try:
        replies = [peer.recv() for peer in (first, dup, wrong)]  # while the master still waits for rank 2
        kinds = sorted(h.type for h, _ in replies)
        assert kinds == [Msg.WELCOME, Msg.REJECT, Msg.REJECT]
        reasons = b" ".join(f[0] for h, f in replies if h.type == Msg.REJECT)
        assert b"rank 1 has already joined" in reasons and b"rank 5 is out of range" in reasons
        last = _FakeWorker(port, rank=2, world=3)
        assert last.recv()[0].type == Msg.WELCOME
        thread.join(10)
        assert result["master"].rejected == 2
    finally:
        thread.join(30)
        if "master" in result:
            result["master"].close()
        for p in (first, dup, wrong, last):
            if p is not None:
                p.close()


def test_a_worker_detects_an_out_of_order_message_from_the_master():
    port = free_port()
    ctx = zmq.Context()
    fake_master = ctx.socket(zmq.ROUTER)
    fake_master.bind(f"tcp://127.0.0.1:{port}")
    result = {}

    def worker():
        try:
            with StarWorker(_config(2, port, join_timeout_s=10.0), 1) as comm:
                comm.broadcast(0)
        except CollectiveError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert fake_master.poll(10_000)
        identity, hello, _ = fake_master.recv_multipart()
        assert unpack(hello).type == Msg.HELLO and unpack(hello).rank == 1
        fake_master.send_multipart([identity, Header(Msg.WELCOME, 0, 2).pack()])
        fake_master.send_multipart([identity, Header(Msg.BCAST, 0, 2, STEP, -1, 0, 7).pack()])  # seq 7, not 1
        thread.join(10)
        assert "out of sync with the master" in result["error"] and "BCAST seq 7" in result["error"]
        assert fake_master.poll(5000)
        assert unpack(fake_master.recv_multipart()[1]).type == Msg.BYE  # it tells the master why
    finally:
        fake_master.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("worker_keys", ["none", "other"])
def test_a_worker_without_the_curve_keys_cannot_join(tmp_path, worker_keys):
    keys = make_keys(tmp_path / "keys")
    other = make_keys(tmp_path / "other") if worker_keys == "other" else None
    port, result = free_port(), {}

    def master():
        t0 = time.monotonic()
        try:
            StarMaster(_config(2, port, curve_keys=keys, join_timeout_s=3.0)).close()
        except CollectiveError as e:
            result["master"] = (str(e), time.monotonic() - t0)

    thread = threading.Thread(target=master)
    thread.start()
    t0 = time.monotonic()
    with pytest.raises(CollectiveError, match="no WELCOME .* within 2 s"):
        StarWorker(_config(2, port, curve_keys=other, join_timeout_s=2.0), 1)
    assert time.monotonic() - t0 < 4.0
    thread.join(10)
    message, seconds = result["master"]
    assert "rank(s) [1] did not join within 3 s" in message and "CURVE" in message and seconds < 6.0


# ---------------------------------------------------------------- gather (stats travel this way)

@pytest.mark.parametrize("name", ["star-w2", "star-w3", "star-w4", "star-w3-fp16", "star-w4-int8", "star-w2-curve",
                                  "gloo-w2", "gloo-w3", "gloo-w4"])
def test_gather_brings_every_ranks_bytes_to_the_master_in_rank_order(sweep, name):
    sc, master, workers, _ = sweep[name]
    [got] = [r["gathered"] for r in master if "gathered" in r]
    assert got == [_gathered(sc["seed"], r) for r in range(sc["world"])]
    assert all(r["gathered"] is None for w in workers.values() for r in w["records"] if "gathered" in r)


def test_local_collective_gathers_its_own_bytes():
    assert LocalCollective().gather(b'{"rank": 0}') == [b'{"rank": 0}']


@pytest.mark.parametrize("sent,error", [
    (None, r"rank\(s\) \[1\] sent no gather payload \(seq 1\) within 1 s"),
    ((DType.F32, (2,), np.ones(2, np.float32).tobytes()), "rank 1 sent a gather payload of F32 shape \\(2,\\)"),
    ((DType.BYTES, (2 << 20,), b"tiny"), "expected at most 1048576 bytes"),
])
def test_a_gather_from_a_silent_or_malformed_worker_fails_naming_it(sent, error):
    port = free_port()
    worker = _FakeWorker(port)
    master = StarMaster(_config(2, port, timeout_s=1.0, join_timeout_s=20.0))
    try:
        assert worker.recv()[0].type == Msg.WELCOME
        if sent is not None:
            dtype, shape, data = sent
            worker.send(Header(Msg.GATHER, 1, 2, 0, -1, 0, 1, dtype, shape), data)
        with pytest.raises(CollectiveError, match=error):
            master.gather(b"{}")
        assert worker.recv()[0].type == Msg.ABORT  # the others are told at once
    finally:
        master.close()
        worker.close()
