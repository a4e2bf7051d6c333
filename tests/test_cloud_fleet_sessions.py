"""Cloud serving for a fleet (issue 21, item 6): concurrent sessions of the llm_continuation backend
share one packed forward (split.llama.packed through the model's StepBatcher), and every session
gets the tokens it gets alone. Real devices (edge_runtime.collab.device.CollabLlm) against a real
cloud-service subprocess on the tiny random Llama of llm_models.py: collaborative (exact,
propagated and token-id catch-up) and speculative verification; a malformed request inside a busy
batch; and 1,000 concurrent sessions under a memory budget that forces evictions and resends."""
import random
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from cloud_service.config import ConfigError
from cloud_service.repository import Repository
from edge_runtime.client.oip_client import OipClient
from edge_runtime.collab.device import CollabLlm
from edge_runtime.collab.speculative import Draft
from edgefold_proto import pb
from llm_models import K, L, make_model, write_model
from server_process import ServerProcess, free_port
from split.llama import KVCache, generate, load_llama
from split.llama.exits import continue_layers
from split.llama.packed import Segment, packed_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 8, 7], [60, 61, 62, 63], [1], [33, 44, 55, 66, 77, 88, 21, 2],
           [12, 13], [90, 3, 4, 5, 6], [40, 41, 42, 43, 44, 45, 46]]
N_NEW = 10
V = 97
FLEET_BUDGET = 24_000_000   # bytes: ~700 of the 1,000 sessions' caches (~34 KB each) fit
ONE_THREAD = "intra_op_thread_count = 1\n"   # the machine is shared: no spinning thread pools


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ee_lm")
    make_model(model_dir)
    repo = tmp_path_factory.mktemp("fleet_repo")
    write_model(repo, "llm", model_dir, K, extra=ONE_THREAD)
    write_model(repo, "llm_prop", model_dir, K, "propagated", extra=ONE_THREAD)
    write_model(repo, "llm_tok", model_dir, K, "tokens", extra=ONE_THREAD)
    write_model(repo, "llm_full", model_dir, 0, extra=ONE_THREAD)
    write_model(repo, "llm_fleet", model_dir, K, max_state_bytes=FLEET_BUDGET, extra=ONE_THREAD)
    write_model(repo, "llm_one", model_dir, K, extra=ONE_THREAD + "max_batch_rows = 1\n")   # unbatched
    metrics_port = free_port()
    proc = ServerProcess(repo, "--metrics-port", str(metrics_port))
    yield model_dir, proc, metrics_port
    proc.kill()


@pytest.fixture(scope="module")
def threshold(fleet):
    """The exit head's median confidence over the prompts' generations: the device and the cloud
    each decide a share of the tokens."""
    e = CollabLlm(fleet[0], mode="standalone")
    return float(np.median([c for p in PROMPTS for c in e.generate(p, N_NEW).confidences]))


def device(fleet, mode, model, threshold, **kw):
    cloud_model = {"cloud_model": model} if mode == "collaborative" else {"cloud_full_model": model}
    return CollabLlm(fleet[0], mode=mode, cloud=fleet[1].address, threshold=threshold, timeout_s=30.0,
                     **cloud_model, **kw)


def batch_sizes(fleet, model) -> dict[int, int]:
    """Executions per batch size (sessions per packed forward) in the model's statistics."""
    with OipClient(fleet[1].address) as client:
        stats = client.call("ModelStatistics", pb.ModelStatisticsRequest(name=model)).model_stats[0]
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def run_together(fns) -> list:
    """Call every fn at once (a thread each, started together); their results in order."""
    out, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns))

    def run(i):
        try:
            barrier.wait(30)
            out[i] = fns[i]()
        except BaseException as err:   # reported below, never hidden
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


