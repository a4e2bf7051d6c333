"""The device side of the collaborative LLM (DESIGN.md, "Continue in the cloud").

The device runs embeddings + layers [0, k) + the exit head at k (split.llama). Per token: if the
exit head is confident enough it emits the token here; otherwise it sends the cloud every layer-k
hidden state the cloud has not seen yet and takes the cloud's token (cloud_service backend
`llm_continuation`, which keeps the session's KV cache).

Loading: embeddings + layers [0, k) come from the HF folder in float32 (load_llama), or with
quantize="int8" | "int4" from the tensor-parallel side's quantized blocks (`tp prepare --world-size 1
--quantize ...`, prepared once into the tp cache): int8 / int4 projections on torch's weight-only
kernels and int8 embedding rows read per token (collab/quantized.py). The exit head (trained
separately, exit_heads.safetensors beside the model) is always float32.

    edge = CollabLlm("runs/ee_lm", mode="collaborative", cloud="127.0.0.1:8001", threshold=0.6)
    edge = CollabLlm("runs/ee_lm", cloud="127.0.0.1:8001", threshold=0.6, quantize="int4", group_size=32)
    result = edge.generate(prompt_ids, max_new_tokens=32)     # tokens, per-token source, counters
    more = edge.generate(next_turn_ids, 32, conversation=result.conversation)   # same cloud session
    spec = CollabLlm("runs/ee_lm", mode="speculative", cloud="127.0.0.1:8001", gamma=4)   # drafts, verified
    result = spec.generate(prompt_ids, 32, sampling=Sampling(temperature=0.8, seed=7))

Modes: standalone (never offloads), collaborative (threshold), cloud-only (the cloud's k = 0 model
gets token ids; the baseline: the device computes nothing unless the cloud is unreachable, then it
replays layers [0, k) from token ids for that token), speculative (the device drafts up to gamma
tokens, the cloud's k = 0 model verifies them in one call: collab/speculative.py; greedy or
`sampling`). Token-id catch-up: when the cloud model declares `input_ids` (catch_up = "tokens";
read from its OIP metadata, once per client), collaborative mode sends the ids of the tokens the
cloud has not seen instead of their layer-k states, and keeps no states.
A flaky link never loses a conversation:
- FAILED_PRECONDITION (session evicted / cloud restarted): resend everything with sequence_start;
  states older than the last acknowledged position (or beyond the memory cap) are recomputed from
  token ids by replaying layers [0, k) in the original chunks (bit-identical states); token ids are
  simply resent.
- UNAVAILABLE / DEADLINE_EXCEEDED: the token is decided here and flagged degraded; the cloud is
  retried with exponential backoff, and catches up on everything it missed when it is back.
"""
from __future__ import annotations

import secrets
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import torch

from edge_runtime.client.oip_client import OipClient, build_request, decode_response
from edge_runtime.collab.conversation import Conversation, Counters, Result
from edge_runtime.collab.quantized import load_device_half
from edge_runtime.collab.speculative import Drafter, ExitHeadDrafter, Gamma, Speculation
from split.codec import encode
from split.llama import Generation, KVCache, Sampling, Stop, load_llama
from split.llama.exits import confidence, load_exit_heads, read_exits_json

MODES = ("standalone", "collaborative", "cloud-only", "speculative")
WIRES = ("int8", "fp16", "fp32")
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_TAKES_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # client -> {model: takes input_ids}


def cloud_takes_ids(client: OipClient, model: str, timeout_s: float) -> bool:
    """Whether the cloud's `model` takes token ids (`input_ids`: k = 0 or catch_up = "tokens") rather
    than layer-k states: its OIP metadata, asked once per client and model."""
    known = _TAKES_IDS.setdefault(client, {})
    if model not in known:
        known[model] = any(t.name == "input_ids" for t in client.metadata(model, timeout_s=timeout_s).inputs)
    return known[model]


