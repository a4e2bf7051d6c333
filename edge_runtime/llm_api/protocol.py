"""OpenAI's chat-completions and completions wire format: request bodies in, response bodies out.

    try:
        req = ChatRequest.parse(body)            # body: the JSON-decoded request (a dict)
    except ApiError as err:
        return JSONResponse(err.body(), status_code=err.status)
    sampling = Sampling(**req.sampling_kwargs())  # split.llama.Sampling
    cid, created = new_id("chatcmpl"), int(time.time())
    yield sse(chat_chunk(cid, req.model, created, {"role": "assistant", "content": ""}))
    yield sse(chat_chunk(cid, req.model, created, {"content": "Hel"}))
    yield sse(chat_chunk(cid, req.model, created, {}, finish_reason="stop"))
    yield sse(usage_chunk(cid, req.model, created, "chat.completion.chunk", usage(12, 3)))  # include_usage
    yield SSE_DONE

Accepted (anything else in the body is ignored, as OpenAI-compatible servers do):
  model                 a string, or absent/null (the server then picks its one model)
  messages (chat)       see chat_template.validate_messages
  prompt (completions)  a string, a list of one string, a list of token ids, or a list of one list
                        of token ids; several prompts in one request are refused (one choice only)
  max_tokens            an integer >= 1, or null (the server's limit); for chat,
                        max_completion_tokens (its newer name) wins when both are given
  temperature           0..2, default 1 as OpenAI's; 0 is greedy
  top_p                 (0, 1], default 1
  seed                  an integer (64-bit) or null
  stop                  a non-empty string or a list of up to 4 of them (null or [] for none)
  n                     1 only
  stream, stream_options.include_usage   booleans; stream_options only with stream
  presence_penalty, frequency_penalty    0 only: they subtract from the logits of the generated
      tokens in proportion to their counts, which split.llama.sampling does not do; its
      repetition_penalty (HF/vLLM's, on prompt and output alike, multiplicative) is not the same
  top_k, repetition_penalty   extensions as in vLLM and llama.cpp: top_k >= 0 (0 or -1: off),
      repetition_penalty > 0 (1: off)
  chat_template_kwargs  (chat) an object of extra template variables, as in vLLM
  logprobs / top_logprobs, echo, best_of > 1: refused, since their output cannot be given.

A bad body raises `ApiError`: status 400, type "invalid_request_error", `param` naming the field,
`code` one of "invalid_type", "invalid_value", "missing_required_parameter", "unsupported_value";
`.body()` is OpenAI's error JSON {"error": {"message", "type", "param", "code"}}.

`sampling_kwargs()` gives keyword arguments for split.llama.Sampling rather than a Sampling itself,
because importing split.llama loads torch and this module stays torch-free.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .chat_template import MessageError, validate_messages

__all__ = [
    "ApiError", "ChatRequest", "CompletionRequest", "SSE_DONE", "chat_chunk", "chat_response",
    "completion_chunk", "completion_response", "new_id", "sse", "usage", "usage_chunk",
]

MAX_STOPS = 4
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes


class ApiError(Exception):
    """An error answered in OpenAI's error JSON."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- field readers: each returns the value or raises ApiError naming the field --------------------
def _type_error(name: str, expected: str, value) -> ApiError:
    return ApiError(f"Invalid type for '{name}': expected {expected}, but got {type(value).__name__}.",
                    name, code="invalid_type")


