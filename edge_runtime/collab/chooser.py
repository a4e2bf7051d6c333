"""`--mode auto`: pick the collaborative LLM's mode from what the device measured, the way the split
planner picks a placement (split.planner): predict every mode's ms per generated token and cloud
work per token, drop the modes whose quality loss is over the limit, take the fastest. Pure Python.

    choice = choose(Observed(rtt_s=0.08, rate_bps=10e6, device_token_s=0.004, cloud_token_s=0.006,
                             layers=8, exit_layer=4, exit_rate=0.3, acceptance=0.6, state_bytes=392),
                    new_tokens=32)
    choice.mode, choice.gamma, choice.rows          # the pick, and every mode's prediction

Per generated token, steady state (t: seconds; n: the answer's length, which spreads first-call costs):
  standalone       d                                       the exit head decides every token (lossy)
  cloud-only       rtt + c + wire(id)                      one call per token, the cloud's full model
  cloud-stream     (rtt + prefill) / n + s                 one call, then a token per cloud step
  collaborative    d + (1 - e) (rtt + c_k + wire(states))  the exit head decides a share e (lossy at
                                                           the calibrated threshold; catch_up exact or
                                                           propagated: states; tokens: ids)
  speculative(g)   (g d + rtt + c_verify(g)) / E(g)        E(g) = (1 - a^(g+1)) / (1 - a) tokens per
                                                           call for a per-draft acceptance a (lossless)
                                                           (the best g: the device adapts its draft
                                                           length itself, speculative.Gamma)
d: one token through the device's layers [0, k) and its exit head; c: one token through the cloud's
full model at its current load (what the device saw its calls take, less the round trip: the call's
own costs are in it); s: one step of the cloud's streaming generation at its current load (the gap
between streamed tokens; c when not measured); c_k: the same as c for layers [k, L); c_verify(g) = c (1 + g verify_row_cost): g more rows ride in one forward.
Cloud work is layer-token evaluations per generated token. A link that is down leaves standalone
(flagged degraded by the generation, not chosen here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

LOSSLESS = ("cloud-stream", "cloud-only", "speculative")   # greedy output equals the cloud model's
ID_BYTES = 9                    # what one more token id adds to a request: int64 id + exited flag
RPC_BYTES = 300                 # gRPC + HTTP/2 + OIP framing of one call, both ways (split.planner)
MAX_GAMMA = 8


@dataclass(frozen=True)
class Observed:
    """What the device measured (every figure from this device and this link, not assumed)."""
    rtt_s: float | None          # heartbeat round trip to the cloud; None: unreachable
    rate_bps: float              # link rate
    device_token_s: float        # d
    cloud_token_s: float         # c, at the cloud's current load
    layers: int                  # L
    exit_layer: int              # k
    exit_rate: float = 0.0       # e: share of tokens the exit head decides at the threshold
    acceptance: float = 0.0      # a: share of drafted tokens the cloud accepts (speculative)
    state_bytes: int = 0         # one layer-k state on the wire (int8: hidden + 8)
    catch_up: str = "exact"      # what the cloud's `llm` model declares: exact | propagated | tokens
    prefill_s: float = 0.0       # the cloud's prefill of the prompt (cloud-stream's first token)
    stream_token_s: float | None = None    # s: the cloud's streaming step at its current load (None: c)
    collab_ppl_increase: float = 0.0       # measured quality loss at the threshold (calibrate)
    standalone_ppl_increase: float = float("inf")
    verify_row_cost: float = 0.15          # one more row in a verification forward, as a share of c
    kv_share: float = 0.1                  # a layer's K+V projections over the whole layer (propagated)

    def __post_init__(self):
        for name in ("rate_bps", "device_token_s", "cloud_token_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.stream_token_s is not None and not self.stream_token_s > 0:
            raise ValueError(f"stream_token_s must be > 0 or None, got {self.stream_token_s!r}")
        if not 0 <= self.exit_rate <= 1 or not 0 <= self.acceptance <= 1:
            raise ValueError("exit_rate and acceptance must lie in [0, 1]")
        if not 0 < self.exit_layer < self.layers:
            raise ValueError(f"exit_layer must lie in 1..{self.layers - 1}, got {self.exit_layer}")


@dataclass(frozen=True)
class Row:
    mode: str
    seconds_per_token: float
    cloud_layer_evals_per_token: float
    ppl_increase: float
    gamma: int | None = None
    allowed: bool = True


@dataclass
class Choice:
    mode: str
    gamma: int | None
    predicted_s_per_token: float
    rows: list[Row] = field(default_factory=list)


def _wire(nbytes: float, o: Observed) -> float:
    return (nbytes + RPC_BYTES) * 8 / o.rate_bps


def accepted_per_call(a: float, g: int) -> float:
    """Expected tokens a verification call yields with g drafts of per-draft acceptance a: the
    accepted prefix plus the cloud's own token, E = sum_{i=0..g} a^i."""
    return float(g + 1) if a >= 1 else (1 - a ** (g + 1)) / (1 - a)


