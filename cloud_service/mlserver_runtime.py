"""The collaborative LLM's cloud continuation as an MLServer custom runtime (issue 17), so a KServe /
MLServer deployment hosts the `llm_continuation` backend with the code cloud-service runs.

    # MODELS/llm/model-settings.json
    {"name": "llm", "implementation": "cloud_service.mlserver_runtime.LlmContinuationRuntime",
     "parameters": {"extra": {"checkpoint": "/models/ee_lm", "first_layer": 2, "catch_up": "exact", "top_k": 5,
                              "max_sequence_idle_microseconds": 600000000, "max_state_bytes": 1073741824}}}
    # MODELS/settings.json: {"parallel_workers": 0, "grpc_port": 8081}   (the sessions live in one process)
    PYTHONPATH=/path/to/edgefold mlserver start MODELS      # or an MLServer image with edgefold installed

`parameters.extra` holds what a cloud-service config.toml holds in [parameters] (checkpoint, relative
to the model-settings.json folder; first_layer; catch_up; top_k; intra_op_thread_count) and in
[sequence_batching] (max_sequence_idle_microseconds, max_state_bytes; cloud-service's defaults).
model-settings.json `inputs` may declare hidden_states FP16 for an fp16 wire, as config.toml's
[[input]] does. A thin adapter; nothing of the model, its checks or its sessions is copied:
- a request is turned back into the OIP protobuf message cloud-service receives (MLServer has
  unpacked the raw contents into lists; they are packed again) and checked by the same code,
  cloud_service.request.model_inputs: names, datatypes, shapes, NaN/Inf, and compressed inputs
  decoded by cloud_service.compressed / split.codec, so the device's default int8 wire works;
  sequence_id / sequence_start / sequence_end are read by cloud_service.sessions.sequence_params;
- the backend runs inside cloud-service's ServedModel: the same SessionStore with the same
  begin / get / end / update rules, one request at a time per sequence in arrival order (an asyncio
  lock per sequence), and the torch work on the model's own thread (cloud_service.runner.Runner:
  off the event loop, so MLServer keeps serving other sequences meanwhile; inline only for calls
  that average under 200 us, which an LLM's never do); idle sessions expire every second;
- errors keep their meaning: InvalidArgument -> HTTP 400 / gRPC INVALID_ARGUMENT (the session stays
  usable), FailedPrecondition (a session this process does not hold) -> 422 / FAILED_PRECONDITION,
  on which the device resends its context with sequence_start.

Sessions live in this process's memory, so MLServer's parallel_workers must be 0 (what the test
runs) or 1: several workers take requests round robin, each with sessions of its own. Adaptive
batching stays off (max_batch_size above 1 is refused). Replicas behind one address need routing
by sequence id (the device also sends it as the x-sequence-id gRPC header); a request that reaches
a replica without its session gets FAILED_PRECONDITION and the device resyncs there. mlserver is
imported only in this module: the project's own venv does without it.
"""
import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import to_absolute_path

from cloud_service.backends.llm import LlmContinuationBackend
from cloud_service.config import ConfigError, ModelConfig, TensorSpec
from cloud_service.request import model_inputs
from cloud_service.served_model import ServedModel
from cloud_service.sessions import sequence_params
from edgefold_proto import pb
from edgefold_proto.serving import InvalidArgument, ServiceError, requested_outputs
from edgefold_proto.tensors import DTYPES, datatype_of, to_raw

SESSION_SWEEP_S = 1.0
# MLServerError's HTTP status for each of our errors; MLServer's gRPC server maps them back
# (400 INVALID_ARGUMENT, 404 NOT_FOUND, 422 FAILED_PRECONDITION; anything else INTERNAL)
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.FAILED_PRECONDITION: 422}
SESSION_DEFAULTS = {"max_sequence_idle_microseconds": 60_000_000, "max_state_bytes": ModelConfig.max_state_bytes}


def continuation_config(name: str, extra: dict, inputs: list[TensorSpec]) -> ModelConfig:
    """The ModelConfig cloud-service would read from a config.toml with these [parameters] and
    [sequence_batching] values (the session ones taken out of `extra`)."""
    parameters = dict(extra)
    session = {key: parameters.pop(key, default) for key, default in SESSION_DEFAULTS.items()}
    for key, value in session.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model '{name}': parameters.extra.{key} must be an integer >= 1, got {value!r}")
    return ModelConfig(name, backend="llm_continuation", sequence_idle_us=session["max_sequence_idle_microseconds"],
                       max_state_bytes=session["max_state_bytes"], inputs=inputs, parameters=parameters)


