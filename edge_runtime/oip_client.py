"""A small Open Inference Protocol client for the device side (no tritonclient needed).

Every call has a deadline. Errors keep their gRPC status so callers can tell a down cloud
(UNAVAILABLE), a late one (DEADLINE_EXCEEDED) and a bad request (INVALID_ARGUMENT) apart.

    with OipClient("127.0.0.1:8001") as client:
        outputs = client.infer("mlp", {"x": np.zeros((1, 16), np.float32)})
"""
import grpc
import numpy as np

from edgefold_proto import METHODS, pb
from edgefold_proto.tensors import datatype_of, from_raw, to_raw

DEFAULT_TIMEOUT_S = 10.0


def _param(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def build_request(model: str, inputs: dict[str, np.ndarray], version: str = "", outputs=(),
                  parameters: dict | None = None, request_id: str = "",
                  input_parameters: dict[str, dict] | None = None) -> pb.ModelInferRequest:
    """`input_parameters[name]` become that tensor's parameters (e.g. a codec's scale and zero point)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(_param(value))
    for name, array in inputs.items():
        array = np.asarray(array)
        tensor = request.inputs.add(name=name, datatype=datatype_of(array))
        tensor.shape.extend(array.shape)
        for key, value in (input_parameters or {}).get(name, {}).items():
            tensor.parameters[key].CopyFrom(_param(value))
        request.raw_input_contents.append(to_raw(array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {out.name: from_raw(out.name, out.datatype, list(out.shape), raw)
            for out, raw in zip(response.outputs, response.raw_output_contents)}


class OipClient:
    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_message_bytes: int = 64 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_certificates is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self._calls = {}
        for name, method in METHODS.items():
            make = self.channel.stream_stream if method.streaming else self.channel.unary_unary
            self._calls[name] = make(method.path, request_serializer=method.request.SerializeToString,
                                     response_deserializer=method.response.FromString)

    def call(self, rpc: str, request, timeout_s: float | None = None):
        """Any OIP RPC by name, e.g. call("ServerLive", pb.ServerLiveRequest())."""
        return self._calls[rpc](request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def stream(self, requests, timeout_s: float | None = None):
        """ModelStreamInfer: an iterator of requests in, ModelStreamInferResponse out."""
        return self._calls["ModelStreamInfer"](requests, timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def live(self, timeout_s: float | None = None) -> bool:
        return self.call("ServerLive", pb.ServerLiveRequest(), timeout_s).live

    def ready(self, timeout_s: float | None = None) -> bool:
        return self.call("ServerReady", pb.ServerReadyRequest(), timeout_s).ready

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: str = "", outputs=(),
              parameters: dict | None = None, timeout_s: float | None = None,
              input_parameters: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
        request = build_request(model, inputs, version, outputs, parameters, input_parameters=input_parameters)
        return decode_response(self.call("ModelInfer", request, timeout_s))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
