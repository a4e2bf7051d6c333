"""`--mode cloud-stream`: the cloud's full model generates the whole answer and streams each token
back as it is produced (cloud_service backend `llm_stream`, a decoupled model on ModelStreamInfer).
What every hosted LLM API does, and the baseline the collaborative modes are measured against: one
request carries the prompt ids, then one response per token; the device computes nothing.

    with CloudStream("127.0.0.1:8001") as cloud:
        result = cloud.generate(prompt_ids, 32, Sampling(temperature=0.8, seed=7), stop=[[13, 13]])
        result.tokens, result.finish_reason, result.time_to_first_token_s, result.bytes_received

Every wait has a deadline: `timeout_s` between two responses (the first: for the prompt's prefill
and its first token), and the whole call at most `timeout_s` per token it may produce. A stream
that goes silent, ends before its final response or is dropped raises a typed error
(edge_runtime.client.errors), never hangs.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from edge_runtime.client.errors import DeadlineExceeded, ServerError, Unavailable
from edge_runtime.client.oip_client import OipClient, build_request, decode_response
from split.llama.sampling import Sampling


@dataclass
class StreamResult:
    tokens: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)         # "cloud" for every token
    finish_reason: str | None = None                         # "stop" or "length", from the cloud
    seconds_per_token: list[float] = field(default_factory=list)  # arrival gaps; the first is the TTFT
    batch_streams: list[int] = field(default_factory=list)   # streams in the cloud step of each token
    cloud_layer_evals: int = 0     # the cloud's work: layer-token evaluations (prompt + fed tokens) x L
    bytes_sent: int = 0            # the serialized request
    bytes_received: int = 0        # the serialized responses
    round_trips: int = 1           # one request, then the stream

    @property
    def time_to_first_token_s(self) -> float | None:
        return self.seconds_per_token[0] if self.seconds_per_token else None


def request_parameters(max_new_tokens: int, sampling: Sampling, stop, ignore_eos: bool = False) -> dict:
    """The llm_stream backend's request parameters for these settings (ignore_eos: run to max_new_tokens
    unless a stop sequence ends it, e.g. for a benchmark of fixed length)."""
    params = {"max_tokens": int(max_new_tokens), "temperature": float(sampling.temperature),
              "top_k": int(sampling.top_k), "top_p": float(sampling.top_p),
              "repetition_penalty": float(sampling.repetition_penalty)}
    if sampling.seed is not None:
        params["seed"] = int(sampling.seed)
    if ignore_eos:
        params["ignore_eos"] = True
    if stop:
        params["stop"] = json.dumps([[int(t) for t in seq] for seq in stop])
    return params


class CloudStream:
    def __init__(self, cloud: str | None = None, model: str = "llm_stream", timeout_s: float = 5.0,
                 client: OipClient | None = None):
        if cloud is None and client is None:
            raise ValueError("mode 'cloud-stream' needs --cloud HOST:PORT")
        self.model, self.timeout_s = model, timeout_s
        self.client = client or OipClient(cloud, timeout_s=timeout_s)

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompt_ids, max_new_tokens: int, sampling: Sampling | None = None, stop=(),
                 on_token=None, ignore_eos: bool = False) -> StreamResult:
        """Stream one answer; on_token(step, token, "cloud") is called as each token arrives. `stop`:
        token-id sequences that end it (the checkpoint's EOS ids do too, unless ignore_eos)."""
        ids = np.asarray([int(t) for t in prompt_ids], np.int64)
        request = build_request(self.model, {"input_ids": ids},
                                parameters=request_parameters(max_new_tokens, sampling or Sampling(), stop, ignore_eos))
        result = StreamResult(bytes_sent=request.ByteSize())
        total_s = self.timeout_s * (1 + max(int(max_new_tokens), 0))
        responses = self.client.stream(iter([request]), timeout_s=total_s)
        silent = threading.Event()   # set by the watchdog when no response came within timeout_s

        def watchdog() -> threading.Timer:
            timer = threading.Timer(self.timeout_s, lambda: (silent.set(), responses.cancel()))
            timer.daemon = True
            timer.start()
            return timer

        timer, last = watchdog(), time.perf_counter()
        try:
            for reply in responses:
                timer.cancel()
                result.bytes_received += reply.ByteSize()
                if reply.error_message:
                    raise ServerError(f"the cloud refused the request: {reply.error_message}",
                                      grpc.StatusCode.UNKNOWN)
                response = reply.infer_response
                params = response.parameters
                if response.outputs:
                    now = time.perf_counter()
                    result.seconds_per_token.append(now - last)
                    last = now
                    token = int(decode_response(response)["token"][0])
                    result.tokens.append(token)
                    result.sources.append("cloud")
                    result.batch_streams.append(int(params["batch_streams"].int64_param)
                                                if "batch_streams" in params else 0)
                    if on_token is not None:
                        on_token(len(result.tokens) - 1, token, "cloud")
                if "finish_reason" in params:
                    result.finish_reason = params["finish_reason"].string_param
                    result.cloud_layer_evals = int(params["layer_evals"].int64_param)
                if "triton_final_response" in params and params["triton_final_response"].bool_param:
                    return result
                timer = watchdog()
        except grpc.RpcError:
            if silent.is_set():
                raise DeadlineExceeded(f"no response from the cloud's stream '{self.model}' within "
                                       f"{self.timeout_s} s (after {len(result.tokens)} tokens)") from None
            raise
        finally:
            timer.cancel()
            responses.cancel()
        raise Unavailable(f"the cloud's stream '{self.model}' ended before its final response "
                          f"(after {len(result.tokens)} tokens)")
