"""The agent's LLM pipelines (the interface: pipeline.py): `llm` (a Llama-family checkpoint on this
device alone), `tp` (rank 0 of a tensor-parallel group) and `collab-llm` (the collaborative LLM's
device side). All three import torch when opened.

Besides OIP `infer`, each streams one generation token by token (what the OpenAI-compatible HTTP
layer calls), through the one decode loop (split.llama.Generation):

    s = pipe.stream(prompt_ids, max_new_tokens=64, sampling=Sampling(temperature=0.7, seed=1),
                    stop_ids=None)                     # None: the checkpoint's EOS ids (pipe.eos_ids)
    for tok in s:                                      # token ids as they are produced
        ...
    s.finish_reason, s.prompt_tokens, s.completion_tokens, s.device_tokens
    s.close()                                          # any thread, any time: ends it within one token

and exposes what a chat front end needs, the same way on every kind: `tokenizer` (a
tokenizers.Tokenizer, or None), `eos_ids`, `context_length` (max_position_embeddings),
`vocab_size`, `model_folder` (where tokenizer_config.json would be) and `samples` (False: the
pipeline decodes greedily whatever `sampling` says; collab-llm).

One generation at a time per pipeline: a stream takes the pipeline's lock at its first next() and
holds it until it ends, fails or is closed; `infer` is a stream read to the end.
"""
from __future__ import annotations

import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np

from edge_runtime.agent.pipeline import Context, Pipeline, PipelineInputError, TensorInfo, int_param, one_input, text_input
from edge_runtime.agent.policy import Decision

MAX_NEW_TOKENS = 4096      # the most an OIP request's max_new_tokens parameter may ask for
CLOSE_WAIT_S = 30.0        # close() lets the generation in flight end first, waiting up to this long


class StreamClosed(Exception):
    """The reader of a token stream closed it: the generation feeding it stops at its next token."""


