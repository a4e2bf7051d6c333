"""LLM-continuation backend: the cloud half of the collaborative LLM (DESIGN.md, "Continue in the cloud").

Runs layers [k, L) and the LM head of a Llama-family model (split.llama) and keeps each session's
KV cache in the session store, so a device sends every hidden state (or token id) once. config.toml:

    backend = "llm_continuation"
    [sequence_batching]                      # required: the KV cache is per sequence_id
    max_sequence_idle_microseconds = 600_000_000
    max_state_bytes = 1_073_741_824
    [parameters]
    checkpoint = "/path/to/hf_folder"        # relative paths are relative to the version folder
    first_layer = 4                          # k; 0 = the whole model from token ids (cloud-only)
    catch_up = "exact"                       # or "propagated" or "tokens" (see below)
    top_k = 5
    max_batch_rows = 256                     # rows per packed forward (1: every request alone)
    gather_microseconds = 2000               # how long a forward waits for requests still arriving

Inputs (declared here; config.toml may set hidden_states' data_type to FP16 for an fp16 wire):
    hidden_states  FP32 [T, C]   the layer-k outputs for positions p..p+T-1 the cloud has not seen;
                                 int8 per-row (split.codec, axis 0) arrives dequantized  (k > 0)
    input_ids      INT64 [T]     the tokens at positions p..p+T-1          (k = 0, or catch_up "tokens")
    start          INT64 [1]     p: must equal the number of positions this session has seen
    exited         UINT8 [T]     1 where the token after this row was decided by the device's exit
                                 head (the row exited at layer k: catch-up only in `propagated`
                                 mode); the last row is the one to decide now: 0
Outputs (for the last position p+T-1, or after the accepted drafts):
    next_token INT64 [1], top_ids INT64 [top_k], top_probs FP32 [top_k], accepted INT64 [1] (0 unless verifying)
    work       INT64 [5]  this request: layer-token evaluations, K/V-projection layer-token
                          evaluations, LM-head evaluations; the session: states received, positions held

Catch-up modes for the exited rows: `exact` runs them through layers [k, L) like any other
(the offloaded token then sees exactly the full model's context); `propagated` computes only each
deeper layer's K and V from the exit-layer state (CALM-style), a fraction of a layer's cost;
`tokens` loads layers [0, L) with the embeddings and takes input_ids instead of hidden_states: the
device sends 8 bytes per token instead of a state and the cloud recomputes layers [0, k) itself
(`work` counts every row over all L layers). The other rows always run through [k, L).

Speculative verification (models that take input_ids; optional inputs, so a request without them
is answered as before): the last `draft_len` ids are the device's drafts. One forward scores them
all; `accepted` says how many the cloud keeps and `next_token` is its own token after them (the
correction, or the bonus token when all are kept); the session's KV cache is cut back to the
accepted prefix (positions held = start + T - draft_len + accepted).
    draft_len    INT64 [1]      d, 0..T-1 (the row before the drafts decides the first)
    draft_probs  FP32 [d, V]    sampling only: the distribution q each draft was drawn from
    temperature  FP32 [1], top_k INT64 [1], top_p FP32 [1], seed INT64 [1]: the sampling settings
                                 (split.llama.Sampling; absent or temperature 0: greedy)
Greedy keeps drafts while each is the argmax; sampling is standard speculative sampling
(`verify_drafts`). Every check happens before the session's state is touched, so INVALID_ARGUMENT
leaves the session usable.

Serving a fleet: concurrent sessions' requests share one forward. `submit` checks a request (on
the caller's thread: a bad one fails alone, before anything runs) and queues it on the model's
StepBatcher (step_batcher.py); the batcher's thread packs every queued request's rows into one
forward (split.llama.packed: rows and positions differ per session, each attends to its own
cache; exited rows only give K/V), then each session's drafts are verified and its cache cut on
its own. A request with nobody else waiting or running goes at once; requests that arrive while
a forward runs share the next. ServedModel awaits `submit`'s Future; `infer` is the same, blocking.
"""
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cloud_service.backends.base import Backend
from cloud_service.backends.shared_weights import shared_llama
from cloud_service.backends.step_batcher import StepBatcher, StepInfo
from cloud_service.config import ConfigError, ModelConfig, TensorSpec
from edgefold_proto.serving import InvalidArgument
from split.llama import KVCache, LlamaConfig, Sampling, sample
from split.llama.packed import Segment, packed_logits
from split.llama.sampling import distribution

