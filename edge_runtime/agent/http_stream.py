"""One generation served over HTTP (TextGeneration: the worker thread; Answer: its OpenAI bodies, SSE
or whole), and the Prometheus metrics of the OpenAI-compatible endpoint (http_api.py).

    gen = TextGeneration(pipe.name, stream, pipe.tokenizer, StopStrings(stops), pipe.eos_ids, metrics,
                     arrived=time.perf_counter(), loop=asyncio.get_running_loop())
    gen.start()                                  # a worker thread iterates the TokenStream
    while (event := await gen.events.get())[0] != "end":
        ...                                      # ("text", piece) as tokens complete text
    gen.finish_reason, gen.error, gen.prompt_tokens, gen.completion_tokens, gen.device_tokens
    gen.close()                                  # any time, any thread: generation stops within one token

    answer = Answer(gen, pipe, request, chat=True)   # request: llm_api's ChatRequest / CompletionRequest
    StreamingResponse(answer.events())           # SSE chunks (it starts gen), or:
    response = await answer.whole(receive)       # one JSON body; the client leaving closes gen

The pipeline's TokenStream blocks (it waits for the pipeline's lock, then computes token after
token), so it runs in a thread of its own and hands text to the event loop through an asyncio
queue (loop.call_soon_threadsafe): the loop never blocks, and one stream costs one thread, not a
slot of a shared pool that a slow client could exhaust. The thread turns ids into text with
llm_api's IncrementalDetokenizer (never a split character) and StopStrings (a stop string ends the
generation, finish_reason "stop", and is never sent). The stop ids (the checkpoint's EOS) end the
stream inside the pipeline and are counted as completion tokens but not detokenized.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.responses import JSONResponse, Response

from edge_runtime.llm_api import (
    SSE_DONE, ApiError, IncrementalDetokenizer, chat_chunk, chat_response, completion_chunk, completion_response,
    new_id, sse, usage, usage_chunk,
)

log = logging.getLogger("edge_runtime.agent.http")

_LATENCY_BUCKETS = (1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5)


class LlmMetrics:
    """The endpoint's metrics, labelled by pipeline (the model name clients use), in a registry of
    their own (served at GET /metrics of the HTTP port)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        p = ("pipeline",)
        self.ttft = Histogram("edgefold_llm_time_to_first_token_seconds",
                              "From a request's arrival to its first token (queue wait and prefill included)",
                              p, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("edgefold_llm_inter_token_latency_seconds",
                             "Between consecutive tokens of one generation", p, buckets=_TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram("edgefold_llm_queue_wait_seconds",
                                    "From a request's arrival to the start of its generation (waiting for the "
                                    "pipeline)", p, buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("edgefold_llm_generated_tokens", "Tokens generated", p, registry=r)
        self.prompt_tokens = Counter("edgefold_llm_prompt_tokens", "Prompt tokens of the generations started",
                                     p, registry=r)
        self.device_tokens = Counter("edgefold_llm_device_tokens",
                                     "collab-llm: generated tokens decided on the device", p, registry=r)
        self.requests = Counter("edgefold_llm_requests",
                                "HTTP requests by status code (499: the client went away first; pipeline \"\": "
                                "none named, or not one this agent serves)", ("pipeline", "status"), registry=r)
        self.queued = Gauge("edgefold_llm_queue_depth", "HTTP requests waiting for or running a generation", p,
                            registry=r)

    def request(self, pipeline: str, status: int) -> None:
        self.requests.labels(pipeline, str(status)).inc()


class TextGeneration:
    """One TokenStream read in a worker thread; its text as events on an asyncio queue (see the
    module's docstring). After the ("end", None) event: finish_reason ("stop" | "length", or None
    when it was closed before its end or failed), error, prompt_tokens, completion_tokens and
    device_tokens (collab-llm; else None)."""

    def __init__(self, pipeline: str, stream, tokenizer, stops, skip_ids, metrics: LlmMetrics, arrived: float,
                 loop: asyncio.AbstractEventLoop):
        self.pipeline, self.stream, self.tokenizer, self.stops = pipeline, stream, tokenizer, stops
        self.skip_ids = frozenset(int(t) for t in skip_ids)
        self.metrics, self.arrived, self._loop = metrics, arrived, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"llm-{pipeline}", daemon=True)

    @property
    def prompt_tokens(self) -> int:
        return self.stream.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.stream.completion_tokens

    @property
    def device_tokens(self) -> int | None:
        return self.stream.device_tokens

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """End the generation (no further token; the pipeline's lock is released). Idempotent."""
        self.stream.close()

    def join(self, timeout_s: float) -> bool:
        if self.started:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _put(self, kind: str, value) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:        # the event loop is closed (the server stopped): nobody reads on
            self.stream.close()

    def _run(self) -> None:
        m, name = self.metrics, self.pipeline
        began, last = time.perf_counter(), None
        try:
            detok = IncrementalDetokenizer(self.tokenizer, self.stream.prompt_ids)
            m.prompt_tokens.labels(name).inc(self.stream.prompt_tokens)
            for tok in self.stream:
                now = time.perf_counter()
                if last is None:
                    m.ttft.labels(name).observe(now - self.arrived)
                    m.queue_wait.labels(name).observe(began - self.arrived + (self.stream.queue_s or 0.0))
                else:
                    m.itl.labels(name).observe(now - last)
                last = now
                m.tokens.labels(name).inc()
                if tok in self.skip_ids:
                    continue
                piece, stopped = self.stops.feed(detok.push(tok))
                if piece:
                    self._put("text", piece)
                if stopped:
                    self.finish_reason = "stop"
                    self.stream.close()
                    break
            else:
                if not self.stream.closed:
                    piece, stopped = self.stops.feed(detok.flush())
                    piece += "" if stopped else self.stops.finish()
                    if piece:
                        self._put("text", piece)
                    self.finish_reason = "stop" if stopped else self.stream.finish_reason
        except Exception as err:        # the pipeline failed mid-generation: the client is told in-band
            log.exception("pipeline %s: generation failed", name)
            self.error, self.finish_reason = err, None
        finally:
            self.stream.close()         # releases the pipeline whatever happened
            if self.device_tokens is not None:
                m.device_tokens.labels(name).inc(self.device_tokens)
            self.done.set()
            self._put("end", None)


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error JSON with the error's status."""
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _disconnected(receive) -> None:
    """Returns once the client has gone (or the response was sent)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Answer:
    """A started request's answer: its SSE events, or the whole JSON body."""

    def __init__(self, gen: TextGeneration, pipe, req, chat: bool):
        self.gen, self.req, self.chat = gen, req, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.model, self.created = pipe.name, int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _extra(self) -> dict:
        n = self.gen.device_tokens
        return {"edgefold": {"device_tokens": n}} if n is not None else {}

    def _usage(self) -> dict:
        return usage(self.gen.prompt_tokens, self.gen.completion_tokens)

    def _chunk(self, text: str | None, finish_reason: str | None = None, **extra) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return chat_chunk(self.id, self.model, self.created, delta, finish_reason, self.req.include_usage, **extra)
        return completion_chunk(self.id, self.model, self.created, text or "", finish_reason,
                                self.req.include_usage, **extra)

    async def _texts(self):
        """The generation's text pieces as they come (pieces already waiting are joined into one)."""
        gen = self.gen
        gen.start()
        while True:
            items = [await gen.events.get()]
            while not gen.events.empty():
                items.append(gen.events.get_nowait())
            text = "".join(v for k, v in items if k == "text")
            if text:
                yield text
            if any(k == "end" for k, _ in items):
                return

    async def events(self):
        req = self.req
        if self.chat:
            yield sse(chat_chunk(self.id, self.model, self.created, {"role": "assistant", "content": ""},
                                 None, req.include_usage))
        async for text in self._texts():
            yield sse(self._chunk(text))
        gen = self.gen
        if gen.error is not None:
            err = ApiError(f"the generation failed: {type(gen.error).__name__}: {gen.error}", None, status=500,
                           type="server_error")
            yield sse(err.body())
        elif gen.finish_reason is not None:
            yield sse(self._chunk(None, gen.finish_reason, **self._extra()))
            if req.include_usage:
                yield sse(usage_chunk(self.id, self.model, self.created, self.object, self._usage(), **self._extra()))
        else:
            return                        # closed: the client is gone or the server is stopping
        yield SSE_DONE

    async def whole(self, receive) -> Response:
        """The whole answer; a client that goes away meanwhile closes the generation."""
        watch = asyncio.ensure_future(_disconnected(receive))
        watch.add_done_callback(lambda task: task.cancelled() or self.gen.close())
        try:
            text = "".join([piece async for piece in self._texts()])
        finally:
            watch.cancel()
        gen = self.gen
        if gen.error is not None:
            return error_response(ApiError(f"the generation failed: {type(gen.error).__name__}: {gen.error}",
                                           None, status=500, type="server_error"))
        if gen.finish_reason is None:     # closed: nobody reads this
            return Response(status_code=499)
        build = chat_response if self.chat else completion_response
        return JSONResponse(build(self.id, self.model, self.created, text, gen.finish_reason, self._usage(),
                                  **self._extra()))
