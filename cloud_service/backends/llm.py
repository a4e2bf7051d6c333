"""LLM-continuation backend: the cloud half of the collaborative LLM (DESIGN.md, "Continue in the cloud").

Runs layers [k, L) and the LM head of a Llama-family model (split.llama) and keeps each session's
KV cache in the session store, so a device sends every hidden state once. config.toml:

    backend = "llm_continuation"
    [sequence_batching]                      # required: the KV cache is per sequence_id
    max_sequence_idle_microseconds = 600_000_000
    max_state_bytes = 1_073_741_824
    [parameters]
    checkpoint = "/path/to/hf_folder"        # relative paths are relative to the version folder
    first_layer = 4                          # k; 0 = the whole model from token ids (cloud-only)
    catch_up = "exact"                       # or "propagated" (see below)
    top_k = 5

Inputs (declared here; config.toml may set hidden_states' data_type to FP16 for an fp16 wire):
    hidden_states  FP32 [T, C]   the layer-k outputs for positions p..p+T-1 the cloud has not seen;
                                 int8 per-row (split.codec, axis 0) arrives dequantized  (k > 0)
    input_ids      INT64 [T]     the tokens at positions p..p+T-1                        (k = 0)
    start          INT64 [1]     p: must equal the number of positions this session has seen
    exited         UINT8 [T]     1 where the token after this row was decided by the device's exit
                                 head (the row exited at layer k: catch-up only in `propagated`
                                 mode); the last row is the one to decide now: 0
Outputs (for the last position p+T-1):
    next_token INT64 [1], top_ids INT64 [top_k], top_probs FP32 [top_k]
    work       INT64 [5]  this request: layer-token evaluations, K/V-projection layer-token
                          evaluations, LM-head evaluations; the session: states received, positions held

Catch-up modes for the exited rows: `exact` runs them through layers [k, L) like any other
(the offloaded token then sees exactly the full model's context); `propagated` computes only each
deeper layer's K and V from the exit-layer state (CALM-style), a fraction of a layer's cost.
The other rows always run through [k, L). Every check happens before the session's state is
touched, so INVALID_ARGUMENT leaves the session usable.
"""
from pathlib import Path

import numpy as np
import torch

from cloud_service.backends.base import Backend
from cloud_service.config import ConfigError, ModelConfig, TensorSpec
from edgefold_proto.serving import InvalidArgument
from split.llama import KVCache, LlamaConfig, load_llama
from split.llama.exits import continue_layers

CATCH_UP_MODES = ("exact", "propagated")


def checkpoint_config(version_dir: Path, config: ModelConfig) -> tuple[Path, LlamaConfig]:
    """parameters.checkpoint (relative paths: to the version folder) and its LlamaConfig; ConfigError
    naming the model and the field when it cannot be read."""
    checkpoint = Path(str(config.parameters.get("checkpoint", ".")))
    checkpoint = checkpoint if checkpoint.is_absolute() else version_dir / checkpoint
    try:
        return checkpoint, LlamaConfig.from_dir(checkpoint)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{config.name}': parameters.checkpoint: {err}") from None


