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
The kinds live in vision_pipelines.py (local, early-exit, split, adaptive) and llm_pipelines.py
(collab-llm, tp); torch is imported only by the two LLM kinds.
"""
from dataclasses import dataclass, field
from pathlib import Path

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


def open_pipeline(spec, folder: Path, ctx: Context) -> Pipeline:
    """Build the pipeline of an agent.toml [[pipeline]] over a model folder (`<model>/<version>/`)."""
    from edge_runtime.agent import llm_pipelines, vision_pipelines
    if spec.kind == "local":
        return vision_pipelines.OnnxPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind in ("early-exit", "split"):
        return vision_pipelines.VisionPipeline(spec.name, spec.kind, folder, spec.options, ctx)
    if spec.kind == "adaptive":
        return vision_pipelines.AdaptivePipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "collab-llm":
        return llm_pipelines.CollabPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "tp":
        return llm_pipelines.TensorParallelPipeline(spec.name, folder, spec.options, ctx)
    raise ValueError(f"pipeline '{spec.name}': unknown kind '{spec.kind}'")
