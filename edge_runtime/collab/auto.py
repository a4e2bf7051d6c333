"""`--mode auto`: measure the link, the device and the cloud, predict every mode (chooser.py), run the
fastest one whose quality loss is allowed, and keep going on the device when the link drops.

    auto = AutoLlm(CollabLlm("runs/ee_lm", mode="speculative", cloud="127.0.0.1:8001"), rate_mbit=10)
    result = auto.generate(prompt_ids, 32)
    result.mode, result.tokens, result.sources, result.choice.rows     # what ran, and every prediction

Measured before each generation (every wait under the CollabLlm's deadline):
- the round trip: median of 3 ServerLive heartbeats (none answered: the link is down, and the
  device generates standalone, every token flagged degraded);
- the device's step: one token through layers [0, k) and the exit head, timed here;
- the cloud's step at its current load: one token on its full model (`llm_full`) in a throwaway
  session, less the round trip (the cloud's queue and batch are in it, and a call's own costs);
- the cloud's streaming step at its current load: the gaps between the tokens of a throwaway
  4-token stream (`llm_stream`), which pays no per-call costs;
- the exit rate and quality loss at the threshold: what `edge-runtime calibrate` wrote into
  exits.json (none written: the exit decides nothing and collaborative counts as lossy);
- the drafts' acceptance: per draft, what this device's recent speculative rounds measured
  (speculative.Gamma.acceptance: 0.5 before the first round).
The link rate is configured (`rate_mbit`: a heartbeat carries too few bytes to measure it). The
measurements are reused for `remeasure_s` (10 s): probing costs about five round trips, which on a
40 ms link over a 32-token answer is 12 ms/token. A link found down, or a stream that broke, is
measured again at the next generation; the acceptance and the prompt's prefill are always current.

A link that drops mid-generation loses no token and repeats none: collaborative and speculative
decide on the device (flagged degraded) and go back to the cloud when it answers (device.py); a
cloud-stream that breaks keeps the tokens it delivered and the rest is generated in speculative
mode from the prompt plus those tokens, which does the same.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
import torch

from edge_runtime.client.oip_client import build_request
from edge_runtime.collab.chooser import Choice, Observed, choose
from edge_runtime.collab.device import CollabLlm, cloud_takes_ids
from edge_runtime.collab.stream import CloudStream
from edgefold_proto import pb
from split.llama import KVCache, Stop
from split.llama.exits import read_exits_json
from split.llama.sampling import Sampling

_LINK_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class AutoResult:
    mode: str                          # the mode that ran (the choice; "standalone" when the link was down)
    choice: Choice | None = None       # generate(): every mode's prediction and the pick
    observed: Observed | None = None   # generate(): what it measured
    tokens: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)     # per token: edge, cloud, draft or degraded
    seconds_per_token: list[float] = field(default_factory=list)
    counters: dict = field(default_factory=dict)          # the mode's counters (bytes, round trips, cloud work)

    @property
    def degraded(self) -> bool:
        return "degraded" in self.sources


class AutoLlm:
    def __init__(self, llm: CollabLlm, rate_mbit: float = 10.0, max_ppl_increase: float = 0.0,
                 stream_model: str = "llm_stream", full_model: str = "llm_full", remeasure_s: float = 10.0):
        if llm.client is None:
            raise ValueError("mode 'auto' needs --cloud HOST:PORT")
        if not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0, got {rate_mbit!r}")
        self.llm, self.rate_bps, self.max_ppl_increase = llm, rate_mbit * 1e6, max_ppl_increase
        self.full_model, self.collab_model = full_model, llm.cloud_model
        self.stream = CloudStream(model=stream_model, timeout_s=llm.timeout_s, client=llm.client)
        self.remeasure_s, self._measured = remeasure_s, None   # (when, Observed) of the last measurement
        meta = read_exits_json(llm.model_dir)
        calibrated = meta.get("threshold", {}).get(llm.metric, {})
        usable = calibrated.get("exit_layer", llm.k) == llm.k and "edge_fraction" in calibrated
        self.exit_rate = float(calibrated["edge_fraction"]) if usable else 0.0
        self.collab_ppl = float(calibrated.get("ppl_increase", float("inf"))) if usable else float("inf")
        self.layers = llm.model.config.num_hidden_layers

    # --- measurements -------------------------------------------------------------------------
    def _rtt(self) -> float | None:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            try:
                self.llm.client.call("ServerLive", pb.ServerLiveRequest(), self.llm.timeout_s)
            except grpc.RpcError as err:
                if err.code() in _LINK_DOWN:
                    continue
                raise
            times.append(time.perf_counter() - t0)
        return statistics.median(times) if times else None

    @torch.inference_mode()
    def _device_step(self, token: int) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            self.llm.head(self.llm._edge_step([token], 0, KVCache()))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def _cloud_step(self, token: int, rtt: float) -> float:
        request = build_request(self.full_model, {"input_ids": np.array([token], np.int64),
                                                  "start": np.zeros(1, np.int64), "exited": np.zeros(1, np.uint8)},
                                parameters={"sequence_id": next(self.llm._sequence_ids), "sequence_start": True,
                                            "sequence_end": True})
        t0 = time.perf_counter()
        self.llm.client.call("ModelInfer", request, self.llm.timeout_s)
        return max(time.perf_counter() - t0 - rtt, 1e-4)

    def _stream_step(self, token: int) -> float | None:
        """The median gap between a throwaway 4-token stream's tokens (None: no stream model answered)."""
        try:
            gaps = self.stream.generate([token], 4, Sampling(), ignore_eos=True).seconds_per_token[1:]
        except grpc.RpcError:
            return None
        return max(statistics.median(gaps), 1e-4) if gaps else None

    def observed(self, prompt_ids: list[int]) -> Observed:
        """The last measurement while it is fresh (the link up), with this prompt's prefill and the
        acceptance so far; else a new one."""
        now = time.monotonic()
        if self._measured is None or now - self._measured[0] >= self.remeasure_s or self._measured[1].rtt_s is None:
            self._measured = (now, self.observe(prompt_ids))
            return self._measured[1]
        o = self._measured[1]
        return replace(o, prefill_s=o.cloud_token_s * (1 + 0.15 * (len(prompt_ids) - 1)),
                       acceptance=self.llm.gamma.acceptance)

    def observe(self, prompt_ids: list[int]) -> Observed:
        """Measure now (see the module docstring)."""
        llm, token = self.llm, int(prompt_ids[-1])
        rtt = self._rtt()
        d = self._device_step(token)
        c = self._cloud_step(token, rtt) if rtt is not None else d
        s = self._stream_step(token) if rtt is not None else None
        ids = rtt is not None and cloud_takes_ids(llm.client, self.collab_model, llm.timeout_s)
        return Observed(rtt_s=rtt, rate_bps=self.rate_bps, device_token_s=d, cloud_token_s=c, stream_token_s=s,
                        layers=self.layers, exit_layer=llm.k, exit_rate=self.exit_rate, acceptance=llm.gamma.acceptance,
                        state_bytes=llm.model.config.hidden_size + 8, catch_up="tokens" if ids else "exact",
                        prefill_s=c * (1 + 0.15 * (len(prompt_ids) - 1)), collab_ppl_increase=self.collab_ppl)

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens: int, stop: Stop = Stop(), on_token=None) -> AutoResult:
        """Measure, choose, run the choice; on_token(step, token, source) as each token is decided.
        An exception on_token raises ends the generation there (a stream is cancelled, a
        conversation ended) and propagates."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token")
        observed = self.observed(prompt)
        choice = choose(observed, max_new_tokens, self.max_ppl_increase)
        result = self.run(choice.mode, prompt, max_new_tokens, stop, on_token)
        result.choice, result.observed = choice, observed
        return result

    def run(self, mode: str, prompt_ids, max_new_tokens: int, stop: Stop = Stop(), on_token=None) -> AutoResult:
        """One greedy generation in `mode` (any of chooser's), with auto's fallbacks; what generate()
        runs once it has chosen, and what a benchmark runs to compare the prediction with every mode."""
        result, emit = AutoResult(mode), on_token or (lambda step, token, source: None)
        if mode == "cloud-stream":
            self._stream(result, [int(t) for t in prompt_ids], max_new_tokens, stop, emit)
        else:
            self._collab(result, mode, [int(t) for t in prompt_ids], max_new_tokens, stop, emit)
        return result

    def _collab(self, result: AutoResult, mode: str, prompt: list[int], n: int, stop: Stop, emit) -> None:
        llm, before = self.llm, len(result.tokens)
        llm.set_mode(mode)
        turn = llm.turn(prompt, n, stop)
        r = turn.result
        try:
            for step, token in enumerate(turn):
                emit(before + step, token, r.sources[-1])
        finally:   # also when emit raised (its consumer went away): the cloud frees the conversation now
            llm.end(r.conversation)
        result.tokens += r.tokens
        result.sources += r.sources
        result.seconds_per_token += r.seconds_per_token
        for key, value in r.counters.as_dict().items():
            result.counters[key] = result.counters.get(key, 0) + value

    def _stream(self, result: AutoResult, prompt: list[int], n: int, stop: Stop, emit) -> None:
        got = []

        def arrived(step, token, source):
            got.append(token)
            emit(step, token, source)
        try:
            r = self.stream.generate(prompt, n, Sampling(), stop.sequences, ignore_eos=not stop.eos_ids,
                                     on_token=arrived)
            result.tokens, result.sources, result.seconds_per_token = r.tokens, r.sources, r.seconds_per_token
            result.counters = {"bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received,
                               "round_trips": r.round_trips, "cloud_layer_evals": r.cloud_layer_evals}
            return
        except grpc.RpcError as err:
            if err.code() not in (*_LINK_DOWN, grpc.StatusCode.CANCELLED):
                raise
        # the stream broke: keep what arrived, generate the rest on the device (and the cloud when it answers)
        self._measured = None
        result.tokens, result.sources = list(got), ["cloud"] * len(got)
        if len(got) < n and not (got and stop.reached(got)):
            self._collab(result, "speculative", prompt + got, n - len(got), stop, emit)
