"""The app SDK: open a client to a device's deploy agent or to the cloud (the same Open Inference
Protocol, so the same code), infer, close.

    from edge_runtime.client import sdk

    with sdk.connect("127.0.0.1:8011") as client:                       # the agent on this device
        y = client.infer("mlp", {"x": x})["y"]                          # x: (1, 16) float32

    async with sdk.connect_async("127.0.0.1:8001", token_file="token") as client:   # the cloud
        y = (await client.infer("mlp", {"x": x}))["y"]

Nothing is sent when connecting: an unreachable server shows up as `sdk.Unavailable` from the
first call. Every call has a deadline (`timeout_s` of the client, or of the call). Failures raise
the typed errors of errors.py beside this file (EdgefoldError and its subclasses, all grpc.RpcError
with `code()` and `details()`); a token, token file or certificate that cannot be read raises
ValueError or OSError from connect().
"""
from pathlib import Path

import grpc
import numpy as np

from edge_runtime.client.errors import (DeadlineExceeded, EdgefoldError, FailedPrecondition, InvalidInput,
                                        NotFound, ResourceExhausted, ServerError, Unauthenticated, Unavailable,
                                        from_rpc_error)
from edge_runtime.client.oip_client import (DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT_S, ModelMetadata,
                                            OipClient, TensorSpec, auth_headers, build_request, channel_options,
                                            decode_response, routing_headers)
from edgefold_proto import BIDI_STREAMING, METHODS, pb

Client = OipClient      # the synchronous client


def _credentials(token: str | None, token_file, tls_ca) -> tuple[str | None, bytes | None]:
    if token and token_file:
        raise ValueError("pass token or token_file, not both")
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
    if tls_ca is None or isinstance(tls_ca, bytes):
        return token, tls_ca
    return token, Path(tls_ca).read_bytes()


def connect(target: str, *, token: str | None = None, token_file: str | Path | None = None,
            tls_ca: str | Path | bytes | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Client:
    """A synchronous client for `target` ("host:port"). `token` or `token_file`: the bearer token;
    `tls_ca`: PEM root certificate(s), a path or bytes, for a TLS server (plaintext without it)."""
    token, certs = _credentials(token, token_file, tls_ca)
    return Client(target, token=token, root_certificates=certs, timeout_s=timeout_s)


def connect_async(target: str, *, token: str | None = None, token_file: str | Path | None = None,
                  tls_ca: str | Path | bytes | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> "AsyncClient":
    """The asyncio variant of connect(); use it with `async with` or await its close()."""
    token, certs = _credentials(token, token_file, tls_ca)
    return AsyncClient(target, token=token, root_certificates=certs, timeout_s=timeout_s)


class AsyncClient:
    """The asyncio twin of Client on grpc.aio: the same methods, awaited (stream() is an async
    generator). The channel opens on the first call, in the event loop that makes it; use one
    client per event loop."""

    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.target, self.timeout_s, self.headers = target, timeout_s, auth_headers(token)
        self._certs, self._options = root_certificates, channel_options(max_message_bytes)
        self._channel, self._calls = None, {}

    def _rpc(self, name: str):
        if self._channel is None:
            if self._certs is not None:
                creds = grpc.ssl_channel_credentials(self._certs)
                self._channel = grpc.aio.secure_channel(self.target, creds, self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, self._options)
            for rpc, method in METHODS.items():
                make = self._channel.stream_stream if method.kind == BIDI_STREAMING else self._channel.unary_unary
                self._calls[rpc] = make(method.path, request_serializer=method.request.SerializeToString,
                                        response_deserializer=method.response.FromString)
        return self._calls[name]

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    async def call(self, rpc: str, request, timeout_s: float | None = None):
        """Any unary OIP RPC by name, e.g. await call("ServerLive", pb.ServerLiveRequest())."""
        try:
            return await self._rpc(rpc)(request, timeout=self._timeout(timeout_s),
                                        metadata=self.headers + routing_headers(request))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def stream(self, requests, timeout_s: float | None = None):
        """ModelStreamInfer: requests (an iterable or async iterable) in, ModelStreamInferResponse out."""
        call = self._rpc("ModelStreamInfer")(requests, timeout=self._timeout(timeout_s), metadata=self.headers)
        try:
            async for reply in call:
                yield reply
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def live(self, timeout_s: float | None = None) -> bool:
        return (await self.call("ServerLive", pb.ServerLiveRequest(), timeout_s)).live

    async def ready(self, timeout_s: float | None = None) -> bool:
        return (await self.call("ServerReady", pb.ServerReadyRequest(), timeout_s)).ready

    async def model_ready(self, model: str, version: str = "", timeout_s: float | None = None) -> bool:
        return (await self.call("ModelReady", pb.ModelReadyRequest(name=model, version=version), timeout_s)).ready

    async def metadata(self, model: str, version: str = "", timeout_s: float | None = None) -> ModelMetadata:
        reply = await self.call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version), timeout_s)
        return ModelMetadata.from_pb(reply)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], version: str = "", outputs=(),
                    parameters: dict | None = None, timeout_s: float | None = None,
                    input_parameters: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
        request = build_request(model, inputs, version, outputs, parameters, input_parameters=input_parameters)
        return decode_response(await self.call("ModelInfer", request, timeout_s))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._calls = None, {}

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


__all__ = ["connect", "connect_async", "Client", "AsyncClient", "ModelMetadata", "TensorSpec", "EdgefoldError",
           "InvalidInput", "Unauthenticated", "Unavailable", "DeadlineExceeded", "NotFound", "ResourceExhausted",
           "FailedPrecondition", "ServerError", "from_rpc_error", "DEFAULT_TIMEOUT_S"]
