"""The Open Inference Protocol RPCs, served at `/inference.GRPCInferenceService/<Rpc>`."""
import asyncio
import functools
import logging
import time

import grpc

from cloud_service.config import ConfigError
from cloud_service.errors import InvalidArgument, NotFound, ServiceError
from cloud_service.metrics import Metrics
from cloud_service.repository import DEVICE_PACKAGE, Repository
from cloud_service.request import decode_inputs, encode_response, parse_message, requested_outputs
from cloud_service.sessions import sequence_params
from edgefold_proto import BIDI_STREAMING, METHODS, SERVICE, pb

log = logging.getLogger(__name__)
SERVER_NAME = "edgefold"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "statistics", "sequence", "parameters", "binary_tensor_data"]


def _rpc(method):
    """Map ServiceError to its status code; anything unexpected is INTERNAL and logged."""
    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except ServiceError as err:
            await context.abort(err.code, err.message)
        except Exception as err:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
    return handler


class InferenceService:
    def __init__(self, repository: Repository, metrics: Metrics):
        self.repository, self.metrics = repository, metrics
        self.ready = False
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._metric_children: dict = {}

    # --- health and metadata -------------------------------------------------------------
    @_rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    @_rpc
    async def ModelReady(self, request, context):
        try:
            self.repository.get(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.ready)

    @_rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request, context):
        model = self.repository.get(request.name, request.version)
        batch = [-1] if model.config.max_batch_size > 0 else []

        def tensors(specs):
            return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=batch + list(s.dims))
                    for s in specs]
        return pb.ModelMetadataResponse(
            name=model.name, versions=sorted(self.repository.models[model.name], key=int),
            platform=model.backend.platform, inputs=tensors(model.config.inputs), outputs=tensors(model.config.outputs))

    # --- inference -----------------------------------------------------------------------
    @_rpc
    async def ModelInfer(self, request, context):
        return await self._infer(request)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming form: errors travel in-band and the stream stays open."""
        async for raw in request_iterator:
            try:
                response = await self._infer(parse_message(pb.ModelInferRequest, raw))
            except ServiceError as err:
                yield pb.ModelStreamInferResponse(error_message=err.message)
                continue
            except Exception as err:
                log.exception("stream inference failed")
                yield pb.ModelStreamInferResponse(error_message=f"internal error: {type(err).__name__}: {err}")
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        model = self.repository.get(request.model_name, request.model_version)
        metric = self._metrics_for(model)
        try:
            seq = sequence_params(request.parameters)
            inputs = decode_inputs(request, model.config.inputs, model.config.max_batch_size)
            names = requested_outputs(request, model.config.outputs)
            outputs, timing = await model.infer(inputs, seq)
            response = encode_response(request, model.name, model.version, outputs, names)
        except Exception:
            model.stats.request_done(False, time.perf_counter_ns() - start)
            metric.failure.inc()
            raise
        model.stats.request_done(True, time.perf_counter_ns() - start, timing.queue_ns)
        metric.success.inc()
        metric.queue.observe(timing.queue_ns / 1e9)
        metric.compute.observe(timing.compute_ns / 1e9)
        metric.batch.observe(timing.batch_size)
        metric.bytes_in.inc(sum(map(len, request.raw_input_contents)))
        metric.bytes_out.inc(sum(map(len, response.raw_output_contents)))
        return response

    def _metrics_for(self, model):
        key = (model.name, model.version)
        children = self._metric_children.get(key)
        if children is None:
            children = self._metric_children[key] = self.metrics.bound(model.name, model.version)
        return children

    # --- statistics and repository -------------------------------------------------------
    @_rpc
    async def ModelStatistics(self, request, context):
        if request.name:
            models = [self.repository.get(request.name, request.version)] if request.version else \
                list(self._versions_of(request.name))
        else:
            models = [m for versions in self.repository.models.values() for m in versions.values()]
        return pb.ModelStatisticsResponse(model_stats=[m.stats.to_pb(m.name, m.version) for m in models])

    def _versions_of(self, name):
        self.repository.get(name)  # NOT_FOUND if absent
        return self.repository.models[name].values()

    @_rpc
    async def RepositoryIndex(self, request, context):
        entries = [e for e in self.repository.index() if e.state == "READY" or not request.ready]
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries])

    @_rpc
    async def RepositoryModelLoad(self, request, context):
        await self.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request, context):
        async with self._lock_for(request.model_name):
            old = self.repository.remove(request.model_name)
        await self._close(old)
        return pb.RepositoryModelUnloadResponse()

    def _lock_for(self, name: str) -> asyncio.Lock:
        self.repository.model_dir(name)  # validates the name
        return self._load_locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> None:
        """(Re)load every version of `name`, off the event loop; the old ones serve until the swap.
        A device package loads nothing (any served versions are released) and is not an error."""
        async with self._lock_for(name):
            try:
                versions = await asyncio.to_thread(self.repository.build, name)
            except (ConfigError, OSError) as err:
                self.repository.failures[name] = str(err)
                raise InvalidArgument(f"failed to load '{name}': {err}") from None
            for model in versions.values():
                model.start()
            old = self.repository.swap_in(name, versions)
        await self._close(old)
        if versions:
            log.info("loaded model %s versions %s", name, ", ".join(versions))
        else:
            log.info("model %s is a %s", name, DEVICE_PACKAGE)

    async def load_all(self) -> None:
        for name in self.repository.available():
            try:
                await self.load(name)
            except ServiceError as err:
                log.error("%s", err.message)

    async def _close(self, models) -> None:
        for model in models:
            await model.close()

    def sweep_sessions(self) -> None:
        """Expire idle sessions and publish what sessions hold (called periodically)."""
        for versions in list(self.repository.models.values()):
            for model in versions.values():
                if model.sessions is not None:
                    model.sessions.expire_idle()
                    children = self._metrics_for(model)
                    children.sessions.set(len(model.sessions))
                    children.session_bytes.set(model.sessions.total_bytes)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Handlers take raw bytes and parse them themselves, so a malformed message is
        INVALID_ARGUMENT (gRPC's own deserializer would make it UNKNOWN)."""
        handlers = {}
        for name, method in METHODS.items():
            if method.kind == BIDI_STREAMING:
                handlers[name] = grpc.stream_stream_rpc_method_handler(
                    getattr(self, name), response_serializer=method.response.SerializeToString)
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    _parsing(method.request, getattr(self, name)), response_serializer=method.response.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _parsing(message_type, handler):
    async def parse_then_handle(raw, context):
        try:
            request = parse_message(message_type, raw)
        except InvalidArgument as err:
            await context.abort(err.code, err.message)
        return await handler(request, context)
    return parse_then_handle
