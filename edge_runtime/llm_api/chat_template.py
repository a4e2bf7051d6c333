"""A checkpoint's chat template: OpenAI-style messages -> the prompt text the model was tuned on.

    template = ChatTemplate.from_dir("path/to/hf_folder")        # NoChatTemplate if it has none
    text = template.render([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi!"}])  # ends with the assistant header
    ids = tokenizer.encode(text, add_special_tokens=False).ids    # the template wrote BOS already

The template comes from the folder's `chat_template.jinja` (newer transformers write it there) or
else `tokenizer_config.json`'s `chat_template`: a string, or a list of {"name", "template"} of
which "default" is used. It is rendered the way transformers' `apply_chat_template(...,
tokenize=False)` renders it, so prompts are the ones the model was tuned on: Jinja2's immutable
sandbox with trim_blocks and lstrip_blocks, the loop controls, a `{% generation %}` block that
renders its body, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that does not
escape HTML, and as variables `messages`, `add_generation_prompt`, `tools` and `documents` (None)
and the special tokens of tokenizer_config.json (`bos_token`, `eos_token`, ...), overridden by any
keyword given to `render`.

Messages are checked first (`validate_messages`): a non-empty list of {"role": str, "content": str
or [{"type": "text", "text": str}, ...]}. Text parts are joined with "\\n" into one string, as vLLM
does, because most templates handle only string content; any other part type (an image, audio)
is refused, naming its index. Other keys (e.g. "name") pass through; keys whose value is None are
dropped, as transformers drops them.

Errors: `NoChatTemplate` (a LookupError) from `from_dir` when the folder has no template, its
message ready for a 400 ("... use /v1/completions"); `MessageError` (a ValueError with `.param`,
e.g. "messages[1].content[0].type") for bad messages; `ChatTemplateError` (a ValueError) when the
template does not compile, or fails while rendering: its own raise_exception (e.g. "roles must
alternate"), an undefined attribute, a sandbox violation, any other exception inside it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError", "MessageError", "NoChatTemplate", "validate_messages"]

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class NoChatTemplate(LookupError):
    """The model has no chat template: it can complete text (/v1/completions) but not chat."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        super().__init__("this model has no chat template (no chat_template in tokenizer_config.json and no "
                         "chat_template.jinja); use /v1/completions with a prompt instead")


class ChatTemplateError(ValueError):
    """The template did not compile, or rendering these messages failed inside it."""


class MessageError(ValueError):
    """A message is malformed; `param` names where (e.g. "messages[2].content")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def validate_messages(messages) -> list[dict]:
    """Checked, normalized copies of OpenAI chat messages (content always a string)."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise MessageError(f"{where} must be an object with 'role' and 'content'", where)
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise MessageError(f"{where}.role must be a non-empty string", f"{where}.role")
        if "content" not in msg:
            raise MessageError(f"{where}.content is missing", f"{where}.content")
        clean = {k: v for k, v in msg.items() if v is not None}
        clean["content"] = _content_text(msg["content"], f"{where}.content")
        out.append(clean)
    return out


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError(f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise MessageError(f"{here} must be an object {{\"type\": \"text\", \"text\": ...}}", here)
        if part.get("type") != "text":
            raise MessageError(f"{here}.type is {part.get('type')!r}: only \"text\" parts are supported "
                               "(this endpoint serves a text-only model)", f"{here}.type")
        if not isinstance(part.get("text"), str):
            raise MessageError(f"{here}.text must be a string", f"{here}.text")
        texts.append(part["text"])
    return "\n".join(texts)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"the chat template does not compile: {err}") from err

    @classmethod
    def from_dir(cls, folder: str | Path) -> "ChatTemplate":
        """The template of a Hugging Face checkpoint folder; NoChatTemplate when it has none."""
        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        config = {}
        if config_file.is_file():
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            raise NoChatTemplate(folder)
        specials = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
        return cls(source, {name: text for name, text in specials.items() if text is not None})

    def render(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for these messages; `extra` are further template variables
        (e.g. enable_thinking=False for Qwen3)."""
        context = {**self.special_tokens, "tools": None, "documents": None, **extra,
                   "messages": validate_messages(messages), "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return self._template.render(**context)
        except jinja2.TemplateError as err:  # raise_exception, undefined attributes, sandbox violations
            raise ChatTemplateError(f"chat template: {err}") from err
        except Exception as err:  # a template bug (a type error in it, ...): still a clear error
            raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from err