class CollabLlm:
    def __init__(self, model_dir: str | Path, mode: str = "collaborative", cloud: str | None = None,
                 threshold: float = 0.5, metric: str = "max_prob", exit_layer: int | None = None,
                 cloud_model: str = "llm", cloud_full_model: str = "llm_full", wire: str = "int8",
                 timeout_s: float = 5.0, max_kept_states: int = 4096, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, client: OipClient | None = None, quantize: str | None = None,
                 group_size: int = 32, cache_dir: str | Path | None = None, gamma: int = 4,
                 drafter: Drafter | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if wire not in WIRES:
            raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
        if mode != "standalone" and cloud is None and client is None:
            raise ValueError(f"mode {mode!r} needs --cloud HOST:PORT")
        if max_kept_states < 1:
            raise ValueError(f"max_kept_states must be >= 1, got {max_kept_states}")
        self.model_dir, self.mode, self.threshold, self.metric = Path(model_dir), mode, threshold, metric
        exits = read_exits_json(self.model_dir)["exit_layers"]
        self.k = exit_layer if exit_layer is not None else max(exits)
        if quantize is None:
            self.model = load_llama(self.model_dir, layers=range(0, self.k), with_head=False)
        else:   # cache_dir: where the quantized blocks are prepared (default: the tp CLI's cache)
            self.model = load_device_half(self.model_dir, self.k, quantize, group_size, cache_dir)
        self.head = load_exit_heads(self.model_dir, [self.k])[self.k]
        self._cloud_models = (cloud_model, cloud_full_model)   # layers [k, L) / the whole model
        self.cloud_model = cloud_full_model if mode in ("cloud-only", "speculative") else cloud_model
        self.gamma = Gamma(gamma)                  # speculative: drafts per round, adapted (speculative.py)
        self.drafter = drafter or ExitHeadDrafter(self.head)
        self._takes_ids = None    # whether cloud_model takes token ids; None: not asked yet
        self.wire, self.timeout_s, self.max_kept = wire, timeout_s, max_kept_states
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.client = client or (OipClient(cloud, timeout_s=timeout_s) if cloud else None)
        self._sequence_ids = iter(range(secrets.randbits(61) + 1, 1 << 62))  # unique across devices

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def set_mode(self, mode: str) -> None:
        """Switch mode between turns (--mode auto, the agent's policy); a conversation started in one
        mode is not continued in another."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.cloud_model = self._cloud_models[mode in ("cloud-only", "speculative")]
        self._takes_ids = None

    # --- the edge model ----------------------------------------------------------------------
    def _edge_step(self, ids: list[int], pos: int, cache: KVCache) -> torch.Tensor:
        h = self.model.embed(torch.tensor([ids], dtype=torch.long))  # (1, T, C)
        return self.model.forward_layers(h, 0, self.k, pos, cache)  # (1, T, C) at layer k

    def _replay(self, tokens: list[int], chunks: list[int], upto: int) -> np.ndarray:
        """States for positions [0, upto) rebuilt from token ids in the original chunks (bit-identical)."""
        cache, out, pos = KVCache(), [], 0
        for n in chunks:
            if pos >= upto:
                break
            out.append(self._edge_step(tokens[pos:pos + n], pos, cache)[0].numpy())
            pos += n
        return np.concatenate(out)[:upto]

    # --- the wire ----------------------------------------------------------------------------
    def _sends_ids(self) -> bool:
        """Token ids (cloud-only, speculative, a cloud model that takes them) or layer-k states."""
        if self.mode in ("cloud-only", "speculative"):
            return True
        if self._takes_ids is None:
            self._takes_ids = cloud_takes_ids(self.client, self.cloud_model, self.timeout_s)
        return self._takes_ids

    def _encode(self, rows: np.ndarray):
        """(inputs, input_parameters, bytes) for the state rows (T, C) or token ids (T,)."""
        if rows.ndim == 1:
            return {"input_ids": rows.astype(np.int64)}, {}, rows.size * 8
        if self.wire == "int8":
            enc = encode(rows.astype(np.float32), "int8", axis=0)  # one scale + zero point per row
            return {"hidden_states": enc.data}, {"hidden_states": enc.parameters}, enc.nbytes
        arr = rows.astype(np.float16 if self.wire == "fp16" else np.float32)
        return {"hidden_states": arr}, {}, arr.nbytes

    def _request(self, seq_id: int, start: int, rows: np.ndarray, exited: np.ndarray, begin: bool,
                 extra: dict | None = None):
        """(the ModelInferRequest, its tensor payload bytes) for rows at positions start..; `extra`:
        more inputs (the verification's)."""
        inputs, in_params, nbytes = self._encode(rows)
        inputs["start"] = np.array([start], np.int64)
        inputs["exited"] = exited.astype(np.uint8)
        inputs.update(extra or {})
        params = {"sequence_id": seq_id}
        if begin:
            params["sequence_start"] = True
        request = build_request(self.cloud_model, inputs, parameters=params, input_parameters=in_params)
        return request, nbytes + 8 + exited.size + sum(np.asarray(a).nbytes for a in (extra or {}).values())

    def _call_cloud(self, seq_id: int, start: int, rows: np.ndarray, exited: np.ndarray, begin: bool,
                    extra: dict | None = None):
        """(outputs, payload bytes, request bytes, reply bytes) of one ModelInfer."""
        request, nbytes = self._request(seq_id, start, rows, exited, begin, extra)
        reply = self.client.call("ModelInfer", request, self.timeout_s)
        return decode_response(reply), nbytes, request.ByteSize(), reply.ByteSize()

    # --- generation --------------------------------------------------------------------------
    def _decide_here(self, conf: float) -> bool:
        if self.mode == "standalone":
            return True
        if self.mode != "collaborative":
            return False
        if self.threshold <= 0:
            return True
        if self.threshold >= 1:
            return False
        return conf >= self.threshold

    def _feed(self, conv: "Conversation", ids: list[int], C: Counters) -> None:
        """Run the edge layers on ids (one chunk) after what the conversation holds."""
        pos = len(conv.tokens)
        conv.tokens += ids
        conv.chunks.append(len(ids))
        conv.exited += [False] * len(ids)
        if self.mode == "cloud-only":   # the baseline computes nothing here unless degraded
            return
        if conv.ahead and len(ids) == 1:   # an accepted draft the drafter already ran through the edge layers
            conv.h = conv.ahead.pop(0)
            return
        conv.h = self._edge_step(ids, pos, conv.cache)  # (1, T, C)
        C.edge_layer_evals += len(ids) * self.k
        if self.mode == "collaborative" and not self._takes_ids:   # states the cloud may need
            conv.kept.update(zip(range(pos, pos + len(ids)), conv.h[0].numpy()))
            while len(conv.kept) > self.max_kept:   # memory cap: drop the oldest, recompute if needed
                conv.kept.pop(min(conv.kept))

    def _flag_confident(self, conv: "Conversation", n: int) -> None:
        """Flag the positions of a fed chunk (a prompt) whose exit head passes the threshold as
        exited, like generated tokens decided here: a `propagated` cloud then only projects their
        K/V, which is what the teacher-forced quality figures (split.llama.calibrate) measure. The
        chunk's last position decides the next token in the generation loop."""
        if n < 2:
            return
        conf = confidence(self.head(conv.h[:, :-1])[0], self.metric)     # (n - 1,)
        start = len(conv.tokens) - n
        for i, c in enumerate(conf.tolist()):
            conv.exited[start + i] = self._decide_here(c)

    def turn(self, prompt_ids, max_new_tokens: int, stop: Stop = Stop(),
             conversation: "Conversation | None" = None, sampling: Sampling | None = None) -> "Turn":
        """One turn, not yet run: iterate it for token ids as they are decided (`turn.result` fills as
        it goes: tokens, sources, counters; `turn.finish_reason` when it ends). Pass a previous
        result's `conversation` to continue it (prompt_ids are appended; the cloud session and its KV
        cache are reused). `sampling` (temperature, top-k, top-p, seed): speculative mode only;
        greedy otherwise."""
        sampling = sampling or Sampling()
        if sampling.repetition_penalty != 1:
            raise ValueError("repetition_penalty is not supported by the collaborative LLM")
        if not sampling.greedy and self.mode != "speculative":
            raise ValueError(f"sampling (temperature > 0) needs mode 'speculative', not {self.mode!r}")
        feed = [int(t) for t in prompt_ids]
        conv = conversation or Conversation(next(self._sequence_ids), backoff=self.backoff_s)
        feed, conv.unfed = conv.unfed + feed, []
        if not feed:
            raise ValueError("prompt_ids must hold at least one token")
        return Turn(self, conv, feed, max_new_tokens, stop, sampling)

    def generate(self, prompt_ids, max_new_tokens: int, stop: Stop = Stop(), on_token=None,
                 conversation: "Conversation | None" = None, sampling: Sampling | None = None) -> Result:
        """One turn to its end (see turn()). on_token(step, token, source) is called after each token."""
        turn = self.turn(prompt_ids, max_new_tokens, stop, conversation, sampling)
        for step, token in enumerate(turn):
            if on_token is not None:
                on_token(step, token, turn.result.sources[-1])
        return turn.result

    def _choose(self, conv: "Conversation", res: Result) -> int:
        """The next token: the exit head's when it is confident enough, else the cloud's; decided
        here and flagged degraded while the cloud is unreachable."""
        C, lazy = res.counters, self.mode == "cloud-only"
        pos = len(conv.tokens) - 1          # the position whose output decides the next token
        token, source, conf = -1, "edge", float("nan")
        if not lazy:
            logits = self.head(conv.h[:, -1:])[0, -1]
            conf = float(confidence(logits, self.metric))
            token = int(logits.argmax())
        if not self._decide_here(conf):
            out = self._try_cloud(conv, C)
            if out is None:
                source = "degraded"
            else:
                token, source = int(out["next_token"][0]), "cloud"
        if source == "degraded" and lazy:     # cloud-only lost the cloud: rebuild the state here
            h = torch.from_numpy(self._replay(conv.tokens, conv.chunks, len(conv.tokens))[None, -1:])
            C.recomputed_states += len(conv.tokens)
            C.edge_layer_evals += len(conv.tokens) * self.k
            logits = self.head(h)[0, -1]
            conf, token = float(confidence(logits, self.metric)), int(logits.argmax())
        if source == "cloud":
            C.cloud_tokens += 1
        else:
            C.edge_tokens += 1
            conv.exited[pos] = True
            if source == "degraded":
                C.degraded_tokens += 1
        res.tokens.append(token)
        res.sources.append(source)
        res.confidences.append(conf)
        return token

    def end(self, conv: "Conversation") -> None:
        """The conversation is over: send `sequence_end` with no new states, so the cloud frees the
        session's KV cache now instead of at its idle timeout. Best effort: a cloud that is down, or
        that has dropped the session already, holds nothing that needs freeing."""
        if self.client is None or conv.begin:          # the cloud holds nothing for it
            return
        if self._sends_ids():     # known: the cloud has answered this conversation before
            rows = {"input_ids": np.zeros(0, np.int64)}
        else:
            rows = {"hidden_states": np.zeros((0, self.model.config.hidden_size), np.float32)}
        request = build_request(self.cloud_model, {**rows, "start": np.array([conv.acked], np.int64),
                                                   "exited": np.zeros(0, np.uint8)},
                                parameters={"sequence_id": conv.seq_id, "sequence_end": True})
        try:
            self.client.call("ModelInfer", request, self.timeout_s)
        except grpc.RpcError:
            pass
        conv.begin = True

    def _try_cloud(self, conv: "Conversation", C: Counters, drafts=(), extra: dict | None = None) -> dict | None:
        """The cloud's reply to _offload, or None while it is unreachable or late (then retried with
        exponential backoff)."""
        if time.monotonic() < conv.retry_at:
            return None
        try:
            out = self._offload(conv, C, drafts, extra)
        except grpc.RpcError as err:
            if err.code() not in _TRANSIENT:
                raise
            C.failed_requests += 1
            conv.retry_at = time.monotonic() + conv.backoff
            conv.backoff = min(2 * conv.backoff, self.max_backoff_s)
            return None
        conv.backoff = self.backoff_s
        return out

    def _offload(self, conv: "Conversation", C: Counters, drafts=(), extra: dict | None = None) -> dict:
        """Send the cloud what it has not seen (all of it after FAILED_PRECONDITION), then any draft
        ids to verify (`extra`: the verification inputs); returns its outputs."""
        n = len(conv.tokens)
        for attempt in (0, 1):
            start = 0 if conv.begin else conv.acked
            rows = self._rows(conv.tokens, conv.chunks, conv.kept, start, n, C)
            rows = np.concatenate([rows, np.array(drafts, np.int64)]) if len(drafts) else rows
            exited = np.array(conv.exited[start:n] + [False] * len(drafts), bool)
            C.round_trips += 1
            try:
                out, nbytes, request_bytes, reply_bytes = self._call_cloud(conv.seq_id, start, rows, exited,
                                                                           conv.begin, extra)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION or attempt:
                    raise
                C.resends += 1
                conv.begin = True         # evicted, expired or restarted: resend from position 0
                continue
            C.requests += 1
            C.states_sent += len(rows)
            C.bytes_sent += nbytes
            C.request_bytes += request_bytes
            C.bytes_received += reply_bytes
            work = out["work"]
            C.cloud_layer_evals += int(work[0])
            C.cloud_kv_evals += int(work[1])
            for p in [p for p in conv.kept if p < n]:
                del conv.kept[p]          # acknowledged: the cloud holds them now
            conv.acked, conv.begin = n + (int(out["accepted"][0]) if len(drafts) else 0), False
            return out
        raise AssertionError("unreachable")

    def _rows(self, tokens, chunks, kept, start, n, C: Counters) -> np.ndarray:
        """Token ids (T,) or layer-k states (T, C) for positions [start, n)."""
        if self._sends_ids():
            return np.array(tokens[start:n], np.int64)
        missing = [p for p in range(start, n) if p not in kept]
        if missing:
            replayed = self._replay(tokens, chunks, max(missing) + 1)
            C.recomputed_states += len(missing)
            C.edge_layer_evals += (max(missing) + 1) * self.k
            return np.stack([kept[p] if p in kept else replayed[p] for p in range(start, n)])
        return np.stack([kept[p] for p in range(start, n)])


class Turn:
    """One turn through the one decode loop (split.llama.Generation): the edge layers are its step,
    the exit head or the cloud its chooser. Iterate it once for token ids. A token's time runs from
    the start of its choice to the end of feeding it (the last token: to the end of its choice)."""

    def __init__(self, llm: CollabLlm, conv: Conversation, feed: list[int], max_new_tokens: int, stop: Stop,
                 sampling: Sampling):
        self.llm, self.conv, self.feed, self.t0 = llm, conv, feed, None
        self.result = Result([], [], [], Counters(), conversation=conv)
        self.generation = Generation(self._step, feed, max_new_tokens, stop=stop, choose=self._choose)
        self.speculation = (Speculation(llm, conv, sampling, stop, max_new_tokens)
                            if llm.mode == "speculative" else None)

    @property
    def finish_reason(self) -> str | None:
        return self.generation.finish_reason

    def __iter__(self):
        if self.generation.max_new_tokens == 0:  # the prompt only: fed now, the cloud sees it next turn
            with torch.inference_mode():
                self.llm._feed(self.conv, self.feed, self.result.counters)
            return
        try:
            yield from self.generation
        finally:   # also when the consumer stops early: drafts the edge ran ahead are dropped
            if self.speculation is not None:
                self.speculation.finish()
        self.result.seconds_per_token.append(time.perf_counter() - self.t0)
        self.conv.unfed = self.result.tokens[-1:]  # fed at the start of the next turn

    @torch.inference_mode()
    def _step(self, ids: list[int], start: int) -> None:
        """Feed ids to the edge layers after what the conversation holds. The decision reads the
        layer-k state the feed leaves in the conversation, so there are no logits to return."""
        self.llm._feed(self.conv, ids, self.result.counters)
        if start == 0 and self.llm.mode == "collaborative":
            self.llm._flag_confident(self.conv, len(ids))

    @torch.inference_mode()
    def _choose(self, _logits, _history) -> int:
        now = time.perf_counter()
        if self.t0 is not None:
            self.result.seconds_per_token.append(now - self.t0)
        self.t0 = now
        if self.speculation is not None:
            return self.speculation.choose(self.result, self.generation.tokens)
        return self.llm._choose(self.conv, self.result)