CATCH_UP_MODES = ("exact", "propagated", "tokens")
SAMPLING_INPUTS = (("temperature", "FP32"), ("top_k", "INT64"), ("top_p", "FP32"), ("seed", "INT64"))


def checkpoint_config(version_dir: Path, config: ModelConfig) -> tuple[Path, LlamaConfig]:
    """parameters.checkpoint (relative paths: to the version folder) and its LlamaConfig; ConfigError
    naming the model and the field when it cannot be read."""
    checkpoint = Path(str(config.parameters.get("checkpoint", ".")))
    checkpoint = checkpoint if checkpoint.is_absolute() else version_dir / checkpoint
    try:
        return checkpoint, LlamaConfig.from_dir(checkpoint)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{config.name}': parameters.checkpoint: {err}") from None


def int_parameter(config: ModelConfig, key: str, default: int, least: int) -> int:
    """parameters.<key>, an integer >= least; ConfigError naming the model and the key otherwise."""
    value = config.parameters.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"model '{config.name}': parameters.{key} must be an integer >= {least}, got {value!r}")
    return value


def batch_limits(config: ModelConfig) -> tuple[int, float]:
    """parameters.max_batch_rows (256) and gather_microseconds (2000, as seconds): the packed forward's
    bounds, for the continuation's batching and llm_stream's alike."""
    return int_parameter(config, "max_batch_rows", 256, 1), int_parameter(config, "gather_microseconds", 2000, 0) / 1e6