class LlmContinuationBackend(Backend):
    platform = "edgefold_llm_continuation"

    def __init__(self, version_dir: Path, config: ModelConfig):
        if not config.stateful:
            raise ConfigError(f"model '{config.name}': backend 'llm_continuation' keeps a KV cache per "
                              "sequence; add a [sequence_batching] table to config.toml")
        params = config.parameters
        self.checkpoint, self.llama_config = checkpoint_config(version_dir, config)
        n_layers = self.llama_config.num_hidden_layers
        self.first_layer = params.get("first_layer")
        if not isinstance(self.first_layer, int) or not 0 <= self.first_layer < n_layers:
            raise ConfigError(f"model '{config.name}': parameters.first_layer must be an integer in "
                              f"0..{n_layers - 1}, got {self.first_layer!r}")
        self.catch_up = params.get("catch_up", "exact")
        if self.catch_up not in CATCH_UP_MODES:
            raise ConfigError(f"model '{config.name}': parameters.catch_up must be one of {CATCH_UP_MODES}, "
                              f"got {self.catch_up!r}")
        self.top_k = params.get("top_k", 5)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.llama_config.vocab_size:
            raise ConfigError(f"model '{config.name}': parameters.top_k must be in 1..vocab_size, got {self.top_k!r}")
        threads = params.get("intra_op_thread_count")
        if threads:
            torch.set_num_threads(int(threads))
        self.layers = range(self.first_layer, n_layers)
        self.model = load_llama(self.checkpoint, layers=self.layers, with_embed=self.first_layer == 0)
        C = self.llama_config.hidden_size
        declared = {spec.name: spec for spec in config.inputs}
        if self.first_layer == 0:
            self.state_input = TensorSpec("input_ids", "INT64", (-1,))
        else:
            dtype = declared["hidden_states"].datatype if "hidden_states" in declared else "FP32"
            if dtype not in ("FP32", "FP16"):
                raise ConfigError(f"model '{config.name}': input hidden_states must be FP32 or FP16, got {dtype}")
            self.state_input = TensorSpec("hidden_states", dtype, (-1, C))
        self.inputs = [self.state_input, TensorSpec("start", "INT64", (1,)), TensorSpec("exited", "UINT8", (-1,))]
        self.outputs = [TensorSpec("next_token", "INT64", (1,)), TensorSpec("top_ids", "INT64", (self.top_k,)),
                        TensorSpec("top_probs", "FP32", (self.top_k,)), TensorSpec("work", "INT64", (5,))]

    # --- checks (before any state changes) ---------------------------------------------------
    def _check(self, inputs: dict, state: dict) -> tuple[np.ndarray, int, np.ndarray]:
        rows = np.asarray(inputs[self.state_input.name])
        exited = np.asarray(inputs["exited"]).reshape(-1)
        start = int(np.asarray(inputs["start"]).reshape(-1)[0])
        T = rows.shape[0]
        seen = state.get("seen", 0)
        if start != seen:
            raise InvalidArgument(f"input 'start': first position is {start}, expected {seen} (this session "
                                  f"holds positions 0..{seen - 1}; send only the ones it has not seen)")
        if exited.shape[0] != T:
            raise InvalidArgument(f"input 'exited': {exited.shape[0]} entries, expected one per row of "
                                  f"'{self.state_input.name}' ({T})")
        if T and (exited.max() > 1 or exited[-1] != 0):
            raise InvalidArgument("input 'exited': entries must be 0 or 1 and the last (the row to decide) 0")
        limit = self.llama_config.max_position_embeddings
        if start + T > limit:
            raise InvalidArgument(f"input '{self.state_input.name}': positions up to {start + T - 1} exceed "
                                  f"max_position_embeddings {limit}")
        if self.first_layer == 0 and (rows.min() < 0 or rows.max() >= self.llama_config.vocab_size):
            raise InvalidArgument(f"input 'input_ids': token ids must lie in 0..{self.llama_config.vocab_size - 1}")
        return rows, start, exited.astype(bool)

    @torch.inference_mode()
    def infer(self, inputs, state=None):
        if state is None:
            raise InvalidArgument("the llm_continuation backend needs a session (sequence_id)")
        rows, start, exited = self._check(inputs, state)
        T, L = rows.shape[0], len(self.layers)
        if T == 0:   # nothing new (a request that only carries sequence_end): no work, no token
            return {"next_token": np.array([-1], np.int64), "top_ids": np.zeros(self.top_k, np.int64),
                    "top_probs": np.zeros(self.top_k, np.float32),
                    "work": np.array([0, 0, 0, state.get("received", 0), state.get("seen", 0)], np.int64)}
        if self.first_layer == 0:
            h = self.model.embed(torch.from_numpy(rows.astype(np.int64)).reshape(1, T))  # (1, T, C)
        else:
            h = torch.from_numpy(np.asarray(rows, np.float32)).reshape(1, T, -1)  # (1, T, C)
        cache = state.get("cache")
        if cache is None:
            cache = state["cache"] = KVCache()
            state["kv"] = (cache.k, cache.v, cache.pos)  # so the session store counts the cache's bytes
            state["received"] = 0
        if self.catch_up == "exact":
            exited[:] = False
        # exited rows only fill each layer's K/V (propagated mode); the others run layers [k, L)
        out, _, n_full, n_kv = continue_layers(self.model, h, exited, start, cache, self.layers)
        logits = self.model.head(out[:, -1:])[0, -1]  # (vocab,): the last row is never exited
        probs = torch.softmax(logits.float(), dim=-1)
        top_probs, top_ids = probs.topk(self.top_k)
        state["seen"] = start + T
        state["received"] += T
        work = [n_full * L, n_kv * L, 1, state["received"], state["seen"]]
        return {"next_token": np.array([int(logits.argmax())], np.int64),
                "top_ids": top_ids.numpy().astype(np.int64), "top_probs": top_probs.numpy().astype(np.float32),
                "work": np.array(work, np.int64)}
