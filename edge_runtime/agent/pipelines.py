"""What the agent serves: one pipeline per `[[pipeline]]` of agent.toml, each over a model folder
on the device (pulled from the cloud, or a local path). Every pipeline answers
`infer(inputs, params) -> outputs` with numpy arrays, names its tensors for ModelMetadata, and
takes the offload policy's decisions through `adapt`.

    pipe = open_pipeline(spec, folder, context)       # folder: <model>/<version>/ on the device
    pipe.infer({"x": frame}, {})["label"]

Kinds:
- local       an ONNX model run by ONNX Runtime on the device
- early-exit  a split deployment's stage chain with its exits, every frame on the device
- split       the same, offloading the rest through the cloud (placement string or "auto": the
              planner, re-run when the policy changes objective or the link's RTT changes)
- adaptive    a small and a big model switched per frame on temporal consistency and confidence,
              escalating to the cloud's copy of the big model when the link is good
- collab-llm  the collaborative LLM (edge layers + exit head; the cloud finishes the rest)
- tp          rank 0 of a tensor-parallel group (workers started here or already running on peers)
torch is imported only by the two LLM kinds.
"""
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edge_runtime.agent.policy import Decision

ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
                 "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int8)": "INT8",
                 "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}


class PipelineInputError(ValueError):
    """The request does not fit the pipeline (INVALID_ARGUMENT); the message names the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple                 # -1: any size


@dataclass
class Context:
    """What pipelines share: the cloud, the device profile, the planner's link."""
    cloud: str | None
    token: str | None
    profile: object              # devices.profiles.DeviceProfile
    link: object                 # devices.profiles.Link (its RTT updated from heartbeats)
    root_certificates: bytes | None = None     # the cloud's TLS root (None: plaintext)
    threads: int = 1

    def client(self, timeout_s: float):
        from edge_runtime.oip_client import OipClient
        return OipClient(self.cloud, token=self.token, root_certificates=self.root_certificates, timeout_s=timeout_s)


@dataclass
class Pipeline:
    name: str
    kind: str
    platform: str = "edgefold_agent"
    inputs: tuple = ()
    outputs: tuple = ()
    counters: dict = field(default_factory=lambda: {"requests": 0, "failures": 0, "offloaded": 0, "degraded": 0})

    def infer(self, inputs: dict, params: dict) -> dict:
        raise NotImplementedError

    def adapt(self, decision: Decision, link) -> None:
        """Take the offload policy's decision (pipelines without a cloud part ignore it)."""

    def describe(self) -> dict:
        return {"kind": self.kind}

    def close(self) -> None:
        pass


def _one(inputs: dict, name: str, dtypes: str) -> np.ndarray:
    if name not in inputs:
        raise PipelineInputError(f"missing input tensor '{name}' (got {', '.join(inputs) or 'none'})")
    value = inputs[name]
    if value.dtype.kind not in dtypes:
        raise PipelineInputError(f"input '{name}': datatype {value.dtype} is not accepted here")
    return value


