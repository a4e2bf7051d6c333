"""LLM streaming backend: the cloud's full model generates the whole answer and streams each token
as it is produced (Triton's decoupled model: one request, one response per token, over
ModelStreamInfer). The baseline every collaborative mode is measured against. config.toml:

    backend = "llm_stream"
    [model_transaction_policy]
    decoupled = true                         # required: 0..N responses per request
    [parameters]
    checkpoint = "/path/to/hf_folder"        # relative paths are relative to the version folder
    max_batch_rows = 256                     # rows per packed forward (step_batcher.py: the bound)
    max_streams = 64                         # streams generating at once; more wait for a slot
    gather_microseconds = 2000               # how long a step waits for the other streams' steps
    intra_op_thread_count = 1

Input:  input_ids INT64 [T]  the prompt (T >= 1, ids in 0..vocab_size-1)
Output: token     INT64 [1]  one generated token per response, in order
Request parameters (as OpenAI / Triton LLM users name them): max_tokens (int, default 16),
temperature (0 = greedy, the default), top_k, top_p, seed, repetition_penalty, stop (token-id
sequences as JSON, e.g. "[[13, 13], [2]]"; the checkpoint's EOS ids always stop), ignore_eos.
Bad values: INVALID_ARGUMENT naming the parameter, before anything runs.
Response parameters: batch_streams and batch_rows (what the packed forward that produced this
token carried); on the last token also finish_reason ("stop" or "length"), prompt_tokens,
completion_tokens and layer_evals (the cloud's work: layer-token evaluations, every layer over the
prompt and every generated token but the last, which is never fed back).

Every stream runs the one decode loop (split.llama.Generation) on its own thread; its step goes
through the StepBatcher, which packs the steps of all running streams into one forward
(continuous batching: streams join and leave between steps).
"""
import json
import threading
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cloud_service.backends.base import Backend
from cloud_service.backends.llm import batch_limits, checkpoint_config, int_parameter
from cloud_service.backends.shared_weights import shared_llama
from cloud_service.backends.step_batcher import StepBatcher, StepInfo
from cloud_service.config import ConfigError, ModelConfig, TensorSpec
from edgefold_proto.serving import InvalidArgument
from split.llama import Generation, KVCache, Sampling, Stop
from split.llama.packed import Segment, packed_forward

DEFAULT_MAX_TOKENS = 16


class StreamCancelled(Exception):
    """The client went away: the stream's thread stops at its next step."""


def _number(params: dict, name: str, default, kind):
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InvalidArgument(f"parameter '{name}': expected {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r}")
    return kind(value)


def _stop_sequences(params: dict) -> tuple[tuple[int, ...], ...]:
    text = params.get("stop")
    if text is None:
        return ()
    try:
        seqs = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        seqs = None
    if not isinstance(seqs, list) or not all(
            isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in seqs):
        raise InvalidArgument(f"parameter 'stop': expected token-id sequences as JSON, e.g. \"[[13, 13], [2]]\", "
                              f"got {text!r}")
    return tuple(tuple(s) for s in seqs)


