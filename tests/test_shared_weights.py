"""The models of one cloud-service process that serve the same checkpoint with the same layers hold
one copy of its weights (cloud_service/backends/shared_weights.py): llm_full, llm_stream and a
token-id llm_tok share every layer, llm and llm_prop share layers [k, L). A changed checkpoint
loads anew, and a copy no model holds is freed. That the shared copy serves correctly beside
the others is what the collaborative and streaming tests check against a real server."""
import gc
import os

import pytest

from cloud_service.backends import shared_weights
from cloud_service.repository import Repository
from llm_models import K, make_model, write_model
from test_cloud_stream import write_stream_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")   # the stream backend sets one thread: restored after


@pytest.fixture()
def repo(tmp_path):
    model_dir = tmp_path / "ee_lm"
    make_model(model_dir)
    root = tmp_path / "repo"
    write_model(root, "llm_full", model_dir, 0)
    write_model(root, "llm_tok", model_dir, K, catch_up="tokens")
    write_model(root, "llm", model_dir, K)
    write_model(root, "llm_prop", model_dir, K, catch_up="propagated")
    write_stream_model(root, "llm_stream", model_dir)
    return root, model_dir


def build(root, name):
    return Repository(root).build(name)["1"].backend


def test_models_of_one_checkpoint_and_layers_share_one_copy(repo):
    share_and_reload(*repo)
    gc.collect()
    assert not copies_of(repo[1])       # no model holds a copy any more: every one was freed


def copies_of(model_dir) -> list:
    return [key for key in list(shared_weights._loaded.keys()) if key[0] == str(model_dir.resolve())]


def share_and_reload(root, model_dir):
    backends = {name: build(root, name) for name in ("llm_full", "llm_tok", "llm_stream", "llm", "llm_prop")}
    try:
        every_layer = backends["llm_full"].model
        assert backends["llm_tok"].model is every_layer and backends["llm_stream"].model is every_layer
        upper = backends["llm"].model
        assert backends["llm_prop"].model is upper and upper is not every_layer
        assert list(upper.layer_ids) == list(range(K, every_layer.config.num_hidden_layers))
        assert len(copies_of(model_dir)) == 2

        weights = model_dir / "model.safetensors"     # a new checkpoint file: a new copy
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
        backends["again"] = build(root, "llm_full")
        assert backends["again"].model is not every_layer
    finally:
        for backend in backends.values():
            backend.close()