def speculative_row(o: Observed, g: int) -> Row:
    E = accepted_per_call(o.acceptance, g)
    call = g * o.device_token_s + o.rtt_s + _wire(ID_BYTES * (g + 1), o) + o.cloud_token_s * (1 + g * o.verify_row_cost)
    return Row("speculative", call / E, o.layers * (g + 1) / E, 0.0, gamma=g)


def predict(o: Observed, new_tokens: int) -> list[Row]:
    """Every mode's prediction (the link up); standalone always, even when the link is down."""
    d, c, L, k, e = o.device_token_s, o.cloud_token_s, o.layers, o.exit_layer, o.exit_rate
    rows = [Row("standalone", d, 0.0, o.standalone_ppl_increase)]
    if o.rtt_s is None:
        return rows
    n = max(int(new_tokens), 1)
    rows.append(Row("cloud-only", o.rtt_s + c + _wire(ID_BYTES, o), float(L), 0.0))
    s = o.stream_token_s or c
    rows.append(Row("cloud-stream", (o.rtt_s + o.prefill_s + _wire(ID_BYTES * n, o)) / n + s, float(L), 0.0))
    c_k = c * (L - k) / L
    if o.catch_up == "tokens":   # ids only; the cloud recomputes layers [0, k) of every token
        up, cloud_layers = ID_BYTES / max(1 - e, 1e-9), float(L)
    else:                        # every exited token's state rides with the next offload
        up = o.state_bytes / max(1 - e, 1e-9)
        cloud_layers = float(L - k) if o.catch_up == "exact" else (1 - e) * (L - k) + e * (L - k) * o.kv_share
    rows.append(Row("collaborative", d + (1 - e) * (o.rtt_s + c_k + _wire(up, o)), cloud_layers,
                    o.collab_ppl_increase))
    rows.append(min((speculative_row(o, g) for g in range(1, MAX_GAMMA + 1)), key=lambda r: r.seconds_per_token))
    return rows


def choose(o: Observed, new_tokens: int, max_ppl_increase: float = 0.0) -> Choice:
    """The fastest mode whose quality loss is within max_ppl_increase (0: lossless modes only, and
    standalone only when the link is down). A lossy mode's loss is its measured perplexity increase,
    which can be negative on held-out text while its tokens still differ from the full model's: it
    is allowed only when some loss is (max_ppl_increase > 0)."""
    def allowed(r: Row) -> bool:
        return r.mode in LOSSLESS or o.rtt_s is None or 0 < max_ppl_increase and r.ppl_increase <= max_ppl_increase
    rows = [Row(r.mode, r.seconds_per_token, r.cloud_layer_evals_per_token, r.ppl_increase, r.gamma, allowed(r))
            for r in predict(o, new_tokens)]
    best = min((r for r in rows if r.allowed), key=lambda r: r.seconds_per_token)
    return Choice(best.mode, best.gamma, best.seconds_per_token, rows)
