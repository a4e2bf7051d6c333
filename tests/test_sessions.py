"""The cloud context manager: TTL expiry, memory-budget LRU eviction, and FAILED_PRECONDITION
for a session that is gone, both on the store itself and through a real server."""
import grpc
import numpy as np
import pytest

from cloud_service.sessions import SessionStore
from edge_runtime.client.oip_client import OipClient


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_ttl_expiry():
    clock = FakeClock()
    store = SessionStore(ttl_s=10, max_bytes=1 << 20, clock=clock)
    store.begin(1)
    store.begin(2)
    clock.now = 6
    store.get(2)  # touching 2 keeps it alive
    clock.now = 12
    assert store.expire_idle() == 1 and len(store) == 1
    with pytest.raises(Exception) as err:
        store.get(1)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired after 10 s idle" in err.value.message
    assert store.get(2).sequence_id == 2


def test_memory_budget_evicts_least_recently_used():
    store = SessionStore(ttl_s=100, max_bytes=300)
    for sid in (1, 2, 3):
        session = store.begin(sid)
        session.state["kv"] = np.zeros(100, np.uint8)
        store.update(session)
    assert store.total_bytes == 300
    store.get(1)                                  # 1 is now the most recently used
    session = store.begin(4)
    session.state["kv"] = np.zeros(100, np.uint8)
    store.update(session)                         # over budget: 2 (LRU) goes
    assert store.total_bytes == 300 and store.evicted == 1
    with pytest.raises(Exception) as err:
        store.get(2)
    assert "evicted" in err.value.message and "sequence_start=true" in err.value.message
    for sid in (1, 3, 4):
        store.get(sid)


def test_growing_state_is_accounted():
    store = SessionStore(ttl_s=100, max_bytes=1000)
    session = store.begin("a")
    for n in (10, 500, 50):
        session.state["kv"] = np.zeros(n, np.uint8)
        store.update(session)
        assert store.total_bytes == n


def test_unknown_and_ended_sessions():
    store = SessionStore(ttl_s=100, max_bytes=1000)
    with pytest.raises(Exception) as err:
        store.get(99)
    assert "unknown" in err.value.message
    store.begin(5)
    store.end(5)
    with pytest.raises(Exception):
        store.get(5)
    assert store.total_bytes == 0


# --- through the server: the "counter" model keeps a running sum per sequence (float64 x 4) ---

@pytest.fixture(scope="module")
def client(server):
    with OipClient(server.address, timeout_s=30) as c:
        yield c


def step(client, sid, x, start=False, end=False):
    params = {"sequence_id": sid}
    if start:
        params["sequence_start"] = True
    if end:
        params["sequence_end"] = True
    return client.infer("counter", {"x": np.full(4, x, np.float64)}, parameters=params)["total"]


def test_sequences_keep_separate_state(client):
    assert step(client, 11, 1.0, start=True)[0] == 1.0
    assert step(client, 12, 10.0, start=True)[0] == 10.0
    assert step(client, 11, 2.0)[0] == 3.0
    assert step(client, "text-id", 5.0, start=True)[0] == 5.0   # string ids work too
    assert step(client, 12, 1.0, end=True)[0] == 11.0
    with pytest.raises(grpc.RpcError) as err:
        step(client, 12, 1.0)                                    # ended
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_restart_resets_state(client):
    step(client, 21, 4.0, start=True)
    assert step(client, 21, 1.0, start=True)[0] == 1.0


def test_eviction_under_memory_budget_then_resend(client):
    # Each step keeps 32 B of running total plus 32 B of history; the budget is 4096 B.
    step(client, 31, 1.0, start=True)
    for sid in range(100, 180):                                  # other sessions push 31 out
        step(client, sid, 1.0, start=True)
    with pytest.raises(grpc.RpcError) as err:
        step(client, 31, 1.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "evicted" in err.value.details()
    assert step(client, 31, 1.0, start=True)[0] == 1.0           # the client resends its context
    assert step(client, 31, 1.0)[0] == 2.0


def test_unknown_session(client):
    with pytest.raises(grpc.RpcError) as err:
        step(client, 424242, 1.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown" in err.value.details()
