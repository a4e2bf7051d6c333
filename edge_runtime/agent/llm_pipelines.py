"""The agent's LLM pipelines (the interface: pipeline.py): `collab-llm` (the collaborative LLM's
device side) and `tp` (rank 0 of a tensor-parallel group). Both import torch when opened.
"""
import threading
from pathlib import Path

import numpy as np

from edge_runtime.agent.pipeline import Context, Pipeline, PipelineInputError, TensorInfo, int_param, one_input, text_input
from edge_runtime.agent.policy import Decision


# --- collab-llm ---------------------------------------------------------------------------------
class CollabPipeline(Pipeline):
    """Input `prompt` (BYTES, one UTF-8 string; or `prompt_ids` INT64); parameter max_new_tokens.
    Outputs `text`, `tokens` and per token `sources` (edge | cloud | degraded)."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from tokenizers import Tokenizer

        from edge_runtime.collab.cli import resolve_threshold
        from edge_runtime.collab.device import CollabLlm
        super().__init__(name, "collab-llm", "edgefold_collab_llm")
        self.mode = str(options.get("mode", "collaborative"))
        metric = str(options.get("metric", "max_prob"))
        threshold = resolve_threshold(folder, options.get("threshold"), metric, None, self.mode)
        deadline_s = float(options.get("deadline_s", 5.0))
        self.llm = CollabLlm(folder, self.mode, None, threshold, metric,
                             cloud_model=str(options.get("cloud_model", "llm")), timeout_s=deadline_s,
                             quantize=options.get("quantize"), group_size=int(options.get("group_size", 32)),
                             client=ctx.client(deadline_s) if self.mode != "standalone" and ctx.cloud else None)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json")) \
            if (folder / "tokenizer.json").is_file() else None
        self.max_new_tokens = int(options.get("max_new_tokens", 32))
        self.reason = "start"
        self._lock = threading.Lock()
        self.inputs = (TensorInfo("prompt", "BYTES", (1,)),)
        self.outputs = (TensorInfo("text", "BYTES", (1,)), TensorInfo("tokens", "INT64", (-1,)),
                        TensorInfo("sources", "BYTES", (-1,)))

    def adapt(self, decision: Decision, link) -> None:
        if self.mode == "collaborative":
            with self._lock:
                self.llm.mode = "collaborative" if decision.allow_cloud else "standalone"
                self.reason = decision.reason

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": self.llm.mode, "threshold": self.llm.threshold, "why": self.reason}

    def infer(self, inputs: dict, params: dict) -> dict:
        if "prompt_ids" in inputs:
            ids = [int(t) for t in one_input(inputs, "prompt_ids", "iu").reshape(-1)]
        elif self.tokenizer is None:
            raise PipelineInputError("this model has no tokenizer.json: send 'prompt_ids' (INT64)")
        else:
            ids = self.tokenizer.encode(text_input(inputs, "prompt")).ids
        if not ids or any(not 0 <= t < self.llm.model.config.vocab_size for t in ids):
            raise PipelineInputError("the prompt must hold at least one token id, each within the vocabulary")
        steps = int_param(params, "max_new_tokens", self.max_new_tokens, 1, 4096)
        with self._lock:
            result = self.llm.generate(ids, steps)
            self.llm.end(result.conversation)          # one request, one conversation: free the session
        self.counters["offloaded"] += result.sources.count("cloud")
        self.counters["degraded"] += result.sources.count("degraded")
        text = self.tokenizer.decode(result.tokens) if self.tokenizer else " ".join(map(str, result.tokens))
        sources = np.empty(len(result.sources), dtype=object)
        sources[:] = [s.encode() for s in result.sources]
        return {"text": np.array([text.encode()], dtype=object), "tokens": np.array(result.tokens, np.int64),
                "sources": sources}

    def close(self) -> None:
        self.llm.close()


# --- tp: rank 0 of a tensor-parallel group ------------------------------------------------------
class TensorParallelPipeline(Pipeline):
    """`folder` is a `tp prepare` output. Workers: `peers = ["host:port", ...]` already running
    (`edge-runtime tp worker`), or started here on loopback when absent. Input `prompt` (BYTES) or
    `prompt_ids` (INT64); parameter max_new_tokens; greedy. Outputs `text` and `tokens`."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        import torch

        from edge_runtime.tp.config import TPConfig
        from edge_runtime.tp.launch import LocalWorkers, free_port, start_master
        from edge_runtime.tp.plan import ShardPlan
        from split.llama import Stop
        super().__init__(name, "tp", "edgefold_tp")
        self.world_size = ShardPlan.load(folder / "plan.json").world_size
        peers = options.get("peers")
        window = options.get("window")  # absent: each rank's from the plan (all resident without a budget)
        config = TPConfig(world_size=self.world_size, window=None if window is None else int(window),
                          master=str(options.get("master", "0.0.0.0:29500" if peers else f"127.0.0.1:{free_port()}")),
                          payload=str(options.get("payload", "fp32")), timeout_s=float(options.get("timeout_s", 5.0)),
                          join_timeout_s=float(options.get("join_timeout_s", 60.0)),
                          dtype=str(options.get("dtype", "fp32")))
        self.workers = None
        if not peers and self.world_size > 1:
            self.workers = LocalWorkers(folder, config)
            torch.set_num_threads(max(1, torch.get_num_threads() // self.world_size))
        try:
            self.master = start_master(folder, config)
        except BaseException:
            if self.workers:
                self.workers.stop(grace_s=0.5)
            raise
        self.max_new_tokens = int(options.get("max_new_tokens", 32))
        self.stop = Stop.of(self.master.config)
        self._lock = threading.Lock()
        self.inputs = (TensorInfo("prompt", "BYTES", (1,)),)
        self.outputs = (TensorInfo("text", "BYTES", (1,)), TensorInfo("tokens", "INT64", (-1,)))

    def describe(self) -> dict:
        return {"kind": self.kind, "world_size": self.world_size}

    def infer(self, inputs: dict, params: dict) -> dict:
        if "prompt_ids" in inputs:
            ids = [int(t) for t in one_input(inputs, "prompt_ids", "iu").reshape(-1)]
        else:
            try:
                ids = self.master.encode(text_input(inputs, "prompt"))
            except ValueError as err:
                raise PipelineInputError(str(err)) from None
        steps = int_param(params, "max_new_tokens", self.max_new_tokens, 1, 4096)
        with self._lock:
            try:
                tokens = list(self.master.generate(ids, steps, stop=self.stop))
            except ValueError as err:
                raise PipelineInputError(str(err)) from None
        return {"text": np.array([self.master.decode(tokens).encode()], dtype=object),
                "tokens": np.array(tokens, np.int64)}

    def close(self) -> None:
        self.master.close()
        if self.workers:
            self.workers.stop(grace_s=2.0)