def _copy_parameters(params, into) -> None:
    """MLServer's Parameters (its extra fields: what the client sent) into a protobuf parameters map."""
    for key, value in ((params.model_extra or {}) if params is not None else {}).items():
        if isinstance(value, bool):
            into[key].bool_param = value
        elif isinstance(value, int):
            if value >= 1 << 63:
                into[key].uint64_param = value
            else:
                into[key].int64_param = value
        elif isinstance(value, float):
            into[key].double_param = value
        elif isinstance(value, str):
            into[key].string_param = value
        else:
            raise InvalidArgument(f"parameter '{key}' must be a bool, an integer, a float or a string, "
                                  f"got {type(value).__name__}")


def _raw(name: str, datatype: str, data) -> bytes:
    """A tensor's elements, as MLServer decoded them (a flat list from gRPC raw contents, nested
    lists from REST JSON), packed back into raw bytes."""
    if datatype not in DTYPES:
        raise InvalidArgument(f"input '{name}': datatype {datatype!r} is not an Open Inference Protocol datatype")
    try:
        return to_raw(np.array(list(data), dtype=object) if datatype == "BYTES" else np.asarray(data, DTYPES[datatype]))
    except (ValueError, TypeError, OverflowError) as err:
        raise InvalidArgument(f"input '{name}': {err}") from None


def oip_request(payload: InferenceRequest, model_name: str) -> pb.ModelInferRequest:
    """The request as the OIP protobuf message cloud-service receives."""
    request = pb.ModelInferRequest(model_name=model_name, id=payload.id or "")
    _copy_parameters(payload.parameters, request.parameters)
    for tensor in payload.inputs:
        datatype = getattr(tensor.datatype, "value", tensor.datatype)
        message = request.inputs.add(name=tensor.name, datatype=datatype, shape=tensor.shape)
        _copy_parameters(tensor.parameters, message.parameters)
        request.raw_input_contents.append(_raw(tensor.name, datatype, getattr(tensor.data, "root", tensor.data)))
    for output in payload.outputs or []:
        request.outputs.add(name=output.name)
    return request


def response_output(name: str, value) -> ResponseOutput:
    """One output with its own shape (MLServer's NumpyCodec would turn a [1] into [1, 1])."""
    array = np.asarray(value)
    return ResponseOutput(name=name, datatype=datatype_of(array), shape=list(array.shape), data=array.ravel().tolist())


class LlmContinuationRuntime(MLModel):
    async def load(self) -> bool:
        if self.settings.max_batch_size > 1:
            raise ConfigError(f"model '{self.name}': max_batch_size {self.settings.max_batch_size}: MLServer's "
                              "adaptive batching would merge requests of different sequences; leave it unset")
        inputs = [TensorSpec(t.name, getattr(t.datatype, "value", t.datatype), tuple(t.shape))
                  for t in self.settings.inputs or []]
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        config = continuation_config(self.name, extra, inputs)
        folder = Path(to_absolute_path(self.settings, "."))   # a relative checkpoint starts here
        backend = await asyncio.to_thread(LlmContinuationBackend, folder, config)   # reads the weights
        # as cloud-service's Repository.build: the served config declares what the backend takes
        config = replace(config, inputs=backend.inputs, outputs=backend.outputs)
        self.served = ServedModel(self.name, self.version or "1", config, backend)
        self.served.start()
        self._sweeper = asyncio.create_task(self._expire_idle_sessions())
        return True

    async def _expire_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(SESSION_SWEEP_S)
            self.served.sessions.expire_idle()

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        config = self.served.config
        try:
            request = oip_request(payload, self.name)
            sequence = sequence_params(request.parameters)
            inputs = model_inputs(request, config)
            names = requested_outputs(request, [spec.name for spec in config.outputs])
            outputs, _ = await self.served.infer(inputs, sequence)
        except ServiceError as err:
            raise MLServerError(err.message, HTTP_STATUS.get(err.code, 500)) from None
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[response_output(name, outputs[name]) for name in names])

    async def unload(self) -> bool:
        if hasattr(self, "served"):   # else load() failed before there was anything to release
            self._sweeper.cancel()
            await self.served.close()
        return True
