"""Streamed text: token ids -> text pieces as they complete, and stop strings cut out of the stream.

    detok = IncrementalDetokenizer(tokenizer, prompt_ids)    # a tokenizers.Tokenizer
    stops = StopStrings(["\\n\\n", "User:"])
    for tok in generation:                                   # split.llama.Generation
        text, stopped = stops.feed(detok.push(tok))
        send(text)                                           # "" while a character is incomplete
        if stopped:
            break                                            # finish_reason "stop"
    else:
        send(stops.feed(detok.flush())[0] + stops.finish())

`IncrementalDetokenizer` decodes a short sliding window of ids, as text-generation servers do:
the text of ids[prefix:] minus the text of ids[prefix:read] is what the newest ids added. Decoding
a window rather than one id keeps what a decoder does across ids (a leading space that only the
first token loses, "##" word pieces, bytes that only together make a character) and costs the same
for every token. New text is held back while it may still change:
  - while it ends in U+FFFD: a byte-level tokenizer's (GPT-2, Llama-3, Qwen) bytes of a character
    not yet complete;
  - while the last id is a byte-fallback token `<0xNN>` (Llama-2, Mistral): tokenizers decodes a
    whole run of them at once, a run holding any invalid byte as U+FFFD for every one of its bytes,
    so a run is final only once a non-byte token (special tokens skipped in decoding don't count)
    ends it. A character spelled in bytes therefore shows up one token late.
Hence the concatenation of every push() and the flush() equals `tokenizer.decode(ids)` (same
`skip_special_tokens`); U+FFFD appears only for bytes that are truly invalid, and an incomplete
character at the very end appears as U+FFFD only in flush(). Given `prompt_ids`, the text is read
in their context (a first generated "▁Hello" is " Hello", not "Hello").

`StopStrings` cuts the text at the first occurrence of any stop string. It holds back a tail that
could still become one, never emits a stop string's text, and on a match emits only the text before
it; `finish()` gives the held-back tail once the text ends without a match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["IncrementalDetokenizer", "StopStrings"]

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_WINDOW_BEFORE = 5  # prompt ids read as context before the first generated one


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = [int(t) for t in prompt_ids]
        self._read = len(self.ids)  # ids[:read] are emitted (or are the prompt)
        self._prefix = max(0, self._read - _WINDOW_BEFORE)  # the window's start
        self._open_run = False  # the last decoded id is a byte-fallback token
        self._kind: dict[int, str] = {}  # id -> "byte" | "skipped" | "text"
        self._special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    def _kind_of(self, token_id: int) -> str:
        kind = self._kind.get(token_id)
        if kind is None:
            if self.skip_special_tokens and token_id in self._special:
                kind = "skipped"
            else:
                token = self.tokenizer.id_to_token(token_id)
                kind = "byte" if token is not None and _BYTE_TOKEN.fullmatch(token) else "text"
            self._kind[token_id] = kind
        return kind

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        window = self.ids[self._prefix:]
        before = self._decode(window[:self._read - self._prefix])
        text = self._decode(window)
        if len(text) <= len(before) or not final and (self._open_run or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]

    def push(self, token_id: int) -> str:
        """The text that this id completes ("" while it is still undecided)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        kind = self._kind_of(token_id)
        if kind != "skipped":
            self._open_run = kind == "byte"
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of generation (U+FFFD for incomplete bytes)."""
        return self._advance(final=True)


class StopStrings:
    def __init__(self, stops: Iterable[str] = ()):
        self.stops = tuple(stops)
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stops!r}")
        self._held = ""
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found). After a stop, feeds emit nothing."""
        if self.stopped:
            return "", True
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)], True
        keep = self._held_back(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def finish(self) -> str:
        """The held-back tail, once the text has ended without a stop string."""
        held, self._held = self._held, ""
        return held
