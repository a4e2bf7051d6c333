"""The device runtime for a split deployment: head (with exits) locally on ONNX Runtime, the
rest in the cloud through an Open Inference Protocol call with a deadline, and a local answer
when the cloud is down or late, flagged as degraded.

    rt = Runtime("deploy/res_cnn/device", "split:stage2:b8:int8", cloud="127.0.0.1:8001", deadline_s=0.2)
    result = rt.infer(frame)            # frame (1, 64, 64) float32
    result.label, result.where, result.degraded

`codec_form` (default: the deployment's "codec_form", else "parameters") says how an int8/int4
activation travels: "parameters": tensor "z" with codec parameters (cloud-service decodes them);
"inputs": the deployment's self-contained tail, with inputs "z_q" (the same wire bytes), "z_scale"
FP32 (C,) and "z_zero_point" UINT8 (C,), which any Open Inference Protocol server serves.

Placements are split.placement strings. On a failed or late cloud call the runtime answers
with the deepest exit branch it has already computed (fallback="exit"), or by running the
remaining stages itself (fallback="local", also used when no exit was computed); after a
failure it skips the cloud for `retry_after_s` so later frames do not each wait for a deadline.

`slowdown` > 1 emulates a slower device on this machine: each device-side computation (a stage,
the bottleneck encoder, the codec, PNG encoding) is stretched to `slowdown` times the fastest
it has run here (edge_runtime.vision.stretch), so a benchmark can put a Raspberry-Pi-class
device behind the link emulator.
"""
import time
from dataclasses import dataclass

import grpc
import numpy as np

from edge_runtime.client.oip_client import OipClient
from edge_runtime.vision.deployment import CODEC_FORMS, Deployment
from edge_runtime.vision.stretch import Stretch
from edge_runtime.vision.exit_policy import ExitPolicy, softmax
from split.codec import encode
from split.placement import Placement


@dataclass
class Result:
    logits: np.ndarray          # (classes,)
    label: int
    confidence: float
    where: str                  # exit:<stage> | local | cloud
    degraded: bool = False      # the cloud was down or late: a local answer instead
    stages_run: int = 0
    bytes_sent: int = 0         # bytes of the tensor sent (or attempted) to the cloud
    latency_s: float = 0.0
    error: str = ""