def _number(body: dict, name: str, default: float | None, lo: float, hi: float,
            lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(f"Invalid value for '{name}': {value!r} is not in {interval}.", name, code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if value < lo or hi is not None and value >= hi:
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ApiError(f"Invalid value for '{name}': {value} must be {bound}.", name, code="invalid_value")
    return value


def _boolean(body: dict, name: str, default: bool = False, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(where or name, "a boolean", value)
    return value


def _model(body: dict) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise _type_error("model", "a string", value)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or any(not isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' holds {len(stops)} strings; at most {MAX_STOPS} are allowed.", "stop",
                       code="invalid_value")
    if any(not s for s in stops):
        raise ApiError("'stop' strings must not be empty.", "stop", code="invalid_value")
    return tuple(stops)


def _stream_options(body: dict, stream: bool) -> bool:
    """include_usage."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    if not stream:
        raise ApiError("'stream_options' is only allowed when 'stream' is true.", "stream_options",
                       code="invalid_value")
    return _boolean(options, "include_usage", where="stream_options.include_usage")


def _refuse(body: dict, name: str, allowed) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise ApiError(f"'{name}' = {value!r} is not supported by this server.", name, code="unsupported_value")


@dataclass(frozen=True)
class _Common:
    """The fields chat and completions share."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @staticmethod
    def _common(body) -> dict:
        if not isinstance(body, dict):
            raise ApiError("The request body must be a JSON object.", None, code="invalid_type")
        stream = _boolean(body, "stream")
        if _integer(body, "n", 1, 1) != 1:
            raise ApiError("Only n = 1 is supported.", "n", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, 0.0, -2.0, 2.0) != 0:
                raise ApiError(f"'{name}' is not supported (only 0): it penalizes generated tokens by count, "
                               "which this server's sampling does not do; 'repetition_penalty' is available.",
                               name, code="unsupported_value")
        _refuse(body, "logprobs", (False, 0))
        _refuse(body, "top_logprobs", (0,))
        top_k = _integer(body, "top_k", 0, -1)
        return dict(
            model=_model(body), temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=max(top_k, 0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, float("inf"), lo_open=True),
            seed=_integer(body, "seed", None, *SEED_RANGE), stop=_stop(body), stream=stream,
            include_usage=_stream_options(body, stream), max_tokens=_integer(body, "max_tokens", None, 1))

    def sampling_kwargs(self) -> dict:
        """Keyword arguments of split.llama.Sampling (temperature 0: greedy)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed,
                "repetition_penalty": self.repetition_penalty}


@dataclass(frozen=True)
class ChatRequest(_Common):
    messages: tuple[dict, ...] = ()  # validated: content always a string
    chat_template_kwargs: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, body) -> "ChatRequest":
        fields = cls._common(body)
        if "messages" not in body:
            raise ApiError("Missing required parameter: 'messages'.", "messages", code="missing_required_parameter")
        try:
            messages = validate_messages(body["messages"])
        except MessageError as err:
            raise ApiError(str(err), err.param, code="invalid_value") from None
        limit = _integer(body, "max_completion_tokens", None, 1)
        if limit is not None:
            fields["max_tokens"] = limit
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise _type_error("chat_template_kwargs", "an object", kwargs)
        return cls(messages=tuple(messages), chat_template_kwargs=dict(kwargs or {}), **fields)


@dataclass(frozen=True)
class CompletionRequest(_Common):
    prompt: str | tuple[int, ...] = ""  # text, or token ids

    @classmethod
    def parse(cls, body) -> "CompletionRequest":
        fields = cls._common(body)
        _refuse(body, "echo", (False,))
        _refuse(body, "best_of", (1,))
        if "prompt" not in body:
            raise ApiError("Missing required parameter: 'prompt'.", "prompt", code="missing_required_parameter")
        return cls(prompt=_prompt(body["prompt"]), **fields)


def _prompt(value) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if min(value) < 0:
            raise ApiError("'prompt' token ids must be >= 0.", "prompt", code="invalid_value")
        return tuple(value)
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise ApiError(f"'prompt' holds {len(value)} prompts; this server answers one prompt per request.",
                       "prompt", code="unsupported_value")
    raise _type_error("prompt", "a string, a list of one string or a non-empty list of token ids", value)


# --- responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    """A response id: "chatcmpl-..." for chat, "cmpl-..." for completions."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(id: str, obj: str, created: int, model: str, choices: list, extra: dict) -> dict:
    return {"id": id, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def chat_chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               include_usage: bool = False, **extra) -> dict:
    """One streamed chat event. The first delta is {"role": "assistant", "content": ""}, then
    {"content": piece}; the last {} with finish_reason. With include_usage every chunk carries
    "usage": null, and a final usage_chunk() follows."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    body = _envelope(id, "chat.completion.chunk", created, model, [choice], extra)
    if include_usage:
        body["usage"] = None
    return body


def completion_chunk(id: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     include_usage: bool = False, **extra) -> dict:
    """One streamed completions event (the same object type as the whole answer, as OpenAI sends)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = _envelope(id, "text_completion", created, model, [choice], extra)
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(id: str, model: str, created: int, object: str, usage: dict, **extra) -> dict:
    """The last event when stream_options.include_usage: no choices, the usage.
    `object`: "chat.completion.chunk" or "text_completion"."""
    return {**_envelope(id, object, created, model, [], extra), "usage": usage}


def chat_response(id: str, model: str, created: int, content: str, finish_reason: str, usage: dict,
                  **extra) -> dict:
    """The whole non-streamed chat answer; `extra` adds top-level extension fields."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
              "finish_reason": finish_reason}
    return {**_envelope(id, "chat.completion", created, model, [choice], extra), "usage": usage}


def completion_response(id: str, model: str, created: int, text: str, finish_reason: str, usage: dict,
                        **extra) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**_envelope(id, "text_completion", created, model, [choice], extra), "usage": usage}


SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
