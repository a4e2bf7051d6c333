"""A small synchronous Open Inference Protocol client (no tritonclient needed), used across the
project and re-exported by the app SDK (`edge_runtime.client.sdk.Client`).

Every call has a deadline (`timeout_s`, per client or per call). Every failure raises a typed
error from edge_runtime.client.errors (a grpc.RpcError subclass), so callers tell a down server
(Unavailable), a late one (DeadlineExceeded) and a bad request (InvalidInput) apart.

    with OipClient("127.0.0.1:8001") as client:
        outputs = client.infer("mlp", {"x": np.zeros((1, 16), np.float32)})   # {"y": (1, 4) float32}
        client.metadata("mlp").inputs[0]      # TensorSpec(name='x', datatype='FP32', shape=(-1, 16))
"""
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import grpc
import numpy as np

from edge_runtime.client.errors import InvalidInput, ServerError, from_rpc_error
from edgefold_proto import BIDI_STREAMING, METHODS, pb
from edgefold_proto.tensors import TensorError, datatype_of, from_contents, from_raw, to_raw

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str               # OIP datatype: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]      # -1 marks a variable dimension (the batch, for batching models)


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str               # e.g. onnxruntime_onnx, pytorch_libtorch
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_pb(cls, reply: pb.ModelMetadataResponse) -> "ModelMetadata":
        def specs(tensors):
            return tuple(TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in tensors)
        return cls(reply.name, tuple(reply.versions), reply.platform, specs(reply.inputs), specs(reply.outputs))


def _param(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def _encode(name, value) -> tuple[np.ndarray, str, bytes]:
    """(array, datatype, raw bytes) of one input; InvalidInput naming the tensor if it cannot be sent."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"input name {name!r}: expected a non-empty str")
    try:
        array = np.asarray(value)
        datatype = datatype_of(array)
        if datatype == "BYTES":
            for i, item in enumerate(array.reshape(-1)):
                if not isinstance(item, (str, bytes, bytearray)):
                    raise TensorError(f"element {i} is {type(item).__name__}; a BYTES tensor holds str or bytes")
        return array, datatype, to_raw(array)
    except (TensorError, TypeError, ValueError) as err:
        raise InvalidInput(f"input '{name}': {err}") from None


def build_request(model: str, inputs: dict[str, np.ndarray], version: str = "", outputs=(),
                  parameters: dict | None = None, request_id: str = "",
                  input_parameters: dict[str, dict] | None = None) -> pb.ModelInferRequest:
    """`input_parameters[name]` become that tensor's parameters (e.g. a codec's scale and zero point).
    Raises InvalidInput, before anything is sent, for an input that has no OIP form."""
    if not isinstance(inputs, Mapping):
        raise InvalidInput(f"inputs: expected a dict of name -> array, got {type(inputs).__name__}")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(_param(value))
    for name, value in inputs.items():
        array, datatype, raw = _encode(name, value)
        tensor = request.inputs.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        for key, param in (input_parameters or {}).get(name, {}).items():
            tensor.parameters[key].CopyFrom(_param(param))
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs by name, from raw_output_contents or (servers that send them) typed contents."""
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise ServerError(f"malformed reply: {len(raw)} raw_output_contents for {len(response.outputs)} outputs",
                          grpc.StatusCode.DATA_LOSS)
    try:
        return {out.name: from_raw(out.name, out.datatype, list(out.shape), raw[i]) if raw else
                from_contents(out.name, out.datatype, list(out.shape), out.contents)
                for i, out in enumerate(response.outputs)}
    except TensorError as err:
        raise ServerError(f"malformed reply: {err}", grpc.StatusCode.DATA_LOSS) from None


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def auth_headers(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


SEQUENCE_HEADER = "x-sequence-id"


def routing_headers(request) -> tuple[tuple[str, str], ...]:
    """A stateful request's sequence id, also as gRPC metadata: a load balancer in front of several
    replicas (scripts/cloud_cluster.py) hashes on it, so every request of a session reaches the
    replica that holds its state. Parameters inside the message are out of a balancer's sight."""
    param = request.parameters.get("sequence_id") if isinstance(request, pb.ModelInferRequest) else None
    if param is None:
        return ()
    value = getattr(param, param.WhichOneof("parameter_choice") or "string_param")
    return ((SEQUENCE_HEADER, quote(str(value), safe="")),)   # metadata values are printable ASCII


class ResponseStream:
    """The replies of a ModelStreamInfer call; iterating raises the typed errors, cancel() ends it."""

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self) -> pb.ModelStreamInferResponse:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def cancel(self) -> None:
        self._call.cancel()


def channel_credentials(root_certificates: bytes | None, certificate_chain: bytes | None = None,
                        private_key: bytes | None = None):
    """gRPC channel credentials for TLS (None: plaintext); a client certificate needs its key and a root."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (the client certificate and its key)")
    if root_certificates is None:
        if certificate_chain is not None:
            raise ValueError("a client certificate needs TLS: give root_certificates (the cloud's CA) too")
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class OipClient:
    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None):
        """TLS with `root_certificates` (the server's CA, PEM); `certificate_chain` and `private_key`
        (PEM, together) present a client certificate (a device's, to a cloud with --tls-client-ca)."""
        options = channel_options(max_message_bytes)
        credentials = channel_credentials(root_certificates, certificate_chain, private_key)
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.target = target
        self.headers = auth_headers(token)
        self.timeout_s = timeout_s
        self._calls = {}
        for name, method in METHODS.items():
            make = self.channel.stream_stream if method.kind == BIDI_STREAMING else self.channel.unary_unary
            self._calls[name] = make(method.path, request_serializer=method.request.SerializeToString,
                                     response_deserializer=method.response.FromString)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def call(self, rpc: str, request, timeout_s: float | None = None):
        """Any unary OIP RPC by name, e.g. call("ServerLive", pb.ServerLiveRequest())."""
        try:
            return self._calls[rpc](request, timeout=self._timeout(timeout_s),
                                    metadata=self.headers + routing_headers(request))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, requests, timeout_s: float | None = None) -> ResponseStream:
        """ModelStreamInfer: an iterator of requests in, ModelStreamInferResponse out. Errors of a
        single request come back in-band (`error_message`); the deadline covers the whole stream."""
        return ResponseStream(self._calls["ModelStreamInfer"](requests, timeout=self._timeout(timeout_s),
                                                              metadata=self.headers))

    def live(self, timeout_s: float | None = None) -> bool:
        return self.call("ServerLive", pb.ServerLiveRequest(), timeout_s).live

    def ready(self, timeout_s: float | None = None) -> bool:
        return self.call("ServerReady", pb.ServerReadyRequest(), timeout_s).ready

    def model_ready(self, model: str, version: str = "", timeout_s: float | None = None) -> bool:
        return self.call("ModelReady", pb.ModelReadyRequest(name=model, version=version), timeout_s).ready

    def metadata(self, model: str, version: str = "", timeout_s: float | None = None) -> ModelMetadata:
        reply = self.call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version), timeout_s)
        return ModelMetadata.from_pb(reply)

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