def _text(inputs: dict, name: str) -> str:
    value = _one(inputs, name, "O")
    if value.size != 1:
        raise PipelineInputError(f"input '{name}': expected one BYTES element, got {value.size}")
    try:
        return bytes(value.reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise PipelineInputError(f"input '{name}': not UTF-8 text") from None


def _int_param(params: dict, key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PipelineInputError(f"parameter '{key}' must be an integer in [{low}, {high}], got {value!r}")
    return value


# --- local: one ONNX model ---------------------------------------------------------------------
class OnnxPipeline(Pipeline):
    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from edge_runtime.deployment import session
        super().__init__(name, "local", "onnxruntime_onnx")
        self.session = session(folder / "model.onnx", ctx.threads)
        self.inputs = tuple(self._info(n) for n in self.session.get_inputs())
        self.outputs = tuple(self._info(n) for n in self.session.get_outputs())

    @staticmethod
    def _info(node) -> TensorInfo:
        return TensorInfo(node.name, ORT_DATATYPES.get(node.type, node.type),
                          tuple(d if isinstance(d, int) else -1 for d in node.shape))

    def infer(self, inputs: dict, params: dict) -> dict:
        feed = {}
        for spec in self.inputs:
            value = _one(inputs, spec.name, "biufO")
            if value.ndim != len(spec.shape) or any(d not in (-1, v) for d, v in zip(spec.shape, value.shape)):
                raise PipelineInputError(f"input '{spec.name}': shape {list(value.shape)} does not match "
                                         f"{list(spec.shape)} (-1: any)")
            if spec.datatype in ("FP32", "FP16", "FP64") and not np.isfinite(value).all():
                raise PipelineInputError(f"input '{spec.name}' holds NaN or Inf")
            feed[spec.name] = value
        extra = set(inputs) - set(feed)
        if extra:
            raise PipelineInputError(f"unknown input tensor(s) {', '.join(sorted(extra))}")
        try:
            values = self.session.run(None, feed)
        except Exception as err:       # onnxruntime's InvalidArgument / Fail on a mistyped feed
            raise PipelineInputError(f"onnxruntime refused the inputs: {err}") from None
        return {spec.name: value for spec, value in zip(self.outputs, values)}


# --- early-exit / split: a split deployment's stage chain ----------------------------------------
class VisionPipeline(Pipeline):
    def __init__(self, name: str, kind: str, folder: Path, options: dict, ctx: Context):
        from edge_runtime.deployment import Deployment
        super().__init__(name, kind, "edgefold_split")
        self.dep = Deployment.load(folder, ctx.threads)
        self.ctx, self.options = ctx, options
        overrides = options.get("exit_thresholds", {})       # over the calibrated thresholds
        manifest = self.dep.manifest
        manifest["thresholds"] = {**manifest["thresholds"], **overrides}
        if "exit_rates" in manifest:                          # measured at the calibrated thresholds only
            manifest["exit_rates"] = {k: v for k, v in manifest["exit_rates"].items() if k not in overrides}
        self.deadline_s = float(options.get("deadline_s", 0.5))
        self.configured = "local" if kind == "early-exit" else str(options.get("placement", "auto"))
        if kind == "split" and not ctx.cloud:
            raise ValueError(f"pipeline '{name}': kind 'split' needs [cloud] address")
        slowdown = options.get("slowdown", 1.0)
        if slowdown == "profile":        # stretch device compute to the profile's speed (emulation)
            from devices.probe import peak_gflops
            slowdown = max(1.0, peak_gflops() / ctx.profile.fp32_gflops)
        self.slowdown = float(slowdown)
        self.candidates = None
        if self.configured == "auto":
            from edge_runtime.plan import measure_candidates
            self.candidates, _ = measure_candidates(self.dep, repeats=5)
        self._runtimes: dict = {}
        self._lock = threading.Lock()
        self.placement, self.reason = self._choose(Decision(True, "latency", "start"), ctx.link), "start"
        shape = tuple(self.dep.manifest["input"]["shape"])
        self.inputs = (TensorInfo("x", "FP32", (-1, *shape)),)
        self.outputs = (TensorInfo("logits", "FP32", (-1, -1)), TensorInfo("label", "INT64", (-1,)),
                        TensorInfo("where", "BYTES", (-1,)), TensorInfo("degraded", "BOOL", (-1,)))

    def _choose(self, decision: Decision, link) -> str:
        if not decision.allow_cloud:
            return "local"
        if self.configured != "auto":
            return self.configured
        from devices.probe import peak_gflops
        from devices.profiles import load_profile
        from split.planner import plan
        result = plan(self.candidates, link, self.ctx.profile, load_profile("cloud-cpu"), peak_gflops(),
                      decision.objective, self.options.get("accuracy_floor"))
        return result.choice.candidate.placement if result.choice else "local"

    def _runtime(self, placement: str):
        from edge_runtime.runtime import Runtime
        if placement not in self._runtimes:
            self._runtimes[placement] = Runtime(
                self.dep, placement, cloud=self.ctx.cloud if placement != "local" else None,
                deadline_s=self.deadline_s, token=self.ctx.token, slowdown=self.slowdown,
                root_certificates=self.ctx.root_certificates)
        return self._runtimes[placement]

    def adapt(self, decision: Decision, link) -> None:
        placement = self._choose(decision, link)
        with self._lock:
            self.placement, self.reason = placement, decision.reason

    def describe(self) -> dict:
        return {"kind": self.kind, "placement": self.placement, "why": self.reason}

    def infer(self, inputs: dict, params: dict) -> dict:
        x = _one(inputs, "x", "f").astype(np.float32, copy=False)
        shape = tuple(self.dep.manifest["input"]["shape"])
        if x.shape[1:] != shape:
            raise PipelineInputError(f"input 'x': shape {list(x.shape)}, expected [-1, {', '.join(map(str, shape))}]")
        if not np.isfinite(x).all():
            raise PipelineInputError("input 'x' holds NaN or Inf")
        with self._lock:
            runtime = self._runtime(self.placement)
        results = [runtime.infer(frame) for frame in x]
        self.counters["offloaded"] += sum(r.where == "cloud" for r in results)
        self.counters["degraded"] += sum(r.degraded for r in results)
        where = np.empty(len(results), dtype=object)
        where[:] = [r.where.encode() for r in results]
        return {"logits": np.stack([r.logits for r in results]) if results else np.zeros((0, 0), np.float32),
                "label": np.array([r.label for r in results], np.int64), "where": where,
                "degraded": np.array([r.degraded for r in results], bool)}

    def close(self) -> None:
        for runtime in self._runtimes.values():
            runtime.close()


# --- adaptive: a small and a big model, switched per frame -----------------------------------------
class AdaptivePipeline(Pipeline):
    """A folder from split.vision.adaptive.build_adaptive (small.onnx, big.onnx, adaptive.json).
    Frames of one stream, in order: the small model answers unless its output is temporally
    inconsistent or unconfident, then the big one (or the cloud's copy when the link is good) does,
    for `hold` frames (edge_runtime.switch). The device state (battery, heat, link quality) is the
    agent's, from devices.telemetry and heartbeats. Outputs `y` (B, classes + regression), `ran`
    (e.g. b"small,cloud") and `degraded` (the cloud did not answer; the big model did, here)."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        import json

        from edge_runtime.deployment import session
        from edge_runtime.switch import AdaptiveSwitch, DeviceState, SwitchConfig
        super().__init__(name, "adaptive", "edgefold_adaptive")
        manifest = json.loads((folder / "adaptive.json").read_text())
        self.shape = tuple(manifest["input"]["shape"])
        small, big = session(folder / "small.onnx", ctx.threads), session(folder / "big.onnx", ctx.threads)
        settings = {**manifest.get("switch", {}), **options.get("switch", {}), "regression": manifest["regression"]}
        try:
            config = SwitchConfig(**settings)
        except TypeError as err:
            raise ValueError(f"pipeline '{name}': bad switch settings {settings}: {err}") from None
        cloud_model = manifest.get("cloud_model")
        self.client = ctx.client(float(options.get("deadline_s", 0.5))) if cloud_model and ctx.cloud else None

        def run_cloud(x):      # the cloud's copy of the big model; None: the switch runs the big one here
            import grpc
            try:
                out = self.client.infer(cloud_model, {"x": x[None]})["y"][0]
                self.counters["offloaded"] += 1
                return out
            except grpc.RpcError:
                self.counters["degraded"] += 1
                return None
        self.switch = AdaptiveSwitch(lambda x: small.run(None, {"x": x[None]})[0][0],
                                     lambda x: big.run(None, {"x": x[None]})[0][0], config,
                                     run_cloud if self.client else None)
        self.state = DeviceState()
        self._lock = threading.Lock()
        self.inputs = (TensorInfo("x", "FP32", (-1, *self.shape)),)
        self.outputs = (TensorInfo("y", "FP32", (-1, -1)), TensorInfo("ran", "BYTES", (-1,)),
                        TensorInfo("degraded", "BOOL", (-1,)))

    def adapt(self, decision: Decision, link) -> None:
        self.state = decision.state

    def describe(self) -> dict:
        return {"kind": self.kind, "cloud": self.client is not None}

    def infer(self, inputs: dict, params: dict) -> dict:
        x = _one(inputs, "x", "f").astype(np.float32, copy=False)
        if x.shape[1:] != self.shape or not np.isfinite(x).all():
            raise PipelineInputError(f"input 'x': expected finite frames of shape [-1, {', '.join(map(str, self.shape))}]"
                                     f", got {list(x.shape)}")
        with self._lock:                       # one stream: frames in order
            answers = [self.switch.step(frame, self.state) for frame in x]
        ran = np.empty(len(answers), dtype=object)
        ran[:] = [",".join(a.ran).encode() for a in answers]
        return {"y": np.stack([a.output for a in answers]).astype(np.float32), "ran": ran,
                "degraded": np.array([a.ran[-2:] == ("cloud", "big") for a in answers], bool)}

    def close(self) -> None:
        if self.client:
            self.client.close()


# --- collab-llm ---------------------------------------------------------------------------------
class CollabPipeline(Pipeline):
    """Input `prompt` (BYTES, one UTF-8 string; or `prompt_ids` INT64); parameter max_new_tokens.
    Outputs `text`, `tokens` and per token `sources` (edge | cloud | degraded)."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from tokenizers import Tokenizer

        from edge_runtime.collab import CollabLlm
        from edge_runtime.collab_cli import resolve_threshold
        super().__init__(name, "collab-llm", "edgefold_collab_llm")
        self.mode = str(options.get("mode", "collaborative"))
        metric = str(options.get("metric", "max_prob"))
        threshold = resolve_threshold(folder, options.get("threshold"), metric, None, self.mode)
        deadline_s = float(options.get("deadline_s", 5.0))
        self.llm = CollabLlm(folder, self.mode, None, threshold, metric,
                             cloud_model=str(options.get("cloud_model", "llm")), timeout_s=deadline_s,
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
            ids = [int(t) for t in _one(inputs, "prompt_ids", "iu").reshape(-1)]
        elif self.tokenizer is None:
            raise PipelineInputError("this model has no tokenizer.json: send 'prompt_ids' (INT64)")
        else:
            ids = self.tokenizer.encode(_text(inputs, "prompt")).ids
        if not ids or any(not 0 <= t < self.llm.model.config.vocab_size for t in ids):
            raise PipelineInputError("the prompt must hold at least one token id, each within the vocabulary")
        steps = _int_param(params, "max_new_tokens", self.max_new_tokens, 1, 4096)
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

        from edge_runtime.tp.cli import LocalWorkers, free_port, plan_checksum
        from edge_runtime.tp.collective import make_collective
        from edge_runtime.tp.engine import Master
        from edge_runtime.tp.plan import ShardPlan
        super().__init__(name, "tp", "edgefold_tp")
        plan = ShardPlan.load(folder / "plan.json")
        self.world_size = plan.world_size
        peers = options.get("peers")
        comm = SimpleNamespace(window=int(options.get("window", 0)), backend="star",
                               payload=str(options.get("payload", "fp32")),
                               timeout_s=float(options.get("timeout_s", 5.0)),
                               join_timeout_s=float(options.get("join_timeout_s", 60.0)), curve_keys=None)
        master = str(options.get("master", f"0.0.0.0:29500" if peers else f"127.0.0.1:{free_port()}"))
        self.workers = None
        if not peers and self.world_size > 1:
            self.workers = LocalWorkers(folder, self.world_size, master.replace("0.0.0.0", "127.0.0.1"), comm)
            torch.set_num_threads(max(1, torch.get_num_threads() // self.world_size))
        try:
            collective = make_collective("star", 0, self.world_size, master, comm.payload, comm.timeout_s,
                                         join_timeout_s=comm.join_timeout_s, plan_checksum=plan_checksum(plan))
            self.master = Master(folder / "rank0", collective, comm.window)
        except BaseException:
            if self.workers:
                self.workers.stop(grace_s=0.5)
            raise
        self.max_new_tokens = int(options.get("max_new_tokens", 32))
        self.stop_ids = list(self.master.config.eos_token_ids)
        self._lock = threading.Lock()
        self.inputs = (TensorInfo("prompt", "BYTES", (1,)),)
        self.outputs = (TensorInfo("text", "BYTES", (1,)), TensorInfo("tokens", "INT64", (-1,)))

    def describe(self) -> dict:
        return {"kind": self.kind, "world_size": self.world_size}

    def infer(self, inputs: dict, params: dict) -> dict:
        if "prompt_ids" in inputs:
            ids = [int(t) for t in _one(inputs, "prompt_ids", "iu").reshape(-1)]
        else:
            try:
                ids = self.master.encode(_text(inputs, "prompt"))
            except ValueError as err:
                raise PipelineInputError(str(err)) from None
        steps = _int_param(params, "max_new_tokens", self.max_new_tokens, 1, 4096)
        with self._lock:
            try:
                tokens = list(self.master.generate(ids, steps, stop_ids=self.stop_ids))
            except ValueError as err:
                raise PipelineInputError(str(err)) from None
        return {"text": np.array([self.master.decode(tokens).encode()], dtype=object),
                "tokens": np.array(tokens, np.int64)}

    def close(self) -> None:
        self.master.close()
        if self.workers:
            self.workers.stop(grace_s=2.0)


def open_pipeline(spec, folder: Path, ctx: Context) -> Pipeline:
    """Build the pipeline of an agent.toml [[pipeline]] over a model folder (`<model>/<version>/`)."""
    if spec.kind == "local":
        return OnnxPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind in ("early-exit", "split"):
        return VisionPipeline(spec.name, spec.kind, folder, spec.options, ctx)
    if spec.kind == "adaptive":
        return AdaptivePipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "collab-llm":
        return CollabPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "tp":
        return TensorParallelPipeline(spec.name, folder, spec.options, ctx)
    raise ValueError(f"pipeline '{spec.name}': unknown kind '{spec.kind}'")
