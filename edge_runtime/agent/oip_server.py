"""The agent's local Open Inference Protocol endpoint: apps on the device call the same RPCs, at
the same paths, as they would call the cloud (so one client, tritonclient included, works for
both). The models are the agent's pipelines; a pipeline whose model is not on the device yet is
UNAVAILABLE, one that does not exist NOT_FOUND. Repository load/unload is UNIMPLEMENTED: the
agent's models come from agent.toml and the cloud.

    server = LocalOipServer(agent, "127.0.0.1", 8011); port = server.start(); ...; server.stop(grace_s=5)

A synchronous gRPC server: handlers run on its thread pool and call the pipeline directly, which
costs less per call than handing work from an event loop to a thread.
"""
import logging
import time
from concurrent import futures

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from edge_runtime.agent.pipelines import PipelineInputError
from edgefold_proto import BIDI_STREAMING, METHODS, SERVICE, pb
from edgefold_proto.tensors import TensorError, datatype_of, from_contents, from_raw, to_raw

log = logging.getLogger(__name__)
SERVER_NAME = "edgefold-agent"


class RpcFailure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _param_value(p: pb.InferParameter):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def decode_request(request: pb.ModelInferRequest) -> tuple[dict, dict]:
    """Inputs as numpy arrays and parameters as Python values; TensorError names a bad tensor."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise TensorError(f"input '{tensor.name}' appears twice")
        inputs[tensor.name] = (from_raw(tensor.name, tensor.datatype, tensor.shape, raw[i]) if raw else
                               from_contents(tensor.name, tensor.datatype, tensor.shape, tensor.contents))
    return inputs, {key: _param_value(value) for key, value in request.parameters.items()}


def encode_response(request: pb.ModelInferRequest, outputs: dict) -> pb.ModelInferResponse:
    wanted = [o.name for o in request.outputs] or list(outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise TensorError(f"requested output(s) {', '.join(unknown)} not produced; outputs: {', '.join(outputs)}")
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version or "1",
                                     id=request.id)
    for name in wanted:
        value = np.asarray(outputs[name])
        tensor = response.outputs.add(name=name, datatype=datatype_of(value))
        tensor.shape.extend(value.shape)
        response.raw_output_contents.append(to_raw(value))
    return response


class LocalOipServer:
    def __init__(self, agent, host: str, port: int, max_workers: int = 8, max_message_bytes: int = 64 << 20):
        self.agent = agent
        self.address = f"{host}:{port}"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oip"),
                                   options=[("grpc.max_receive_message_length", max_message_bytes),
                                            ("grpc.max_send_message_length", max_message_bytes),
                                            ("grpc.so_reuseport", 0)])
        handlers = {}
        for name, method in METHODS.items():
            if method.kind == BIDI_STREAMING:
                handlers[name] = grpc.stream_stream_rpc_method_handler(
                    self.ModelStreamInfer, response_serializer=method.response.SerializeToString)
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(method.request, getattr(self, name, None), name),
                    response_serializer=method.response.SerializeToString)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
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

    def _unary(self, message_type, handler, name: str):
        def handle(raw: bytes, context):
            if handler is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: the agent's models come from agent.toml "
                              "and the cloud; load and unload them there")
            try:
                request = message_type.FromString(raw)
            except DecodeError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid "
                              f"{message_type.DESCRIPTOR.name} protobuf message")
            try:
                return handler(request)
            except RpcFailure as err:
                context.abort(err.code, err.message)
            except Exception as err:
                log.exception("%s failed", name)
                context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        return handle

    # --- health and metadata -------------------------------------------------------------------
    def ServerLive(self, request):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request):
        return pb.ServerReadyResponse(ready=self.agent.ready())

    def ModelReady(self, request):
        return pb.ModelReadyResponse(ready=request.name in self.agent.pipelines)

    def ServerMetadata(self, request):
        from edge_runtime.agent.agent import AGENT_VERSION
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

    # --- inference -----------------------------------------------------------------------------
    def _pipeline(self, name: str):
        pipe = self.agent.pipelines.get(name)
        if pipe is not None:
            return pipe
        if name in self.agent.waiting:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"model '{name}' is not ready on this device: "
                             f"{self.agent.waiting[name]}")
        known = ", ".join(s.name for s in self.agent.config.pipelines)
        raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"model '{name}' is not served by this agent (it serves {known})")

    def ModelInfer(self, request):
        pipe = self._pipeline(request.model_name)
        start = time.perf_counter()
        try:
            inputs, params = decode_request(request)
            response = encode_response(request, pipe.infer(inputs, params))
        except (TensorError, PipelineInputError) as err:
            pipe.counters["failures"] += 1
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except Exception:
            pipe.counters["failures"] += 1
            raise
        pipe.counters["requests"] += 1
        self.agent.record_latency(time.perf_counter() - start)
        return response

    def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming form: errors travel in-band and the stream stays open."""
        for raw in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self.ModelInfer(pb.ModelInferRequest.FromString(raw)))
            except RpcFailure as err:
                yield pb.ModelStreamInferResponse(error_message=err.message)
            except DecodeError:
                yield pb.ModelStreamInferResponse(error_message="the request is not a valid ModelInferRequest")
            except Exception as err:
                log.exception("stream inference failed")
                yield pb.ModelStreamInferResponse(error_message=f"internal error: {type(err).__name__}: {err}")
