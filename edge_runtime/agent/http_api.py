"""The agent's OpenAI-compatible HTTP endpoint over its LLM pipelines (kinds llm, tp, collab-llm):
a Starlette app on uvicorn, in a thread of the agent's process with its own event loop, beside
the gRPC OIP server ([serve] http_port; off when absent).

    GET  /v1/models              the LLM pipelines ready to serve, by name (OpenAI's list format)
    GET  /v1/models/{model}      one of them
    POST /v1/chat/completions    messages -> the checkpoint's chat template -> a generation
    POST /v1/completions         prompt (text or token ids) -> a generation
    GET  /metrics                Prometheus text (http_stream.LlmMetrics)
    GET  /health                 200 once listening (never needs the token), with each pipeline's describe()
                                 (a tp group: its members, plan and recoveries)

Requests are llm_api's (ChatRequest / CompletionRequest: a bad field is a 400 naming it); answers
are OpenAI's: one JSON object with `usage`, or with `"stream": true` server-sent events (for chat
a role delta first, then content deltas as tokens complete text, a last chunk with finish_reason,
a usage chunk when stream_options.include_usage, then `data: [DONE]`). A collab-llm pipeline adds
`"edgefold": {"device_tokens": N}` (tokens decided on the device) to its last chunk / its answer,
which OpenAI clients ignore. Every error is OpenAI's error JSON: 400 bad field, a chat on a model
without a chat template, a prompt that does not fit the context (naming both lengths); 401
without the token; 404 an unknown model or path; 429 (Retry-After) when the pipeline's queue is
full; 503 (Retry-After) a pipeline whose model is not on the device yet; 500 a pipeline failure
(in-band as an SSE error event once a stream has begun).

Prompts: a chat's messages are rendered with the template and encoded without adding special
tokens (the template writes BOS); a completions text prompt is encoded with them (BOS, as vLLM
does); token ids are taken as they are.

Generation: greedy at temperature 0, else sampled (split.llama.Sampling; collab-llm always decodes
greedily); it ends at the checkpoint's EOS ids or a stop string (finish_reason "stop") or after
max_tokens (finish_reason "length"). Without max_tokens a request may generate what is left of
the model's context (as vLLM does): the pipelines' max_new_tokens option bounds OIP requests only.

Serving: each pipeline generates one request at a time (its lock); up to max_queue HTTP requests
per pipeline ([serve] max_queue, or the pipeline's own max_queue option) wait or run, another is
refused with 429 at once. A client that disconnects (mid-stream, or while a non-streamed answer is
computed, or still queued) closes its TokenStream: generation stops within one token and the next
request runs. With [serve] token_file every path but /health needs `Authorization: Bearer
<token>` (hmac.compare_digest), else 401 with `WWW-Authenticate: Bearer`. stop(grace_s): no new
connections, streams in flight get grace_s to finish (uvicorn's graceful shutdown), those still
running then are cancelled and their generations closed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import weakref

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_runtime.agent.http_stream import Answer, LlmMetrics, TextGeneration, error_response
from edge_runtime.agent.llm_pipelines import LlmPipeline
from edge_runtime.agent.pipeline import PipelineInputError
from edge_runtime.llm_api import (
    ApiError, ChatRequest, ChatTemplate, ChatTemplateError, CompletionRequest, NoChatTemplate, StopStrings,
)
from edgefold_proto.auth import BearerToken

log = logging.getLogger("edge_runtime.agent.http")
LLM_KINDS = ("llm", "tp", "collab-llm")
MAX_BODY_BYTES = 8 << 20
RETRY_AFTER_S = 1
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _not_found(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(message, param, status=404, code=code)


class _BearerToken:
    """ASGI middleware: 401 (OpenAI's error JSON, WWW-Authenticate: Bearer) for a request without
    `Authorization: Bearer <token>`, on every path but the open ones."""

    def __init__(self, app, token: str, metrics: LlmMetrics, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.metrics, self.open_paths = app, metrics, open_paths
        self._token = BearerToken(token)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            presented = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not self._token.matches(presented):
                err = ApiError("missing or wrong API key: send 'Authorization: Bearer <token>' (the agent's "
                               "[serve] token_file)", None, status=401, code="invalid_api_key")
                self.metrics.request("", 401)
                await error_response(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _EventStream(StreamingResponse):
    """Server-sent events; `on_exit` runs however the response ends (done, the client gone,
    cancelled at shutdown)."""

    def __init__(self, events, on_exit):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_exit = on_exit

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_exit()


class _GroupCollector:
    """At each scrape, the elastic tensor-parallel groups of the agent's tp pipelines (their describe())."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []  # no sample at registration: the pipelines may not be open yet

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        world = GaugeMetricFamily("edgefold_tp_group_world_size", "Ranks in the group now (this device included)",
                                  labels=["pipeline"])
        absent = GaugeMetricFamily("edgefold_tp_group_absent_peers", "Known peers not in the group now",
                                   labels=["pipeline"])
        epoch = GaugeMetricFamily("edgefold_tp_group_epoch", "Formations of the group so far", labels=["pipeline"])
        recoveries = CounterMetricFamily("edgefold_tp_group_recoveries", "Re-plans after a lost peer mid-generation",
                                         labels=["pipeline"])
        for name, pipe in list(self.agent.pipelines.items()):
            group = getattr(pipe, "group", None)
            if group is None:
                continue
            state = group.describe()
            world.add_metric([name], state["world_size"])
            absent.add_metric([name], len(state["absent"]))
            epoch.add_metric([name], state["epoch"])
            recoveries.add_metric([name], state["recoveries"])
        yield from (world, absent, epoch, recoveries)


class HttpApi:
    def __init__(self, agent, host: str, port: int, token: str | None = None, max_queue: int = 8):
        self.agent, self.host, self.port = agent, host, port
        self.max_queue = max_queue
        self.metrics = LlmMetrics()
        self.metrics.registry.register(_GroupCollector(agent))
        self.created = int(time.time())
        self._queued: dict[str, int] = {}                # pipeline -> requests waiting or running (loop only)
        self._templates: dict[str, tuple] = {}           # pipeline -> (the Pipeline, ChatTemplate or error)
        self._running: set[TextGeneration] = set()                   # holding a slot of their pipeline's queue
        self._generations: weakref.WeakSet = weakref.WeakSet()    # every one whose thread may still run
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/metrics", self.prometheus, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        self.app = Starlette(routes=routes, middleware=[Middleware(_BearerToken, token=token, metrics=self.metrics)] if token else [],
                             exception_handlers={HTTPException: self._http_error, Exception: self._crash})

    # --- lifecycle (any thread) ------------------------------------------------------------------
    def start(self) -> int:
        """Listen (OSError if the port is taken) and serve in a thread of its own; returns the port."""
        family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.port} (http_port): {err}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False, http="h11",
                                ws="none", loop="asyncio", timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="agent-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self.port

    def begin_stop(self, grace_s: float) -> None:
        """No new connections; requests in flight get grace_s, then are cancelled."""
        if self._server is not None:
            log.info("HTTP: stopping; %d request(s) in flight get up to %.1f s", len(self._running), grace_s)
            self._server.config.timeout_graceful_shutdown = grace_s
            self._server.should_exit = True

    def wait_stopped(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
        generations = list(self._generations)  # the loop is gone: end what it did not, before pipelines close
        for gen in generations:
            gen.close()
        for gen in generations:
            if not gen.join(5.0):
                log.warning("pipeline %s: a generation did not end within 5 s of its close", gen.pipeline)

    def stop(self, grace_s: float) -> None:
        self.begin_stop(grace_s)
        self.wait_stopped(grace_s + 5.0)

    # --- errors ----------------------------------------------------------------------------------
    async def _http_error(self, request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(f"{request.method} {request.url.path}: {exc.detail}", None,
                                       status=exc.status_code, code=code), exc.headers)

    async def _crash(self, request, exc: Exception):
        log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(f"internal error: {type(exc).__name__}: {exc}", None, status=500,
                                       type="server_error"))

    # --- routes ----------------------------------------------------------------------------------
    async def health(self, request):
        return JSONResponse({"status": "ok", "ready": self.agent.ready(),
                             "pipelines": {n: p.describe() for n, p in list(self.agent.pipelines.items())}})

    async def prometheus(self, request):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _llm_pipelines(self) -> dict:
        return {name: pipe for name, pipe in list(self.agent.pipelines.items()) if isinstance(pipe, LlmPipeline)}

    def _model_card(self, name: str, pipe) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "edgefold",
                "max_model_len": pipe.context_length, "edgefold": {"kind": pipe.kind}}

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self._model_card(n, p)
                                                         for n, p in self._llm_pipelines().items()]})

    async def model(self, request):
        name = request.path_params["model"]
        try:
            return JSONResponse(self._model_card(name, self._pipeline(name)))
        except ApiError as err:
            return error_response(err, self._retry(err))

    async def chat_completions(self, request):
        return await self._serve(request, chat=True)

    async def completions(self, request):
        return await self._serve(request, chat=False)

    # --- one request -----------------------------------------------------------------------------
    def _pipeline(self, model: str | None):
        llms = self._llm_pipelines()
        if model is None:
            if len(llms) == 1:
                return next(iter(llms.values()))
            raise ApiError("'model' is required: this agent serves " + (", ".join(llms) or "no language model yet"),
                           "model", code="missing_required_parameter")
        pipe = llms.get(model)
        if pipe is not None:
            return pipe
        spec = next((s for s in self.agent.config.pipelines if s.name == model and s.kind in LLM_KINDS), None)
        if spec is not None and model in self.agent.waiting:
            raise ApiError(f"model '{model}' is not ready on this device: {self.agent.waiting[model]}", "model",
                           status=503, type="server_error", code="model_not_ready")
        raise _not_found(f"The model '{model}' does not exist: this agent serves "
                         f"{', '.join(llms) or 'no language model'}", "model", "model_not_found")

    @staticmethod
    def _retry(err: ApiError) -> dict | None:
        return {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None

    async def _body(self, request) -> dict:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise ApiError(f"the request body exceeds {MAX_BODY_BYTES} bytes", None, status=413,
                               code="request_too_large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(f"the request body is not valid JSON: {err}", None, code="invalid_json") from None

    def _template(self, pipe) -> ChatTemplate:
        cached = self._templates.get(pipe.name)
        if cached is None or cached[0] is not pipe:           # a swapped-in version reads its own
            try:
                found = ChatTemplate.from_dir(pipe.model_folder)
            except (NoChatTemplate, ChatTemplateError, OSError, ValueError) as err:
                found = err
            cached = self._templates[pipe.name] = (pipe, found)
        if isinstance(cached[1], Exception):
            raise ApiError(str(cached[1]), "messages", code="invalid_value")
        return cached[1]

    def _prompt_ids(self, pipe, req, chat: bool) -> list[int]:
        """The prompt's token ids (runs in a worker thread: templates and tokenizers take CPU)."""
        if chat:
            template = self._template(pipe)
            if pipe.tokenizer is None:
                raise ApiError("this model has no tokenizer.json, so it cannot chat", "messages", code="invalid_value")
            try:
                text = template.render(list(req.messages), add_generation_prompt=True, **req.chat_template_kwargs)
            except ChatTemplateError as err:
                raise ApiError(str(err), "messages", code="invalid_value") from None
            return pipe.tokenizer.encode(text, add_special_tokens=False).ids     # the template wrote BOS
        if pipe.tokenizer is None:
            raise ApiError("this model has no tokenizer.json, so its output cannot be given as text", "model",
                           code="invalid_value")
        if isinstance(req.prompt, str):
            return pipe.tokenizer.encode(req.prompt).ids
        return list(req.prompt)

    def _open_stream(self, pipe, req, ids: list[int], chat: bool):
        """The pipeline's TokenStream for this request (not started), or ApiError 400."""
        left = pipe.context_length - len(ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else max(left, 1)
        sampling = None
        if pipe.samples:
            from split.llama import Sampling
            sampling = Sampling(**req.sampling_kwargs())
        try:
            return pipe.stream(ids, max_tokens, sampling, None)
        except PipelineInputError as err:
            if len(ids) + max_tokens > pipe.context_length:
                param = "max_tokens" if req.max_tokens is not None and left > 0 else ("messages" if chat else "prompt")
                raise ApiError(str(err), param, code="context_length_exceeded") from None
            raise ApiError(str(err), "messages" if chat else "prompt", code="invalid_value") from None

    async def _serve(self, request, chat: bool) -> Response:
        arrived = time.perf_counter()
        name = ""
        try:
            body = await self._body(request)
            req = (ChatRequest if chat else CompletionRequest).parse(body)
            pipe = self._pipeline(req.model)
            name = pipe.name
            ids = await run_in_threadpool(self._prompt_ids, pipe, req, chat)
            stream = self._open_stream(pipe, req, ids, chat)
            limit = int(self._spec_option(name, "max_queue", self.max_queue))
            if self._queued.get(name, 0) >= limit:
                stream.close()
                raise ApiError(f"model '{name}' is busy: {limit} requests are already waiting or running; "
                               f"retry in {RETRY_AFTER_S} s", None, status=429, type="requests",
                               code="rate_limit_exceeded")
        except ApiError as err:
            self.metrics.request(name, err.status)
            return error_response(err, self._retry(err))
        self._queued[name] = self._queued.get(name, 0) + 1
        self.metrics.queued.labels(name).inc()
        gen = TextGeneration(name, stream, pipe.tokenizer, StopStrings(req.stop), pipe.eos_ids, self.metrics, arrived,
                         asyncio.get_running_loop())
        self._running.add(gen)
        self._generations.add(gen)
        answer = Answer(gen, pipe, req, chat)
        if req.stream:
            return _EventStream(answer.events(), lambda: self._finished(gen, pipe))
        try:
            return await answer.whole(request.receive)
        finally:
            self._finished(gen, pipe)

    def _spec_option(self, name: str, key: str, default):
        spec = next((s for s in self.agent.config.pipelines if s.name == name), None)
        return spec.options.get(key, default) if spec is not None else default

    def _finished(self, gen: TextGeneration, pipe) -> None:
        """The request is over, however it ended: its slot in the queue is free again."""
        gen.close()
        if gen in self._running:
            self._running.discard(gen)
            self._queued[gen.pipeline] -= 1
            self.metrics.queued.labels(gen.pipeline).dec()
            status = 500 if gen.error is not None else 200 if gen.finish_reason else 499
            self.metrics.request(gen.pipeline, status)
            pipe.counters["requests" if status != 500 else "failures"] += 1
