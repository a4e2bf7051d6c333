"""Greedy decoding with a KV cache: one prefill over the prompt, then one-token decode steps.

    for tok in generate_greedy(model, prompt_ids, max_new_tokens=32, stop_ids=model.config.eos_token_ids):
        print(tok)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .kv_cache import KVCache
from .model import Llama


@torch.no_grad()
def generate_greedy(model: Llama, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield up to max_new_tokens token ids one at a time; a token in stop_ids is yielded, then stops."""
    device = next(model.parameters()).device
    tokens = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)  # (1, T)
    if tokens.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    stop = set(int(s) for s in stop_ids)
    cache = KVCache(max_len=tokens.shape[1] + max_new_tokens)
    logits = model(tokens, positions=0, cache=cache)  # prefill: (1, T, vocab)
    pos = tokens.shape[1]
    for step in range(max_new_tokens):
        tok = int(logits[0, -1].argmax())
        yield tok
        if tok in stop or step == max_new_tokens - 1:
            return
        logits = model(torch.tensor([[tok]], device=device), positions=pos, cache=cache)  # (1, 1, vocab)
        pos += 1
