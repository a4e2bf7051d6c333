"""The one decode loop: a prefill over the prompt, then one new token per step, streamed.

    step = lambda ids, start: logits_of_last_position      # feeds ids at positions start.. -> (vocab,)
    run = Generation(step, prompt_ids, max_new_tokens=32, sampling=Sampling(), stop=Stop(eos_ids=(2,)))
    for tok in run:                                         # token ids as they are produced
        print(tok)
    run.finish_reason                                       # "stop" (eos / stop sequence) or "length"

    for tok in generate(model, prompt_ids, 32, stop=Stop.of(model.config)):   # a plain Llama here
        ...

Every way this project generates goes through `Generation`: a plain model (`generate` below), the
tensor-parallel master (its step runs every rank) and the collaborative LLM's device side (its
`choose` decides a token here or asks the cloud for it). A step function feeds the given ids at
the given start position and returns the logits of the last one; `choose(logits, history)` picks
the next token (default: `sample` with the request's sampling settings).

Stop conditions: max_new_tokens, an EOS id (the checkpoint's, from generation_config.json or
config.json: `Stop.of(config)`), or a stop sequence of token ids at the end of the generated
tokens. As in transformers, the token (or sequence) that stops generation is yielded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .model import Llama
from .sampling import Sampling, sample

Step = Callable[[list[int], int], torch.Tensor]  # (ids, start position) -> (vocab,) logits of the last id
Choose = Callable[[torch.Tensor, list[int]], int]  # (logits, prompt + generated ids) -> next token id


@dataclass(frozen=True)
class Stop:
    eos_ids: tuple[int, ...] = ()
    sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end generation

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(int(t) for t in self.eos_ids))
        object.__setattr__(self, "sequences", tuple(tuple(int(t) for t in s) for s in self.sequences))
        if any(not s for s in self.sequences):
            raise ValueError("stop sequences must hold at least one token id each")

    @classmethod
    def of(cls, config, sequences: Sequence[Sequence[int]] = ()) -> "Stop":
        """The checkpoint's EOS ids (LlamaConfig.eos_token_ids) plus any stop sequences."""
        return cls(tuple(config.eos_token_ids), tuple(tuple(s) for s in sequences))

    def reached(self, generated: list[int]) -> bool:
        return generated[-1] in self.eos_ids or any(generated[-len(s):] == list(s) for s in self.sequences)


class Generation:
    """Iterate for token ids as they are produced. Afterwards `tokens` holds them and `finish_reason`
    says why it ended ("stop" or "length"; None while running). Iterable once.

    `seconds[i]` is how long token i took: from the start of the step that made its logits to its
    choice (the first includes the prefill; the time the consumer spends between tokens is not
    counted)."""

    def __init__(self, step: Step, prompt_ids: Sequence[int], max_new_tokens: int,
                 sampling: Sampling | None = None, stop: Stop = Stop(), choose: Choose | None = None):
        self.prompt = [int(t) for t in prompt_ids]
        if not self.prompt:
            raise ValueError("prompt must hold at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self.step, self.max_new_tokens, self.stop = step, max_new_tokens, stop
        self.sampling = sampling or Sampling()
        self.choose = choose or self._sample
        self.tokens: list[int] = []
        self.seconds: list[float] = []
        self.finish_reason: str | None = None
        self._gen = self.sampling.generator()
        self._started = False

    def _sample(self, logits: torch.Tensor, history: list[int]) -> int:
        return sample(logits, self.sampling, self._gen, history)

    def __iter__(self) -> Iterator[int]:
        if self._started:
            raise RuntimeError("a Generation runs once; start a new one for another request")
        self._started = True
        if self.max_new_tokens == 0:
            self.finish_reason = "length"
            return
        t0 = time.perf_counter()
        logits = self.step(self.prompt, 0)  # prefill
        pos = len(self.prompt)
        while True:
            tok = self.choose(logits, self.prompt + self.tokens)
            self.seconds.append(time.perf_counter() - t0)
            self.tokens.append(tok)
            if self.stop.reached(self.tokens):
                self.finish_reason = "stop"
            elif len(self.tokens) == self.max_new_tokens:
                self.finish_reason = "length"
            yield tok
            if self.finish_reason is not None:
                return
            t0 = time.perf_counter()
            logits = self.step([tok], pos)
            pos += 1

    @property
    def time_to_first_token_s(self) -> float | None:
        return self.seconds[0] if self.seconds else None

    @property
    def token_latencies_s(self) -> list[float]:
        """Decode steps after the first token."""
        return self.seconds[1:]


def generate(model: Llama, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
             sampling: Sampling | None = None, stop: Stop = Stop()) -> Generation:
    """A whole plain model in this process, with a KV cache sized for the request."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).tolist()
    device = next(model.parameters()).device
    cache = KVCache(max_len=max(1, len(prompt) + max_new_tokens))

    @torch.inference_mode()
    def step(ids: list[int], start: int) -> torch.Tensor:
        logits = model(torch.tensor([ids], device=device), positions=start, cache=cache)  # (1, T, vocab)
        return logits[0, -1]

    return Generation(step, prompt, max_new_tokens, sampling, stop)
