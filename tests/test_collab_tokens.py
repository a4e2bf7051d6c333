"""Token-id catch-up (issue 21, item 2): a cloud model with catch_up = "tokens" holds layers [0, L)
and takes input_ids; the device reads that from the model's metadata and sends token ids instead
of layer-k states. Tested against a real cloud-service subprocess and the exact catch-up mode."""
import numpy as np
import pytest
import torch

from edge_runtime.client.oip_client import OipClient
from edge_runtime.collab.device import CollabLlm
from llm_models import K, L, make_model, write_model
from server_process import ServerProcess
from split.llama import generate, load_llama

PROMPT = [5, 17, 3, 42, 8, 11]
N_NEW = 12


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ee_lm")
    make_model(model_dir)
    repo = tmp_path_factory.mktemp("llm_repo")
    write_model(repo, "llm", model_dir, K)
    write_model(repo, "llm_tok", model_dir, K, "tokens")
    write_model(repo, "llm_tok_tight", model_dir, K, "tokens", max_state_bytes=100_000)  # one ~66 KB session fits
    proc = ServerProcess(repo)
    yield model_dir, proc
    proc.kill()


def edge(llm, **kw):
    return CollabLlm(llm[0], mode="collaborative", cloud=llm[1].address, **kw)


class CountingClient(OipClient):
    """A real OipClient that counts the RPCs it makes."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls: dict[str, int] = {}

    def call(self, rpc, request, timeout_s=None):
        self.calls[rpc] = self.calls.get(rpc, 0) + 1
        return super().call(rpc, request, timeout_s)


@pytest.mark.parametrize("where", ["median", "all_cloud"])
def test_token_catch_up_gives_the_exact_modes_tokens(llm, where):
    confs = edge(llm, threshold=0.0).generate(PROMPT, N_NEW).confidences
    threshold = float(np.median(confs)) if where == "median" else 1.0
    exact = edge(llm, threshold=threshold, wire="fp32").generate(PROMPT, N_NEW)
    r = edge(llm, threshold=threshold, cloud_model="llm_tok").generate(PROMPT, N_NEW)
    assert r.tokens == exact.tokens and r.sources == exact.sources
    if where == "all_cloud":
        with torch.no_grad():
            assert r.tokens == list(generate(load_llama(llm[0]), PROMPT, N_NEW))
    else:
        assert {"edge", "cloud"} <= set(r.sources)
    c = r.counters
    assert c.states_sent == exact.counters.states_sent and c.resends == 0 and c.recomputed_states == 0
    assert c.cloud_layer_evals == c.states_sent * L and c.cloud_kv_evals == 0   # every row through layers [0, L)
    assert exact.counters.cloud_layer_evals == c.states_sent * (L - K)
    assert c.bytes_sent == 8 * c.states_sent + 8 * c.requests + c.states_sent      # ids, start, exited flags
    assert c.round_trips == c.requests
    assert not r.conversation.kept                                                  # no states kept for the cloud


def test_metadata_is_asked_once_per_client(llm):
    with CountingClient(llm[1].address) as client:
        for _ in range(2):
            CollabLlm(llm[0], mode="collaborative", client=client, cloud_model="llm_tok", threshold=1.0).generate(PROMPT, 3)
        assert client.calls == {"ModelMetadata": 1, "ModelInfer": 6}


def test_each_further_token_adds_at_most_16_bytes(llm):
    """What one more token id adds to a serialized request (the prompt and the fixed fields aside)."""
    e = edge(llm, cloud_model="llm_tok")
    sizes = [e._request(2**60, 100, np.arange(t, dtype=np.int64), np.zeros(t, bool), False)[0].ByteSize()
             for t in (8, 9)]
    assert sizes[1] - sizes[0] <= 16
    r = edge(llm, threshold=1.0, cloud_model="llm_tok").generate(PROMPT, N_NEW)
    assert r.counters.request_bytes > 0 and (r.counters.states_sent - len(PROMPT)) * (sizes[1] - sizes[0]) <= 16 * N_NEW


def test_eviction_resends_the_token_ids(llm):
    want = edge(llm, threshold=1.0, cloud_model="llm_tok_tight").generate(PROMPT, N_NEW).tokens
    other = edge(llm, threshold=1.0, cloud_model="llm_tok_tight")

    def evict(step, token, source):
        if step == 4:
            other.generate([1, 2, 3], 2)

    r = edge(llm, threshold=1.0, cloud_model="llm_tok_tight", max_kept_states=2).generate(PROMPT, N_NEW, on_token=evict)
    assert r.tokens == want and r.counters.resends == 1 and r.counters.recomputed_states == 0