def verify_drafts(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, s: Sampling,
                  gen: torch.Generator | None) -> tuple[int, int]:
    """(accepted, next token) for drafts x_1..x_d given the target's logits (d + 1, vocab) at the
    position before each draft and after the last. Greedy: keep drafts while x_i is the argmax, then
    the argmax. Sampling (Leviathan et al. 2023, Chen et al. 2023): keep x_i with probability
    min(1, p_i(x_i) / q_i(x_i)), p_i = distribution(logits[i], s) and q (d, vocab) what the drafts
    were drawn from; at the first rejection draw from normalize(max(0, p_i - q_i)); after d
    acceptances draw the bonus token from p_d. The tokens are then distributed as sample() from the
    target alone would draw them, whatever q is."""
    for i, x in enumerate(drafts):
        if s.greedy:
            best = int(logits[i].argmax())
            if x != best:
                return i, best
            continue
        p = distribution(logits[i], s)  # (vocab,)
        if float(torch.rand((), generator=gen)) * float(q[i, x]) >= float(p[x]):  # rejected
            residual = (p - q[i]).clamp_min(0)  # (vocab,); multinomial normalizes it
            return i, int(torch.multinomial(residual if residual.sum() > 0 else p, 1, generator=gen))
    return len(drafts), sample(logits[-1], s, gen)


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
        max_rows, gather_s = batch_limits(config)
        self.takes_ids = self.first_layer == 0 or self.catch_up == "tokens"
        self.layers = range(0 if self.takes_ids else self.first_layer, n_layers)
        self.model = shared_llama(self.checkpoint, layers=self.layers, with_embed=self.takes_ids)
        C, V = self.llama_config.hidden_size, self.llama_config.vocab_size
        declared = {spec.name: spec for spec in config.inputs}
        if self.takes_ids:
            self.state_input = TensorSpec("input_ids", "INT64", (-1,))
        else:
            dtype = declared["hidden_states"].datatype if "hidden_states" in declared else "FP32"
            if dtype not in ("FP32", "FP16"):
                raise ConfigError(f"model '{config.name}': input hidden_states must be FP32 or FP16, got {dtype}")
            self.state_input = TensorSpec("hidden_states", dtype, (-1, C))
        self.inputs = [self.state_input, TensorSpec("start", "INT64", (1,)), TensorSpec("exited", "UINT8", (-1,))]
        if self.takes_ids:   # speculative verification: optional, an old client sends none of these
            self.inputs += [TensorSpec("draft_len", "INT64", (1,), optional=True),
                            TensorSpec("draft_probs", "FP32", (-1, V), optional=True)]
            self.inputs += [TensorSpec(name, dtype, (1,), optional=True) for name, dtype in SAMPLING_INPUTS]
        self.outputs = [TensorSpec("next_token", "INT64", (1,)), TensorSpec("top_ids", "INT64", (self.top_k,)),
                        TensorSpec("top_probs", "FP32", (self.top_k,)), TensorSpec("work", "INT64", (5,)),
                        TensorSpec("accepted", "INT64", (1,))]
        self.on_step = None   # ServedModel sets it: (StepInfo, compute_ns) after each packed forward
        self.batcher = StepBatcher(self._forward, max_rows, gather_s, f"{config.name}-sessions", self._stepped)

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
        if self.takes_ids and T and (rows.min() < 0 or rows.max() >= self.llama_config.vocab_size):
            raise InvalidArgument(f"input 'input_ids': token ids must lie in 0..{self.llama_config.vocab_size - 1}")
        return rows, start, exited.astype(bool)

    def _verification(self, inputs: dict, rows: np.ndarray, exited: np.ndarray):
        """(draft_len, q (d, vocab) or None, Sampling) of a request; (0, None, greedy) without drafts."""
        T, V = rows.shape[0], self.llama_config.vocab_size
        d = int(np.asarray(inputs.get("draft_len", [0])).reshape(-1)[0])
        if not 0 <= d < max(T, 1):
            raise InvalidArgument(f"input 'draft_len': {d} drafts need {d + 1} or more rows of 'input_ids' (the "
                                  f"drafts and the position before them), and draft_len >= 0; got {T} rows")
        if d and exited[-(d + 1):].any():
            raise InvalidArgument("input 'exited': the drafts and the row before them must be 0 (the full model "
                                  "verifies them)")
        values = {name: np.asarray(inputs[name]).reshape(-1)[0].item() for name, _ in SAMPLING_INPUTS if name in inputs}
        if values.get("seed", 0) < 0:
            raise InvalidArgument(f"input 'seed': expected an integer >= 0, got {values['seed']}")
        try:
            s = Sampling(**values)
        except ValueError as err:   # Sampling's message names the setting
            raise InvalidArgument(f"input {err}") from None
        q = inputs.get("draft_probs")
        if q is None:
            if d and not s.greedy:
                raise InvalidArgument("input 'draft_probs': required to verify drafts when sampling (temperature "
                                      "> 0): the (draft_len, vocab_size) distributions the drafts were drawn from")
            return d, None, s
        if s.greedy:
            raise InvalidArgument("input 'draft_probs': only when sampling (temperature > 0); greedy verification "
                                  "compares ids")
        if q.shape != (d, V):
            raise InvalidArgument(f"input 'draft_probs': shape {list(q.shape)}, expected [{d}, {V}] (draft_len, "
                                  "vocab_size)")
        if d and ((q < 0).any() or np.abs(q.sum(1, dtype=np.float64) - 1).max() > 1e-3):
            raise InvalidArgument("input 'draft_probs': each row must be a probability distribution (entries >= 0 "
                                  "summing to 1)")
        drawn = q[np.arange(d), rows[T - d:]]
        if d and (drawn <= 0).any():
            raise InvalidArgument(f"input 'draft_probs': draft {int(np.argmin(drawn))} has probability 0 in its "
                                  "row; a draft must be drawn from its row of draft_probs")
        return d, torch.from_numpy(np.asarray(q, np.float32)), s

    # --- a request: checked, queued, run in a packed forward, finished per session -------------
    def submit(self, inputs: dict, state: dict | None) -> Future:
        """Check a request (InvalidArgument before anything runs) and queue it for the next packed
        forward; the Future gives (outputs, StepInfo). The session's state is the caller's until then."""
        if state is None:
            raise InvalidArgument("the llm_continuation backend needs a session (sequence_id)")
        rows, start, exited = self._check(inputs, state)
        d, q, sampling = self._verification(inputs, rows, exited) if self.takes_ids else (0, None, Sampling())
        T = rows.shape[0]
        if T == 0:   # nothing new (a request that only carries sequence_end): no work, no token
            done = Future()
            done.set_result(({"next_token": np.array([-1], np.int64), "top_ids": np.zeros(self.top_k, np.int64),
                              "top_probs": np.zeros(self.top_k, np.float32), "accepted": np.zeros(1, np.int64),
                              "work": np.array([0, 0, 0, state.get("received", 0), state.get("seen", 0)], np.int64)},
                             StepInfo(0, 0)))
            return done
        if self.catch_up in ("exact", "tokens"):
            exited[:] = False
        cache = state.get("cache")
        if cache is None:
            cache = state["cache"] = KVCache()
            state["kv"] = (cache.k, cache.v, cache.pos)  # so the session store counts the cache's bytes
            state["received"] = 0
        flags = exited.tolist() if exited.any() else None   # exited rows only fill each layer's K/V
        if self.takes_ids:
            segment = Segment(rows.astype(np.int64).tolist(), start, cache, exited=flags, scored=d + 1)
        else:
            hidden = torch.from_numpy(np.asarray(rows, np.float32)).reshape(T, -1)  # (T, C)
            segment = Segment(None, start, cache, hidden, flags)
        request = _Request(segment, state, rows[T - d:].tolist(), q, sampling, int(exited.sum()))
        return self.batcher.submit(request)

    def infer(self, inputs, state=None):
        outputs, _ = self.submit(inputs, state).result()
        return outputs

    def _forward(self, requests: list["_Request"]) -> list[dict]:
        """The batcher's forward: every request's rows in one packed forward, then each on its own."""
        with torch.inference_mode():
            logits = packed_logits(self.model, [r.segment for r in requests])  # [(d + 1, vocab), ...]
            return [self._finish(r, scores) for r, scores in zip(requests, logits)]

    def _finish(self, r: "_Request", logits: torch.Tensor) -> dict:
        """Verify a request's drafts against its logits (d + 1, vocab), cut its cache back to the
        accepted prefix and answer."""
        d, T, L = len(r.drafts), r.segment.rows, len(self.layers)
        accepted, token = verify_drafts(logits, r.drafts, r.q, r.sampling, r.sampling.generator())
        seen = r.segment.start + T - d + accepted
        r.segment.cache.crop(seen)   # forget the rejected drafts
        top_probs, top_ids = torch.softmax(logits[accepted].float(), dim=-1).topk(self.top_k)
        r.state["seen"] = seen
        r.state["received"] += T
        work = [(T - r.n_kv) * L, r.n_kv * L, d + 1, r.state["received"], seen]
        return {"next_token": np.array([token], np.int64), "accepted": np.array([accepted], np.int64),
                "top_ids": top_ids.numpy().astype(np.int64), "top_probs": top_probs.numpy().astype(np.float32),
                "work": np.array(work, np.int64)}

    def _stepped(self, info: StepInfo, compute_ns: int) -> None:
        if self.on_step is not None:
            self.on_step(info, compute_ns)

    def close(self) -> None:
        self.batcher.close()


@dataclass
class _Request:
    """A checked request, queued for a packed forward."""
    segment: Segment
    state: dict                 # the session's state (its cache is segment.cache)
    drafts: list[int]           # the ids to verify (the last d rows)
    q: torch.Tensor | None      # (d, vocab) what the drafts were drawn from (sampling)
    sampling: Sampling
    n_kv: int                   # exited rows: K/V only

    @property
    def rows(self) -> int:
        return self.segment.rows