@torch.no_grad()
def oracle(model_dir, prompt):
    """A drafter that proposes the full model's greedy continuation of `prompt` (all accepted)."""
    ref = list(generate(load_llama(model_dir), prompt, 2 * N_NEW))

    def drafter(ctx, n):
        j = len(ctx.history) - len(prompt)
        return Draft(ref[j:j + n])
    return drafter


# --- the packed forward, in this process ------------------------------------------------------
@torch.no_grad()
def test_packed_rows_give_each_session_what_it_gets_alone(fleet):
    """Hidden-state segments entering at layer K (some rows exited: K/V only) and token-id segments
    scoring several rows, packed in one forward, against each run alone (continue_layers, the
    plain model) on a copy of its cache: same logits (to rounding), argmax and cache."""
    torch.manual_seed(1)
    tail = load_llama(fleet[0], layers=range(K, L), with_embed=False)
    full = load_llama(fleet[0])
    history = torch.randn(1, 4, 64)

    def primed():
        cache = KVCache()
        continue_layers(tail, history, [False, True, False, False], 0, cache, range(K, L))
        return cache

    cases = [(torch.randn(5, 64), [False] * 5, 0, KVCache()),
             (torch.randn(3, 64), [True, True, False], 4, primed()),
             (torch.randn(1, 64), [False], 4, primed()),
             (torch.randn(6, 64), [False, True, False, True, True, False], 0, KVCache())]
    segments = [Segment(None, start, cache, h, exited if any(exited) else None) for h, exited, start, cache in cases]
    alone = []
    for h, exited, start, _ in cases:
        cache = primed() if start else KVCache()
        out, _, _, _ = continue_layers(tail, h[None], exited, start, cache, range(K, L))
        alone.append((tail.head(out)[0, -1], cache))
    for got, seg, (want, cache) in zip(packed_logits(tail, segments), segments, alone):
        assert got.shape == (1, V) and int(got[0].argmax()) == int(want.argmax())
        assert torch.allclose(got[0], want, atol=1e-5)
        for i in range(K, L):
            n = cache.lengths[i]
            assert seg.cache.lengths[i] == n and torch.equal(seg.cache.pos[i][:n], cache.pos[i][:n])
            assert torch.allclose(seg.cache.k[i][:, :, :n], cache.k[i][:, :, :n], atol=1e-5)
    ids = [[3, 9, 27, 81, 5], [7, 7], [60]]
    scored = packed_logits(full, [Segment(t, 0, KVCache(), scored=min(3, len(t))) for t in ids])
    for t, got in zip(ids, scored):
        want = full(torch.tensor([t]))[0, -min(3, len(t)):]
        assert got.shape == want.shape and torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.allclose(got, want, atol=1e-5)


# --- concurrent sessions against the real cloud -----------------------------------------------
MODES = {"exact": ("collaborative", "llm"), "propagated": ("collaborative", "llm_prop"),
         "token-id": ("collaborative", "llm_tok"), "speculative": ("speculative", "llm_full")}


@pytest.mark.parametrize("case", list(MODES))
def test_concurrent_sessions_are_batched_and_each_equals_its_solo_run(fleet, threshold, case):
    mode, model = MODES[case]

    def make(i):   # speculative: every other device drafts the full model's own tokens (kept), the
        kw = {"gamma": 3}   # rest with the random exit head (mostly cut back): rollback per session
        if mode == "speculative" and i % 2 == 0:
            kw["drafter"] = oracle(fleet[0], PROMPTS[i])
        return device(fleet, mode, model, threshold, **kw)

    solo = [make(i).generate(p, N_NEW) for i, p in enumerate(PROMPTS)]   # one at a time
    assert {"edge" if mode == "collaborative" else "draft", "cloud"} <= {s for r in solo for s in r.sources}
    devices = [make(i) for i in range(len(PROMPTS))]   # as fresh as the solo ones
    before = batch_sizes(fleet, model)
    together = run_together([lambda d=d, p=p: d.generate(p, N_NEW) for d, p in zip(devices, PROMPTS)])
    after = batch_sizes(fleet, model)
    for alone, r in zip(solo, together):
        assert r.tokens == alone.tokens and r.sources == alone.sources and not r.degraded
        assert r.counters.resends == 0
    batched = {size: n - before.get(size, 0) for size, n in after.items() if size > 1 and n > before.get(size, 0)}
    assert batched, f"no packed forward carried two sessions: {after}"


