"""What the collaborative LLM keeps per conversation and returns per request.

A Conversation is one sequence on the device: the token ids it fed the edge layers (and in which
chunks, so replaying them rebuilds bit-identical states), which positions exited, the layer-k
states the cloud has not acknowledged yet, and the edge KV cache. A Result is one generate() call:
its tokens, where each was decided, and the counters of what it cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from split.llama import KVCache


@dataclass
class Counters:
    edge_tokens: int = 0           # decided by the exit head (incl. degraded)
    cloud_tokens: int = 0          # decided by the cloud
    drafted: int = 0               # speculative: draft tokens sent for verification
    accepted: int = 0              # speculative: drafts the cloud accepted (each one a "draft" token)
    degraded_tokens: int = 0       # wanted the cloud, decided here because it was unreachable/late
    requests: int = 0              # successful cloud calls
    round_trips: int = 0           # ModelInfer calls, answered or not (incl. resends)
    failed_requests: int = 0       # UNAVAILABLE / DEADLINE_EXCEEDED
    resends: int = 0               # FAILED_PRECONDITION -> full resend with sequence_start
    states_sent: int = 0           # rows (hidden states or token ids) in successful requests
    bytes_sent: int = 0            # tensor payloads + codec parameters of successful requests
    request_bytes: int = 0         # the whole serialized ModelInferRequests (names, shapes, framing)
    bytes_received: int = 0        # the whole serialized ModelInferResponses of successful requests
    cloud_layer_evals: int = 0     # layer-token evaluations the cloud reported
    cloud_kv_evals: int = 0        # K/V-projection-only layer-token evaluations the cloud reported
    edge_layer_evals: int = 0      # layer-token evaluations on the device (incl. recomputation)
    recomputed_states: int = 0     # states rebuilt from token ids

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Conversation:
    """One sequence on the device: what it fed the edge layers, and what the cloud acknowledged."""
    seq_id: int
    backoff: float
    tokens: list[int] = field(default_factory=list)     # positions 0..n-1 fed to the edge layers
    chunks: list[int] = field(default_factory=list)     # how they were fed (replay is bit-identical)
    exited: list[bool] = field(default_factory=list)    # per position: its next token was decided here
    kept: dict = field(default_factory=dict)            # position -> layer-k state not yet acknowledged
    acked: int = 0                                      # positions the cloud holds
    begin: bool = True                                  # next request carries sequence_start
    unfed: list[int] = field(default_factory=list)      # the last generated token, fed next turn
    cache: KVCache = field(default_factory=KVCache)
    h: torch.Tensor | None = None                       # layer-k states of the last fed chunk
    ahead: list = field(default_factory=list)           # speculative: (1, 1, C) layer-k states of accepted
                                                        # drafts the edge cache holds beyond `tokens`
    retry_at: float = 0.0


@dataclass
class Result:
    tokens: list[int]
    sources: list[str]             # per token: "edge", "cloud", "draft" (accepted) or "degraded"
    confidences: list[float]
    counters: Counters
    seconds_per_token: list[float] = field(default_factory=list)
    conversation: Conversation | None = None

    @property
    def degraded(self) -> bool:
        return "degraded" in self.sources
