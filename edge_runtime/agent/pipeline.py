"""What a pipeline of the agent is: the interface every kind implements (Pipeline), the tensors
it names for ModelMetadata (TensorInfo), what pipelines share (Context), and the error a request
that does not fit gets (PipelineInputError, served as INVALID_ARGUMENT).

Every pipeline answers `infer(inputs, params) -> outputs` with numpy arrays and takes the offload
policy's decisions through `adapt`. The kinds are in vision_pipelines.py, adaptive_pipeline.py and
llm_pipelines.py; pipeline_factory.open_pipeline builds the one an agent.toml [[pipeline]] names.
"""
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.agent.policy import Decision

class PipelineInputError(ValueError):
    """The request does not fit the pipeline (INVALID_ARGUMENT); the message names the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple                 # -1: any size


@dataclass
class Context:
    """What pipelines share: the cloud (address, token or client certificate, TLS root), the device
    profile, the planner's link."""
    cloud: str | None
    token: str | None
    profile: object              # devices.profiles.DeviceProfile
    link: object                 # devices.profiles.Link (its RTT updated from heartbeats)
    root_certificates: bytes | None = None     # the cloud's TLS root (None: plaintext)
    threads: int = 1
    certificate_chain: bytes | None = None     # the device's client certificate (PEM), with private_key
    private_key: bytes | None = None

    def client(self, timeout_s: float):
        from edge_runtime.client.oip_client import OipClient
        return OipClient(self.cloud, token=self.token, root_certificates=self.root_certificates, timeout_s=timeout_s,
                         certificate_chain=self.certificate_chain, private_key=self.private_key)


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

    def forget_requests(self) -> None:
        """Drop what requests left behind for the next ones (an adaptive pipeline's per-stream
        history): a smoke inference is not a request (rollout.smoke_test)."""

    def close(self) -> None:
        pass


def one_input(inputs: dict, name: str, dtypes: str) -> np.ndarray:
    if name not in inputs:
        raise PipelineInputError(f"missing input tensor '{name}' (got {', '.join(inputs) or 'none'})")
    value = inputs[name]
    if value.dtype.kind not in dtypes:
        raise PipelineInputError(f"input '{name}': datatype {value.dtype} is not accepted here")
    return value


def text_input(inputs: dict, name: str) -> str:
    value = one_input(inputs, name, "O")
    if value.size != 1:
        raise PipelineInputError(f"input '{name}': expected one BYTES element, got {value.size}")
    try:
        return bytes(value.reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise PipelineInputError(f"input '{name}': not UTF-8 text") from None


def int_param(params: dict, key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PipelineInputError(f"parameter '{key}' must be an integer in [{low}, {high}], got {value!r}")
    return value