def test_max_batch_rows_one_runs_every_request_alone(fleet, threshold):
    """The unbatched twin the benchmark compares against: same tokens, one session per forward."""
    devices = [device(fleet, "collaborative", "llm_one", threshold) for _ in PROMPTS[:4]]
    solo = [d.generate(p, N_NEW) for d, p in zip(devices, PROMPTS)]
    together = run_together([lambda d=d, p=p: d.generate(p, N_NEW) for d, p in zip(devices, PROMPTS)])
    assert [r.tokens for r in together] == [r.tokens for r in solo]
    assert set(batch_sizes(fleet, "llm_one")) == {1}


def test_batching_bounds_are_checked_when_the_model_loads(fleet, tmp_path):
    for name, line in (("no_rows", "max_batch_rows = 0"), ("neg_gather", "gather_microseconds = -1"),
                       ("text_rows", 'max_batch_rows = "many"')):
        write_model(tmp_path, name, fleet[0], K, extra=line + "\n")
        with pytest.raises(ConfigError, match=f"parameters.{line.split()[0]}"):
            Repository(tmp_path).build(name)


def test_a_bad_request_in_a_busy_batch_fails_alone(fleet, threshold):
    devices = [device(fleet, "speculative", "llm_full", threshold, gamma=3) for _ in PROMPTS]
    solo = [d.generate(p, N_NEW) for d, p in zip(devices, PROMPTS)]
    def ids(*t):
        return np.array(t, np.int64)
    good = {"input_ids": ids(4, 5), "start": ids(3), "exited": np.zeros(2, np.uint8)}   # positions 3, 4
    bad = [({**good, "start": ids(9)}, "start"),
           ({**good, "input_ids": ids(4, V)}, "input_ids"),
           ({**good, "draft_len": ids(2)}, "draft_len"),
           ({**good, "draft_len": ids(1), "draft_probs": np.full((1, V), 1 / V, np.float32)}, "draft_probs"),
           ({**good, "exited": np.zeros(3, np.uint8)}, "exited"),
           ({**good, "temperature": np.array([-1.0], np.float32)}, "temperature")]
    stop, rejected, sid = threading.Event(), [], 4242

    with OipClient(fleet[1].address) as client:
        def call(inputs, begin=False):
            return client.infer("llm_full", inputs, parameters={"sequence_id": sid,
                                                                 **({"sequence_start": True} if begin else {})})

        assert call({"input_ids": ids(1, 2, 3), "start": ids(0), "exited": np.zeros(3, np.uint8)},
                    begin=True)["work"][4] == 3

        def attack():
            while not stop.is_set():
                for inputs, name in bad:
                    with pytest.raises(grpc.RpcError) as err:
                        call(inputs)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.value.details()
                    rejected.append(name)

        attacker = threading.Thread(target=attack)
        attacker.start()
        try:
            before = batch_sizes(fleet, "llm_full")
            together = run_together([lambda d=d, p=p: d.generate(p, N_NEW) for d, p in zip(devices, PROMPTS)])
            after = batch_sizes(fleet, "llm_full")
        finally:
            stop.set()
            attacker.join(30)
        assert [r.tokens for r in together] == [r.tokens for r in solo]
        assert any(n > before.get(size, 0) for size, n in after.items() if size > 1)
        assert len(rejected) >= len(bad)
        ok = call(good)   # the attacked session is intact: positions 3, 4 follow 0..2
        assert ok["work"][4] == 5 and ok["next_token"][0] == int(
            load_llama(fleet[0])(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1].argmax())