class LlmStreamBackend(Backend):
    platform = "edgefold_llm_stream"

    def __init__(self, version_dir: Path, config: ModelConfig):
        if not config.decoupled:
            raise ConfigError(f"model '{config.name}': backend 'llm_stream' sends one response per token; add "
                              "[model_transaction_policy] decoupled = true to config.toml")
        params = config.parameters
        self.checkpoint, self.llama_config = checkpoint_config(version_dir, config)
        max_rows, gather_s = batch_limits(config)
        max_streams = int_parameter(config, "max_streams", 64, 1)
        threads = params.get("intra_op_thread_count")
        if threads:
            torch.set_num_threads(int(threads))
        self.model = shared_llama(self.checkpoint)
        self.eos_ids = tuple(self.llama_config.eos_token_ids)
        self.n_layers = self.llama_config.num_hidden_layers
        self.inputs = [TensorSpec("input_ids", "INT64", (-1,))]
        self.outputs = [TensorSpec("token", "INT64", (1,))]
        self.slots = threading.BoundedSemaphore(max_streams)
        self.on_step = None   # ServedModel sets it: (StepInfo, compute_ns) after each packed forward
        self.batcher = StepBatcher(partial(packed_forward, self.model), max_rows, gather_s, f"{config.name}-steps",
                                   self._stepped)

    def _stepped(self, info: StepInfo, compute_ns: int) -> None:
        if self.on_step is not None:
            self.on_step(info, compute_ns)

    def infer(self, inputs, state=None):
        raise InvalidArgument("this model streams one response per token (decoupled): call ModelStreamInfer")

    def open_stream(self, inputs: dict, params: dict) -> "TokenStream":
        """Check a request (INVALID_ARGUMENT before anything runs) and return its stream, not yet started."""
        prompt = np.asarray(inputs["input_ids"]).reshape(-1)
        vocab, limit = self.llama_config.vocab_size, self.llama_config.max_position_embeddings
        if prompt.size == 0:
            raise InvalidArgument("input 'input_ids': the prompt must hold at least one token id")
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise InvalidArgument(f"input 'input_ids': token ids must lie in 0..{vocab - 1}")
        if prompt.size >= limit:
            raise InvalidArgument(f"input 'input_ids': {prompt.size} prompt tokens leave no room for an answer under "
                                  f"max_position_embeddings {limit}")
        max_tokens = _number(params, "max_tokens", DEFAULT_MAX_TOKENS, int)
        if not 1 <= max_tokens <= limit - prompt.size:
            raise InvalidArgument(f"parameter 'max_tokens': must be in 1..{limit - prompt.size} (max_position_embeddings "
                                  f"{limit} minus the {prompt.size} prompt tokens), got {max_tokens}")
        seed = params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidArgument(f"parameter 'seed': expected an integer >= 0, got {seed!r}")
        values = {"temperature": _number(params, "temperature", 0.0, float), "top_k": _number(params, "top_k", 0, int),
                  "top_p": _number(params, "top_p", 1.0, float),
                  "repetition_penalty": _number(params, "repetition_penalty", 1.0, float)}
        try:
            sampling = Sampling(seed=seed, **values)
        except ValueError as err:   # Sampling's message names the setting
            raise InvalidArgument(f"parameter {err}") from None
        if not np.isfinite(list(values.values())).all():
            raise InvalidArgument("parameters temperature, top_k, top_p and repetition_penalty must be finite")
        ignore_eos = params.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise InvalidArgument(f"parameter 'ignore_eos': expected a bool, got {ignore_eos!r}")
        stop = Stop(() if ignore_eos else self.eos_ids, _stop_sequences(params))
        return TokenStream(self, prompt.astype(np.int64).tolist(), max_tokens, sampling, stop)

    def close(self) -> None:
        self.batcher.close()


class TokenStream:
    """One request's generation. Iterate it (on a thread of its own: it blocks between steps) for
    (outputs, response parameters, last); cancel() from anywhere stops it at its next step."""

    def __init__(self, backend: LlmStreamBackend, prompt: list[int], max_tokens: int, sampling: Sampling, stop: Stop):
        self.backend = backend
        self.cancelled = threading.Event()
        self.cache = KVCache(max_len=len(prompt) + max_tokens)   # this stream's own, sized once
        self.generation = Generation(self._step, prompt, max_tokens, sampling, stop)
        self.info = StepInfo(0, 0)

    def cancel(self) -> None:
        self.cancelled.set()

    def _step(self, ids: list[int], start: int) -> torch.Tensor:
        if self.cancelled.is_set():
            raise StreamCancelled("the client went away")
        logits, self.info = self.backend.batcher.step(Segment(ids, start, self.cache))
        return logits

    def __iter__(self):
        while not self.backend.slots.acquire(timeout=0.5):   # at most max_streams generate at once
            if self.cancelled.is_set():
                return
        self.backend.batcher.join()
        try:
            gen = self.generation
            for token in gen:
                params = {"batch_streams": self.info.streams, "batch_rows": self.info.rows}
                last = gen.finish_reason is not None
                if last:
                    fed = len(gen.prompt) + len(gen.tokens) - 1
                    params.update(finish_reason=gen.finish_reason, prompt_tokens=len(gen.prompt),
                                  completion_tokens=len(gen.tokens), layer_evals=fed * self.backend.n_layers)
                yield {"token": np.array([token], np.int64)}, params, last
        finally:
            self.backend.batcher.leave()
            self.backend.slots.release()