class Progress:
    """What one generation reports as it runs (the generator fills it; it never holds the TokenStream,
    so that a stream dropped unfinished is closed at once by reference counting)."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.device_tokens: int | None = None
        self.sources: list[str] | None = None
        self.seconds: list[float] = []
        self.queue_s: float | None = None
        self.closed = threading.Event()


class TokenStream:
    """One generation on an LLM pipeline: iterate for token ids as they are produced (once).

    `finish_reason` is "stop" (an EOS / stop id) or "length" (max_new_tokens) from the moment the
    last token is handed out; None while running and when the stream was closed early. Always:
    `prompt_ids`, `prompt_tokens`, `tokens` (handed out so far) and `completion_tokens`;
    `device_tokens` (collab-llm: tokens decided on the device, edge or degraded; None elsewhere) and
    `sources` (collab-llm: per token); `queue_s` (time spent waiting for the pipeline, once started);
    `seconds` (per token, as Generation's: the first includes the prefill).

    close() ends the generation from any thread at any time: called by the thread iterating (or
    between tokens) it stops at once; while another thread is inside next(), that one gets no further
    token (StopIteration) once the step it is computing ends. Either way the pipeline's lock is
    released. A stream dropped unfinished is closed at once; `with stream:` closes it too.
    """

    def __init__(self, lock: threading.Lock, run, prompt_ids: list[int]):
        self._p = Progress(list(prompt_ids))
        self._it = _tokens(lock, run, self._p)   # run(progress) -> generator of token ids

    def __getattr__(self, name):       # prompt_ids, tokens, finish_reason, device_tokens, sources, seconds, queue_s
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._p, name)

    @property
    def prompt_tokens(self) -> int:
        return len(self._p.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self._p.tokens)

    @property
    def closed(self) -> bool:
        return self._p.closed.is_set()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._it)

    def close(self) -> None:
        self._p.closed.set()
        try:
            self._it.close()
        except ValueError:      # "generator already executing" in another thread: it sees the flag
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _tokens(lock: threading.Lock, run, p: Progress):
    t0 = time.perf_counter()
    while not lock.acquire(timeout=0.05):   # polled, so that close() from another thread ends the wait
        if p.closed.is_set():
            return
    try:
        p.queue_s = time.perf_counter() - t0
        if p.closed.is_set():
            return
        with closing(run(p)) as tokens:
            for tok in tokens:
                if p.closed.is_set():       # closed by another thread while this token was computed
                    p.finish_reason = None
                    return
                p.tokens.append(tok)
                yield tok
                if p.closed.is_set():
                    return
    finally:
        lock.release()


def check_prompt(ids: list[int], max_new_tokens: int, vocab_size: int, context_length: int) -> None:
    """A request that does not fit the model: PipelineInputError naming the lengths."""
    if not ids:
        raise PipelineInputError("the prompt must hold at least one token id")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise PipelineInputError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise PipelineInputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if len(ids) + max_new_tokens > context_length:
        raise PipelineInputError(f"the model's context is {context_length} tokens, but the request asks for "
                                 f"{len(ids) + max_new_tokens} ({len(ids)} in the prompt, {max_new_tokens} to generate)")


class LlmPipeline(Pipeline):
    """What the three LLM kinds share: the OIP `infer` over `stream`, and the model's facts.
    Subclasses set tokenizer, eos_ids, context_length, vocab_size, model_folder, max_new_tokens and
    implement _run(stream, sampling, stop)."""

    samples = True
    close_wait_s = CLOSE_WAIT_S

    def _init_llm(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()       # one generation at a time; stream() holds it throughout
        self.inputs = (TensorInfo("prompt", "BYTES", (1,)),)
        self.outputs = (TensorInfo("text", "BYTES", (1,)), TensorInfo("tokens", "INT64", (-1,)))

    def stream(self, prompt_ids, max_new_tokens: int, sampling=None, stop_ids=None) -> TokenStream:
        """Start one generation (it runs as it is iterated). sampling: split.llama.Sampling (None:
        greedy); stop_ids: the token ids that end it (None: the checkpoint's EOS ids; () never stops
        before max_new_tokens). A request that does not fit raises PipelineInputError here, before
        anything runs."""
        from split.llama import Stop
        ids = [int(t) for t in prompt_ids]
        check_prompt(ids, max_new_tokens, self.vocab_size, self.context_length)
        stop = Stop(tuple(self.eos_ids if stop_ids is None else stop_ids))
        return TokenStream(self._lock, lambda p: self._run(p, max_new_tokens, sampling, stop), ids)

    def _run(self, p: Progress, max_new_tokens: int, sampling, stop):
        """The generation's token ids; sets p.finish_reason as the last one is yielded (and
        p.seconds, p.device_tokens, p.sources where it has them)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the model once the generation in flight, if any, has ended (a replaced pipeline's
        last stream finishes), waiting up to close_wait_s; past that it closes regardless."""
        idle = self._lock.acquire(timeout=self.close_wait_s)
        try:
            self._release()
        finally:
            if idle:
                self._lock.release()

    def _release(self) -> None:
        raise NotImplementedError

    def prompt_of(self, inputs: dict) -> list[int]:
        """An OIP request's prompt: `prompt_ids` (INT64) or `prompt` (BYTES, through the tokenizer)."""
        if "prompt_ids" in inputs:
            return [int(t) for t in one_input(inputs, "prompt_ids", "iu").reshape(-1)]
        if self.tokenizer is None:
            raise PipelineInputError("this model has no tokenizer.json: send 'prompt_ids' (INT64)")
        return self.tokenizer.encode(text_input(inputs, "prompt")).ids

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else " ".join(map(str, tokens))

    def infer(self, inputs: dict, params: dict, stop_ids=None) -> dict:
        ids = self.prompt_of(inputs)
        steps = int_param(params, "max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        s = self.stream(ids, steps, None, stop_ids)
        tokens = list(s)
        out = {"text": np.array([self.decode(tokens).encode()], dtype=object), "tokens": np.array(tokens, np.int64)}
        if s.sources is not None:
            sources = np.empty(len(s.sources), dtype=object)
            sources[:] = [x.encode() for x in s.sources]
            out["sources"] = sources
        return out


# --- llm and tp: the tensor-parallel engine's master (world size 1: this device alone) ---------
class EnginePipeline(LlmPipeline):
    """A pipeline over edge_runtime.tp.engine.Master (rank 0 of its group, or all of it)."""

    def _init_engine(self, master, model_folder: Path, max_new_tokens: int) -> None:
        self.master = master
        config = master.config
        self.tokenizer = master.tokenizer
        self.eos_ids = tuple(config.eos_token_ids)
        self.context_length = int(config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.model_folder = Path(model_folder)
        self._init_llm(max_new_tokens)

    def _run(self, p: Progress, max_new_tokens: int, sampling, stop):
        gen = self.master.generate(p.prompt_ids, max_new_tokens, sampling, stop)
        p.seconds = gen.seconds
        for tok in gen:
            p.finish_reason = gen.finish_reason     # set before the last token is handed out
            yield tok
        p.finish_reason = gen.finish_reason         # max_new_tokens = 0

    def infer(self, inputs: dict, params: dict, stop_ids=None) -> dict:
        try:
            return super().infer(inputs, params, stop_ids)
        except ValueError as err:       # the engine's own checks: the request, not the pipeline
            if isinstance(err, PipelineInputError):
                raise
            raise PipelineInputError(str(err)) from None


class LocalLlmPipeline(EnginePipeline):
    """`llm`: a Llama-family HF checkpoint folder (config.json, *.safetensors, tokenizer.json,
    optional generation_config.json / tokenizer_config.json) on this device alone: the tensor-parallel
    engine at world size 1 over blocks prepared once into the tp cache (edge_runtime.tp.launch.
    cached_shards), so paging (`window`) and int8 / int4 weights (`quantize`, `group_size`) are the
    tp path's. Options: quantize, group_size = 32, window (0 or absent: every block resident),
    dtype = "fp32" | "bf16" (float weights), max_new_tokens, cache_dir (default: the tp CLI's)."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        import torch

        from edge_runtime.tp.collective import LocalCollective
        from edge_runtime.tp.engine import Master
        from edge_runtime.tp.launch import DEFAULT_CACHE, cached_shards
        from split.llama.quantize import handler
        super().__init__(name, "llm", "edgefold_llm")
        self.quantize = options.get("quantize")
        if self.quantize not in (None, "int8", "int8g", "int4"):
            raise ValueError(f"quantize must be 'int8', 'int8g' or 'int4' (or absent), got {self.quantize!r}")
        self.dtype = options.get("dtype", "fp32")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        self.window = options.get("window", 0)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an integer >= 0 (0: every block resident), got {self.window!r}")
        group_size = int(options.get("group_size", 32))
        shards = cached_shards(Path(folder), 1, None, Path(options.get("cache_dir", DEFAULT_CACHE)), False, None,
                               handler(self.quantize, group_size) if self.quantize else None)
        master = Master(shards / "rank0", LocalCollective(), self.window,
                        {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype])
        self._init_engine(master, Path(folder), int(options.get("max_new_tokens", 32)))

    def describe(self) -> dict:
        return {"kind": self.kind, "quantize": self.quantize, "window": self.master.shard.pager.window, "dtype": self.dtype}

    def _release(self) -> None:
        self.master.close()


class TensorParallelPipeline(EnginePipeline):
    """Rank 0 of a tensor-parallel group. Without `peers` / `discover`, `folder` is a `tp prepare`
    output and ranks 1..N-1 are started here on loopback. With `peers = ["host:port", ...]` (elastic
    peers: `edge-runtime tp worker --model --listen`) or `discover = N` (peers advertised on the
    local network; `known_peers`, `trust_on_first_use`), `folder` is the model itself (a Hugging
    Face folder, or a .gguf file inside it) and the group (edge_runtime.tp.group) survives losing a
    peer: the request in flight finishes on the new plan, queued ones wait behind it (the pipeline's
    lock), and a peer that comes back joins at a request boundary. describe() (the agent's /health)
    and /metrics show the members, the plan and the recoveries. Options: master, window, payload,
    dtype, timeout_s, join_timeout_s, curve_keys / insecure, max_new_tokens; with peers also quantize,
    group_size, profile (this device's, for the shares), cache_dir. Input `prompt` (BYTES) or
    `prompt_ids` (INT64); parameter max_new_tokens; greedy. Outputs `text` and `tokens`."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from edge_runtime.tp.config import TPConfig
        from edge_runtime.tp.launch import free_port
        super().__init__(name, "tp", "edgefold_tp")
        peers, discover = options.get("peers"), options.get("discover")
        window = options.get("window")  # absent: each rank's from the plan (all resident without a budget)
        self.config = TPConfig(
            world_size=1, window=None if window is None else int(window),
            master=str(options.get("master", "0.0.0.0:29500" if peers or discover else f"127.0.0.1:{free_port()}")),
            payload=str(options.get("payload", "fp32")), timeout_s=float(options.get("timeout_s", 5.0)),
            join_timeout_s=float(options.get("join_timeout_s", 60.0)), dtype=str(options.get("dtype", "fp32")),
            insecure=options.get("insecure") is True,
            curve_keys=Path(options["curve_keys"]) if options.get("curve_keys") else None)
        self.workers, self.group = None, None
        if peers or discover:
            self._start_group(folder, peers, discover, options)
        else:
            self._start_local(folder, options)

    def _start_local(self, folder: Path, options: dict) -> None:
        import dataclasses

        import torch

        from edge_runtime.tp.launch import LocalWorkers, rank_folder, start_master
        from edge_runtime.tp.plan import ShardPlan
        world_size = ShardPlan.load(folder / "plan.json").world_size
        self.config = dataclasses.replace(self.config, world_size=world_size)
        if world_size > 1:
            self.workers = LocalWorkers(folder, self.config)
            torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        try:
            master = start_master(folder, self.config)
        except BaseException:
            if self.workers:
                self.workers.stop(grace_s=0.5)
            raise
        # tokenizer_config.json (the chat template) would sit beside rank 0's tokenizer.json
        self._init_engine(master, rank_folder(folder, 0), int(options.get("max_new_tokens", 32)))

    def _start_group(self, folder: Path, peers, discover, options: dict) -> None:
        from edge_runtime.tp.group import Discovery, Group, rank_profile
        from edge_runtime.tp.launch import DEFAULT_CACHE
        from split.llama.quantize import handler
        cache = Path(options.get("cache_dir", DEFAULT_CACHE))
        if peers and discover:
            raise ValueError("give peers or discover, not both")
        if discover:
            if isinstance(discover, bool) or not isinstance(discover, int) or discover < 1:
                raise ValueError(f"discover must be an integer >= 1, got {discover!r}")
            known = Path(options.get("known_peers", cache.parent / "known_tp_peers"))
            peers = Discovery(discover, float(options.get("discover_timeout_s", 10.0)), known,
                              options.get("trust_on_first_use") is True)
        elif not (isinstance(peers, list) and all(isinstance(p, str) for p in peers)):
            raise ValueError(f"peers must be a list of \"host:port\" strings, got {peers!r}")
        quantize = options.get("quantize")
        model = next(iter(sorted(folder.glob("*.gguf"))), folder)  # a package holding a GGUF file: that file
        self.group = Group(model, peers, self.config,
                           quantize=handler(quantize, int(options.get("group_size", 32))) if quantize else None,
                           cache_dir=cache, profile=rank_profile(options.get("profile")),
                           log=lambda m: print(m, flush=True))
        self._init_engine(self.group, folder, int(options.get("max_new_tokens", 32)))

    def describe(self) -> dict:
        if self.group is not None:
            return {"kind": self.kind, **self.group.describe()}
        return {"kind": self.kind, "world_size": self.config.world_size}

    def _release(self) -> None:
        self.master.close()
        if self.workers:
            self.workers.stop(grace_s=2.0)


# --- collab-llm ---------------------------------------------------------------------------------
class CollabPipeline(LlmPipeline):
    """Input `prompt` (BYTES, one UTF-8 string; or `prompt_ids` INT64); parameter max_new_tokens.
    Outputs `text`, `tokens` and per token `sources` (edge | cloud | degraded). Decodes greedily
    (the exit head's or the cloud's choice): a stream's sampling is ignored (`samples` is False).
    OIP infer generates max_new_tokens without stopping at EOS, as it always has; streams stop at
    the checkpoint's EOS ids unless told otherwise."""

    samples = False

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from tokenizers import Tokenizer

        from edge_runtime.collab.cli import resolve_threshold
        from edge_runtime.collab.device import CollabLlm
        from split.llama import LlamaConfig
        super().__init__(name, "collab-llm", "edgefold_collab_llm")
        self.mode = str(options.get("mode", "collaborative"))
        metric = str(options.get("metric", "max_prob"))
        threshold = resolve_threshold(folder, options.get("threshold"), metric, None, self.mode)
        deadline_s = float(options.get("deadline_s", 5.0))
        self.llm = CollabLlm(folder, "speculative" if self.mode == "auto" else self.mode, None, threshold, metric,
                             cloud_model=str(options.get("cloud_model", "llm")), timeout_s=deadline_s,
                             quantize=options.get("quantize"), group_size=int(options.get("group_size", 32)),
                             client=ctx.client(deadline_s) if self.mode != "standalone" and ctx.cloud else None)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json")) \
            if (folder / "tokenizer.json").is_file() else None
        config = LlamaConfig.from_dir(folder)       # with generation_config.json's EOS ids
        self.eos_ids = tuple(config.eos_token_ids)
        self.context_length = int(config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.model_folder = Path(folder)
        self.reason = "start"
        self._init_llm(int(options.get("max_new_tokens", 32)))
        self.outputs += (TensorInfo("sources", "BYTES", (-1,)),)
        self.auto, self.allow_cloud, self.chose = None, True, None
        if self.mode == "auto":   # per request: measure, predict, run the fastest lossless mode (collab/auto.py)
            from edge_runtime.collab.auto import AutoLlm
            rate = float(options.get("link_rate_mbit", getattr(ctx.link, "rate_mbit", 10.0) or 10.0))
            self.auto = AutoLlm(self.llm, rate, float(options.get("max_ppl_increase", 0.0)))

    def adapt(self, decision: Decision, link) -> None:
        if self.mode in ("collaborative", "auto"):
            with self._lock:
                if self.mode == "collaborative":
                    self.llm.mode = "collaborative" if decision.allow_cloud else "standalone"
                self.allow_cloud, self.reason = decision.allow_cloud, decision.reason

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": self.chose or self.llm.mode, "threshold": self.llm.threshold,
                "why": self.reason, **({"auto": True} if self.auto else {})}

    def infer(self, inputs: dict, params: dict, stop_ids=()) -> dict:
        return super().infer(inputs, params, stop_ids)

    def _run(self, p: Progress, max_new_tokens: int, sampling, stop):
        """One CollabLlm turn, token by token; then the conversation is ended (one request, one
        conversation: the cloud frees it). Mode auto: the mode AutoLlm picks (standalone while the
        policy keeps the cloud off)."""
        if self.auto is not None:
            if self.allow_cloud:
                yield from self._run_auto(p, max_new_tokens, stop)
                return
            self.llm.set_mode("standalone")
            self.chose = "standalone"
        turn = self.llm.turn(p.prompt_ids, max_new_tokens, stop)
        res = turn.result
        p.sources, p.seconds = res.sources, turn.generation.seconds
        try:
            for tok in turn:
                p.device_tokens, p.finish_reason = res.counters.edge_tokens, turn.finish_reason
                yield tok
            p.finish_reason = turn.finish_reason
        finally:
            p.device_tokens = res.counters.edge_tokens
            self.counters["offloaded"] += res.sources.count("cloud")
            self.counters["degraded"] += res.sources.count("degraded")
            self.llm.end(res.conversation)

    def _run_auto(self, p: Progress, max_new_tokens: int, stop):
        """AutoLlm.generate on a thread of its own, its tokens handed out as they are decided; the
        thread is waited for before the pipeline's lock is released. A stream closed early stops it
        at its next token (its stream cancelled, its conversation ended)."""
        import queue
        tokens, done, reader_gone = queue.Queue(), object(), threading.Event()

        def hand_out(step, token, source):
            if reader_gone.is_set() or p.closed.is_set():
                raise StreamClosed("the stream was closed")
            tokens.put((token, source))

        def work():
            try:
                r = self.auto.generate(p.prompt_ids, max_new_tokens, stop, on_token=hand_out)
                self.chose = r.mode
                tokens.put((done, r))
            except BaseException as err:   # handed to the stream's reader
                tokens.put((done, err))
        worker = threading.Thread(target=work, name=f"{self.name}-auto", daemon=True)
        worker.start()
        p.sources, generated, t0 = [], [], time.perf_counter()
        try:
            while True:
                token, source = tokens.get(timeout=self.llm.timeout_s * (max_new_tokens + 4))
                if token is done:
                    if isinstance(source, BaseException):
                        raise source
                    break
                generated.append(token)
                p.sources.append(source)
                p.seconds.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                p.device_tokens = sum(s in ("edge", "degraded") for s in p.sources)
                if len(generated) == max_new_tokens or stop.reached(generated):
                    p.finish_reason = "length" if len(generated) == max_new_tokens and not stop.reached(generated) else "stop"
                yield token
        finally:
            reader_gone.set()
            worker.join(self.llm.timeout_s * (max_new_tokens + 4))
            self.counters["offloaded"] += sum(s in ("cloud", "draft") for s in p.sources)
            self.counters["degraded"] += p.sources.count("degraded")

    def _release(self) -> None:
        self.llm.close()