# --- a fleet: 1,000 sessions under a memory budget --------------------------------------------
class RecordingClient(OipClient):
    """A real OipClient that keeps the details of every FAILED_PRECONDITION it gets."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.failed: list[str] = []

    def call(self, rpc, request, timeout_s=None):
        try:
            return super().call(rpc, request, timeout_s)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self.failed.append(err.details())
            raise


def session_gauges(metrics_port: int, model: str) -> tuple[float, float]:
    """(sessions, session bytes) the server publishes for `model` (updated once a second)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("edgefold_sessions{", "edgefold_session_bytes{")) and f'model="{model}"' in line:
            values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return values.get("edgefold_sessions", 0.0), values.get("edgefold_session_bytes", 0.0)


def test_a_thousand_sessions_within_the_budget_resend_and_lose_nothing(fleet, threshold):
    """1,000 conversations of two turns each, driven by 16 devices (62-63 conversations each, turn by
    turn in shuffled order): all 1,000 sessions are open at once, more than the budget holds, so
    the least recently used are evicted and their devices resend. Every token equals the solo run's."""
    n_sessions, n_workers, turn_tokens = 1000, 16, 3
    ref = device(fleet, "collaborative", "llm_fleet", threshold)
    want = []
    for p in PROMPTS:   # each script alone: two turns of one conversation
        first = ref.generate(p, turn_tokens)
        want.append((first.tokens, ref.generate([p[0]], turn_tokens, conversation=first.conversation).tokens))
    got: dict[int, list] = {}
    counts = {"resends": 0, "requests": 0, "edge": 0, "cloud": 0}
    failed: list[str] = []
    lock = threading.Lock()
    gauges, done = [], threading.Event()

    def worker(w: int):
        client = RecordingClient(fleet[1].address, timeout_s=30.0)
        e = CollabLlm(fleet[0], mode="collaborative", client=client, cloud_model="llm_fleet", threshold=threshold,
                      timeout_s=30.0)
        mine = list(range(w, n_sessions, n_workers))
        convs, results = {}, {}
        for turn in (0, 1):
            random.Random(w * 10 + turn).shuffle(mine)
            for i in mine:
                p = PROMPTS[i % len(PROMPTS)]
                r = e.generate(p, turn_tokens) if turn == 0 else \
                    e.generate([p[0]], turn_tokens, conversation=convs[i])
                convs[i] = r.conversation
                results.setdefault(i, []).append(r)
        with lock:
            for i, (a, b) in results.items():
                got[i] = [a.tokens, b.tokens, a.degraded or b.degraded]
                for r in (a, b):
                    counts["resends"] += r.counters.resends
                    counts["requests"] += r.counters.requests
                    counts["edge"] += r.sources.count("edge")
                    counts["cloud"] += r.sources.count("cloud")
            failed.extend(client.failed)
        e.close()

    def watch():
        while not done.wait(0.25):
            gauges.append(session_gauges(fleet[2], "llm_fleet"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_together([lambda w=w: worker(w) for w in range(n_workers)])
    finally:
        done.set()
        watcher.join(10)
    assert len(got) == n_sessions
    wrong = [i for i, (a, b, degraded) in got.items() if (a, b) != want[i % len(PROMPTS)] or degraded]
    assert not wrong, f"{len(wrong)} sessions differ from their solo run, e.g. {wrong[:5]}"
    assert counts["edge"] > 0 and counts["cloud"] > 0
    assert counts["resends"] > 0 and len(failed) == counts["resends"]
    assert all("evicted to keep session memory within" in f for f in failed), failed[:3]
    assert gauges and max(b for _, b in gauges) <= FLEET_BUDGET
    assert max(s for s, _ in gauges) > 100
    sizes = batch_sizes(fleet, "llm_fleet")
    assert max(sizes) > 1, sizes
