"""The Open Inference Protocol RPCs, served at `/inference.GRPCInferenceService/<Rpc>`."""
import asyncio
import logging
import time

from cloud_service.config import ConfigError
from cloud_service.decoupled import stream_decoupled
from cloud_service.metrics import Metrics
from cloud_service.repository import DEVICE_PACKAGE, Repository
from cloud_service.request import model_inputs
from cloud_service.sessions import sequence_params
from edgefold_proto import pb
from edgefold_proto.serving import (InvalidArgument, NotFound, ServiceError, Unimplemented, encode_response,
                                    parse_message, requested_outputs, stream_error)
from edgefold_proto.version import __version__ as SERVER_VERSION

log = logging.getLogger(__name__)
SERVER_NAME = "edgefold"
EXTENSIONS = ["model_repository", "statistics", "sequence", "parameters", "binary_tensor_data"]


class InferenceService:
    """The servicer of edgefold_proto.METHODS (served through edgefold_proto.serving.rpc_handler)."""

    def __init__(self, repository: Repository, metrics: Metrics):
        self.repository, self.metrics = repository, metrics
        self.ready = False
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._metric_children: dict = {}

    # --- health and metadata -------------------------------------------------------------
    async def ServerLive(self, request):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request):
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request):
        try:
            self.repository.get(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request):
        model = self.repository.get(request.name, request.version)
        batch = [-1] if model.config.max_batch_size > 0 else []

        def tensors(specs):
            return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=batch + list(s.dims))
                    for s in specs]
        return pb.ModelMetadataResponse(
            name=model.name, versions=sorted(self.repository.models[model.name], key=int),
            platform=model.backend.platform, inputs=tensors(model.config.inputs), outputs=tensors(model.config.outputs))

    # --- inference -----------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        model = self.repository.get(request.model_name, request.model_version)
        if model.config.decoupled:
            raise Unimplemented(f"model '{model.name}' is decoupled (it sends a response per generated token): "
                                "call ModelStreamInfer")
        metric = self._metrics_for(model)
        try:
            seq = sequence_params(request.parameters)
            inputs = model_inputs(request, model.config)
            names = requested_outputs(request, [spec.name for spec in model.config.outputs])
            outputs, timing = await model.infer(inputs, seq)
            response = encode_response(request, model.version, outputs, names)
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

    async def ModelStreamInfer(self, requests):
        """Triton's streaming form: errors travel in-band and the stream stays open. A request for an
        ordinary model gets exactly one response, in arrival order; one for a decoupled model
        (Triton's decoupled transaction policy) runs beside the others and gets a response per
        item it produces, each with the parameter `triton_final_response` (true on its last one;
        with `triton_enable_empty_final_response` the last is an empty response of its own)."""
        replies: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()
        done = object()

        async def read() -> None:
            try:
                async for raw in requests:
                    try:
                        request = parse_message(pb.ModelInferRequest, raw)
                        model = self.repository.get(request.model_name, request.model_version)
                        if model.config.decoupled:
                            task = asyncio.create_task(stream_decoupled(request, model, self._metrics_for(model),
                                                                     replies.put_nowait))
                            running.add(task)
                            task.add_done_callback(running.discard)
                            continue
                        reply = pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(request))
                    except Exception as err:
                        reply = stream_error(err)
                    replies.put_nowait(reply)
                if running:   # the client has sent everything: answer what still runs, then end
                    await asyncio.gather(*running)
            finally:
                replies.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not done:
                yield reply
            await reader   # a broken request stream ends the call with its error
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    def _metrics_for(self, model):
        key = (model.name, model.version)
        children = self._metric_children.get(key)
        if children is None:
            children = self._metric_children[key] = self.metrics.bound(model.name, model.version)
        return children

    # --- statistics and repository -------------------------------------------------------
    async def ModelStatistics(self, request):
        if request.name:
            models = [self.repository.get(request.name, request.version)] if request.version else \
                list(self._versions_of(request.name))
        else:
            models = [m for versions in self.repository.models.values() for m in versions.values()]
        return pb.ModelStatisticsResponse(model_stats=[m.stats.to_pb(m.name, m.version) for m in models])

    def _versions_of(self, name):
        self.repository.get(name)  # NOT_FOUND if absent
        return self.repository.models[name].values()

    async def RepositoryIndex(self, request):
        entries = [e for e in self.repository.index() if e.state == "READY" or not request.ready]
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries])

    async def RepositoryModelLoad(self, request):
        await self.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request):
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

