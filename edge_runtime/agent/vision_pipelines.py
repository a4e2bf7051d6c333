"""The agent's vision pipelines (the interface: pipeline.py): `local` (one ONNX model), `early-exit`
and `split` (a split deployment's stage chain with exits, offloading through the cloud), `edvit`
(class-wise sub-models on peer devices, fused here: edge_runtime.vision.edvit_runtime). The
`adaptive` kind (a small and a big model switched per frame) is adaptive_pipeline.py. ONNX Runtime
only; no torch.
"""
import threading
from pathlib import Path

import numpy as np

from edge_runtime.agent.pipeline import Context, Pipeline, PipelineInputError, TensorInfo, one_input
from edge_runtime.agent.policy import Decision
from edge_runtime.vision.stretch import Stretch, slowdown_for
from edgefold_proto.tensors import ORT_DATATYPES


# --- local: one ONNX model ---------------------------------------------------------------------
class OnnxPipeline(Pipeline):
    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from edge_runtime.vision.deployment import session
        super().__init__(name, "local", "onnxruntime_onnx")
        self.session = session(folder / "model.onnx", ctx.threads)
        self.stretch = Stretch(slowdown_for(options.get("slowdown", 1.0), ctx.profile))   # emulation: stretch.py
        self.inputs = tuple(self._info(n) for n in self.session.get_inputs())
        self.outputs = tuple(self._info(n) for n in self.session.get_outputs())

    @staticmethod
    def _info(node) -> TensorInfo:
        return TensorInfo(node.name, ORT_DATATYPES.get(node.type, node.type),
                          tuple(d if isinstance(d, int) else -1 for d in node.shape))

    def infer(self, inputs: dict, params: dict) -> dict:
        feed = {}
        for spec in self.inputs:
            value = one_input(inputs, spec.name, "biufO")
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
            values = self.stretch(tuple(v.shape for v in feed.values()), self.session.run, None, feed)
        except Exception as err:       # onnxruntime's InvalidArgument / Fail on a mistyped feed
            raise PipelineInputError(f"onnxruntime refused the inputs: {err}") from None
        return {spec.name: value for spec, value in zip(self.outputs, values)}


# --- early-exit / split: a split deployment's stage chain ----------------------------------------
class VisionPipeline(Pipeline):
    def __init__(self, name: str, kind: str, folder: Path, options: dict, ctx: Context):
        from edge_runtime.vision.deployment import Deployment
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
        self.slowdown = slowdown_for(options.get("slowdown", 1.0), ctx.profile)   # emulation: stretch.py
        self.candidates = None
        if self.configured == "auto":
            from edge_runtime.vision.placement_costs import measure_candidates
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
        from edge_runtime.vision.runtime import Runtime
        if placement not in self._runtimes:
            cloud = placement != "local" and self.ctx.cloud
            self._runtimes[placement] = Runtime(
                self.dep, placement, deadline_s=self.deadline_s, slowdown=self.slowdown,
                client=self.ctx.client(self.deadline_s) if cloud else None)
        return self._runtimes[placement]

    def adapt(self, decision: Decision, link) -> None:
        placement = self._choose(decision, link)
        with self._lock:
            self.placement, self.reason = placement, decision.reason

    def describe(self) -> dict:
        return {"kind": self.kind, "placement": self.placement, "why": self.reason}

    def infer(self, inputs: dict, params: dict) -> dict:
        x = one_input(inputs, "x", "f").astype(np.float32, copy=False)
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


# --- edvit: class-wise sub-models on peer devices, fused here --------------------------------------
class EdvitPipeline(Pipeline):
    """ED-ViT: the frame goes to every peer's agent (one sub-model each, in the package's order),
    the answers that arrive within `deadline_s` are fused here; `degraded` marks frames a peer missed."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from edge_runtime.vision.edvit_runtime import EdvitRuntime
        super().__init__(name, "edvit", "edgefold_edvit")
        peers = options.get("peers")
        if not isinstance(peers, list) or not all(isinstance(p, str) and p for p in peers):
            raise ValueError(f"pipeline '{name}': kind 'edvit' needs peers = [\"host:port\", ...], one per sub-model")
        self.runtime = EdvitRuntime(folder, peers, float(options.get("deadline_s", 0.5)), ctx.threads)
        self.shape = tuple(self.runtime.manifest["input"]["shape"])
        classes = self.runtime.manifest["classes"]
        self.inputs = (TensorInfo("x", "FP32", (-1, *self.shape)),)
        self.outputs = (TensorInfo("logits", "FP32", (-1, classes)), TensorInfo("label", "INT64", (-1,)),
                        TensorInfo("degraded", "BOOL", (-1,)), TensorInfo("peers_answered", "INT64", (-1,)))

    def describe(self) -> dict:
        return {"kind": self.kind, "peers": self.runtime.peers,
                "sub_models": [s["name"] for s in self.runtime.subs]}

    def infer(self, inputs: dict, params: dict) -> dict:
        x = one_input(inputs, "x", "f").astype(np.float32, copy=False)
        if x.shape[1:] != self.shape or len(x) == 0:
            raise PipelineInputError(f"input 'x': shape {list(x.shape)}, expected [-1, {', '.join(map(str, self.shape))}]")
        if not np.isfinite(x).all():
            raise PipelineInputError("input 'x' holds NaN or Inf")
        result = self.runtime.infer(x)
        self.counters["degraded"] += len(x) if result.degraded else 0
        return {"logits": result.logits, "label": result.label, "degraded": np.full(len(x), result.degraded),
                "peers_answered": np.full(len(x), int(result.present.sum()), np.int64)}

    def close(self) -> None:
        self.runtime.close()