class Runtime:
    def __init__(self, deployment, placement: str = "local", cloud: str | None = None, deadline_s: float = 0.5,
                 thresholds: dict[str, float] | None = None, fallback: str = "exit", retry_after_s: float = 1.0,
                 threads: int = 1, token: str | None = None, slowdown: float = 1.0,
                 root_certificates: bytes | None = None, client: OipClient | None = None,
                 codec_form: str | None = None):
        self.dep = deployment if isinstance(deployment, Deployment) else Deployment.load(deployment, threads)
        self.placement = Placement.parse(placement) if isinstance(placement, str) else placement
        manifest = self.dep.manifest
        self.policy = ExitPolicy(thresholds if thresholds is not None else manifest["thresholds"])
        if fallback not in ("exit", "local"):
            raise ValueError(f"fallback '{fallback}': expected 'exit' or 'local'")
        self.fallback, self.deadline_s, self.retry_after_s = fallback, deadline_s, retry_after_s
        self.slowdown, self._device = slowdown, Stretch(slowdown)   # device-side work, stretched
        p = self.placement
        self.codec_form = codec_form or self.dep.codec_form
        if self.codec_form not in CODEC_FORMS:
            raise ValueError(f"codec_form '{self.codec_form}': expected one of {', '.join(CODEC_FORMS)}")
        self.cut = len(self.dep.stages)
        if p.kind == "split":
            self.cut = self.dep.stage_index(p.stage) + 1
            try:
                self.cloud_model = self.dep.tail_model(p.stage, p.codec, self.codec_form,
                                                       p.bottleneck_key if p.bottleneck else None)
            except ValueError as err:
                raise ValueError(f"placement '{p}': {err}") from None
        elif p.kind == "offload":
            self.cut, self.cloud_model = 0, manifest["full_model"]
        if p.kind != "local" and not (cloud or client):
            raise ValueError(f"placement '{p}' needs a cloud address")
        if p.kind == "local":
            self.client = None
        else:   # `client`: one the caller made with its own credentials (the agent's: token or certificate)
            self.client = client or OipClient(cloud, token=token, root_certificates=root_certificates,
                                              timeout_s=deadline_s)
        self._skip_cloud_until = 0.0

    def close(self) -> None:
        if self.client:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _answer(self, logits, where, start, **kw) -> Result:
        logits = np.asarray(logits, np.float32).reshape(-1)
        p = softmax(logits.astype(np.float64))
        return Result(logits, int(p.argmax()), float(p.max()), where, latency_s=time.perf_counter() - start, **kw)

    def _run_local(self, x, first: int, last: int, use_exits: bool, stages_run: int, start):
        """Stages first..last-1; returns (activation, exit Result or None, deepest exit logits, stages run)."""
        deepest = None
        for i in range(first, last):
            x, exit_logits = self._device(("stage", i), self.dep.run_stage, i, x)
            stages_run += 1
            if exit_logits is not None:
                name = self.dep.stages[i].name
                deepest = (name, exit_logits)
                if use_exits and self.policy.exits(name, exit_logits):
                    answer = self._answer(exit_logits, f"exit:{name}", start, stages_run=stages_run)
                    return x, answer, deepest, stages_run
        return x, None, deepest, stages_run

    def infer(self, frame: np.ndarray) -> Result:
        start = time.perf_counter()
        x = np.asarray(frame, np.float32)
        x = x[None] if x.ndim == len(self.dep.manifest["input"]["shape"]) else x     # (1, C, H, W)
        x, exited, deepest, ran = self._run_local(x, 0, self.cut, True, 0, start)
        if exited is not None:
            return exited
        if self.placement.kind == "local":
            return self._answer(x, "local", start, stages_run=ran)
        sent, error = 0, "cloud skipped after a recent failure"
        if time.perf_counter() >= self._skip_cloud_until:
            inputs, params, sent = self._wire(x)
            remaining = self.deadline_s - (time.perf_counter() - start)
            try:
                if remaining <= 0:
                    raise TimeoutError("deadline spent on the device")
                out = self.client.infer(self.cloud_model, inputs, outputs=["logits"], timeout_s=remaining,
                                        input_parameters=params)["logits"]
                return self._answer(out, "cloud", start, stages_run=ran, bytes_sent=sent)
            except grpc.RpcError as err:
                error = f"{err.code().name}: {err.details()}"
                self._skip_cloud_until = time.perf_counter() + self.retry_after_s
            except TimeoutError as err:
                error = str(err)
        # degraded: the cloud did not answer in time
        if self.fallback == "exit" and deepest is not None:
            return self._answer(deepest[1], f"exit:{deepest[0]}", start, degraded=True, stages_run=ran,
                                bytes_sent=sent, error=error)
        x, _, _, ran = self._run_local(x, self.cut, len(self.dep.stages), False, ran, start)
        return self._answer(x, "local", start, degraded=True, stages_run=ran, bytes_sent=sent, error=error)

    def _wire(self, x: np.ndarray):
        """The input tensors to send, their parameters (or None) and their bytes on the wire."""
        p = self.placement
        if p.kind == "offload":
            enc = self._device("png", encode, x, "png")
            return {"image": enc.data}, {"image": enc.parameters}, enc.nbytes
        if p.bottleneck:
            x = self._device("bottleneck", self.dep.encode, p.bottleneck_key, x)
        if p.codec == "fp32":
            return {"z": x}, None, x.nbytes
        enc = self._device("codec", encode, x, p.codec, 1 if x.ndim == 4 else -1)
        if self.codec_form == "inputs":
            inputs = codec_inputs(enc)
            return inputs, None, sum(a.nbytes for a in inputs.values())
        return {"z": enc.data}, {"z": enc.parameters}, enc.nbytes


def codec_inputs(enc, name: str = "z") -> dict[str, np.ndarray]:
    """An int8/int4 encoding as a self-contained tail's inputs (split.vision.dequant_tail):
    <name>_q the wire tensor, <name>_scale float32 (C,), <name>_zero_point uint8 (C,)."""
    return {f"{name}_q": enc.data, f"{name}_scale": enc.scale, f"{name}_zero_point": enc.zero_point}
