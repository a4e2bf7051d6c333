"""The agent's local Open Inference Protocol endpoint: apps on the device call the same RPCs, at
the same paths, as they would call the cloud (so one client, tritonclient included, works for
both). The models are the agent's pipelines; a pipeline whose model is not on the device yet is
UNAVAILABLE, one that does not exist NOT_FOUND. Statistics and repository load/unload are
UNIMPLEMENTED: the agent's models come from agent.toml and the cloud.

    server = LocalOipServer(agent, "127.0.0.1", 8011); port = server.start(); ...; server.stop(grace_s=5)

With a token ([serve] token_file), every RPC but gRPC health and reflection needs the metadata
`authorization: Bearer <token>` (compared in constant time), else UNAUTHENTICATED, as the cloud's
port does (cloud_service/auth.py; the layering keeps the device from importing it).

A synchronous gRPC server: handlers (edgefold_proto.serving's table, status codes and tensor
decoding, as in the cloud) run on its thread pool and call the pipeline directly, which costs
less per call than handing work from an event loop to a thread.
"""
import threading
import time
from concurrent import futures

import grpc

from edge_runtime.agent.pipeline import PipelineInputError
from edgefold_proto import METHODS, pb
from edgefold_proto.auth import DRAIN_S, BearerToken
from edgefold_proto.serving import (InvalidArgument, NotFound, Unavailable, Unimplemented, decode_inputs,
                                    encode_response, parameters, parse_message, requested_outputs, rpc_handler,
                                    stream_error)
from edgefold_proto.version import __version__ as AGENT_VERSION

SERVER_NAME = "edgefold-agent"
class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for every call without `authorization: Bearer <token>` (health and
    reflection stay open)."""

    def __init__(self, token: str):
        self._token = BearerToken(token)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or self._token.allows(details.method, details.invocation_metadata):
            return handler
        return _denying(handler)


def _deny(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer <token>' metadata")


def _denying(handler):
    """A handler of the same kind as `handler` that refuses the call."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        def deny_stream(request_iterator, context):
            # read what the client sends first (bounded): ending a stream while its requests are still
            # arriving makes the client's gRPC core report INTERNAL, not UNAUTHENTICATED
            reader = threading.Thread(target=lambda: [None for _ in request_iterator], daemon=True)
            reader.start()
            reader.join(DRAIN_S)
            _deny(None, context)
            yield  # pragma: no cover - makes this a generator
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.response_streaming:
        def deny_server_stream(request, context):
            _deny(request, context)
            yield  # pragma: no cover
        return grpc.unary_stream_rpc_method_handler(deny_server_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_deny, **kwargs)


class LocalOipServer:
    def __init__(self, agent, host: str, port: int, max_workers: int = 8, max_message_bytes: int = 64 << 20,
                 token: str | None = None):
        self.agent = agent
        self.address = f"{host}:{port}"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oip"),
                                   options=[("grpc.max_receive_message_length", max_message_bytes),
                                            ("grpc.max_send_message_length", max_message_bytes),
                                            ("grpc.so_reuseport", 0)],
                                   interceptors=[BearerTokenInterceptor(token)] if token else None)
        self._server.add_generic_rpc_handlers((rpc_handler(METHODS, self),))
        self.port = None

    def start(self) -> int:
        self.port = self._server.add_insecure_port(self.address)
        if not self.port:
            raise OSError(f"cannot listen on {self.address}")
        self._server.start()
        return self.port

    def stop(self, grace_s: float) -> None:
        """New calls are refused at once; in-flight ones get grace_s to finish."""
        self._server.stop(grace_s).wait()

    # --- health and metadata -------------------------------------------------------------------
    def ServerLive(self, request):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request):
        return pb.ServerReadyResponse(ready=self.agent.ready())

    def ModelReady(self, request):
        return pb.ModelReadyResponse(ready=request.name in self.agent.pipelines)

    def ServerMetadata(self, request):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=AGENT_VERSION,
                                         extensions=["parameters", "binary_tensor_data"])

    def ModelMetadata(self, request):
        pipe = self._pipeline(request.name)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=pipe.name, versions=[self.agent.version_of(pipe.name)], platform=pipe.platform,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in pipe.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in pipe.outputs])

    def RepositoryIndex(self, request):
        index = pb.RepositoryIndexResponse.ModelIndex
        models = []
        for spec in self.agent.config.pipelines:
            if spec.name in self.agent.pipelines:
                models.append(index(name=spec.name, version=self.agent.version_of(spec.name), state="READY"))
            elif not request.ready:
                models.append(index(name=spec.name, state="UNAVAILABLE", reason=self.agent.waiting.get(spec.name, "")))
        return pb.RepositoryIndexResponse(models=models)

    def _elsewhere(self, request):
        raise Unimplemented("the agent's models come from agent.toml and the cloud; load and unload them there")

    ModelStatistics = RepositoryModelLoad = RepositoryModelUnload = _elsewhere

    # --- inference -----------------------------------------------------------------------------
    def _pipeline(self, name: str):
        pipe = self.agent.pipelines.get(name)
        if pipe is not None:
            return pipe
        if name in self.agent.waiting:
            raise Unavailable(f"model '{name}' is not ready on this device: {self.agent.waiting[name]}")
        known = ", ".join(s.name for s in self.agent.config.pipelines)
        raise NotFound(f"model '{name}' is not served by this agent (it serves {known})")

    def ModelInfer(self, request):
        pipe = self._pipeline(request.model_name)
        start = time.perf_counter()
        try:
            outputs = pipe.infer(decode_inputs(request), parameters(request.parameters))
            names = requested_outputs(request, list(outputs))
            response = encode_response(request, request.model_version or "1", outputs, names)
        except PipelineInputError as err:
            pipe.counters["failures"] += 1
            raise InvalidArgument(str(err)) from None
        except Exception:
            pipe.counters["failures"] += 1
            raise
        pipe.counters["requests"] += 1
        self.agent.record_latency(time.perf_counter() - start)
        return response

    def ModelStreamInfer(self, requests):
        """Triton's streaming form: errors travel in-band and the stream stays open."""
        for raw in requests:
            try:
                reply = pb.ModelStreamInferResponse(infer_response=self.ModelInfer(parse_message(pb.ModelInferRequest, raw)))
            except Exception as err:
                reply = stream_error(err)
            yield reply
