"""The serving core shared by the cloud's OIP and Fleet services and the agent's local OIP server:
one handler table built from a Method list, one mapping from errors to gRPC status codes, one
ModelInferRequest decoder and one ModelInferResponse encoder.

    server.add_generic_rpc_handlers((rpc_handler(METHODS, servicer, aio=True),))

A servicer has a method per RPC, named like it: it takes the parsed request (a bidi-streaming
one: the iterator of raw request bytes, so it can answer a bad message in-band) and returns the
response, or yields them for a streaming RPC; coroutines and async generators when `aio`.
ServiceError and its subclasses become their status code and message; anything else is
INTERNAL and logged. Requests arrive as bytes and are parsed here, so a malformed message is
INVALID_ARGUMENT (gRPC's own deserializer would make it UNKNOWN).
"""
import contextlib
import logging

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from edgefold_proto import BIDI_STREAMING, SERVER_STREAMING, UNARY, pb
from edgefold_proto.tensors import TensorError, datatype_of, from_contents, from_raw, to_raw

log = logging.getLogger(__name__)


# --- errors --------------------------------------------------------------------------------
class ServiceError(Exception):
    """An error the client is told about, with its status code; the message says what to fix."""
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


def status_of(err: Exception, rpc: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call ends with; an unexpected error is logged."""
    if isinstance(err, ServiceError):
        return err.code, err.message
    log.error("%s failed", rpc, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"


def stream_error(err: Exception) -> pb.ModelStreamInferResponse:
    """ModelStreamInfer's answer to a failed request: the error travels in-band, the stream stays open."""
    message = status_of(err, "ModelStreamInfer")[1]
    return pb.ModelStreamInferResponse(error_message=message if isinstance(err, ServiceError) else
                                       f"internal error: {message}")


def parse_message(message_type, raw: bytes):
    """A request's raw bytes as `message_type`; a malformed message is INVALID_ARGUMENT."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(f"the request is not a valid {message_type.DESCRIPTOR.name} protobuf message") from None


# --- the handler table ---------------------------------------------------------------------
_METHOD_HANDLER = {UNARY: grpc.unary_unary_rpc_method_handler, SERVER_STREAMING: grpc.unary_stream_rpc_method_handler,
                   BIDI_STREAMING: grpc.stream_stream_rpc_method_handler}


def rpc_handler(methods: dict, servicer, aio: bool = False) -> grpc.GenericRpcHandler:
    """The handlers of `methods` (Method by name, all of one service), served by `servicer`."""
    (service,) = {m.service for m in methods.values()}
    wrap = _async if aio else _sync
    return grpc.method_handlers_generic_handler(service, {
        m.name: _METHOD_HANDLER[m.kind](
            wrap(m, getattr(servicer, m.name)), response_serializer=m.response.SerializeToString)
        for m in methods.values()})


def _sync(method, call):
    def unary(raw, context):
        try:
            return call(parse_message(method.request, raw))
        except Exception as err:
            context.abort(*status_of(err, method.name))

    def streaming(request, context):
        try:
            yield from call(request if method.kind == BIDI_STREAMING else parse_message(method.request, request))
        except Exception as err:
            context.abort(*status_of(err, method.name))
    return unary if method.kind == UNARY else streaming


def _async(method, call):
    async def unary(raw, context):
        try:
            return await call(parse_message(method.request, raw))
        except Exception as err:
            await context.abort(*status_of(err, method.name))

    async def streaming(request, context):
        try:
            arg = request if method.kind == BIDI_STREAMING else parse_message(method.request, request)
            async with contextlib.aclosing(call(arg)) as replies:
                async for reply in replies:
                    yield reply
        except Exception as err:
            await context.abort(*status_of(err, method.name))
    return unary if method.kind == UNARY else streaming


# --- ModelInferRequest in, ModelInferResponse out ------------------------------------------
def input_tensors(request: pb.ModelInferRequest):
    """(tensor, its raw bytes or None when it carries typed contents) of each input, in order;
    INVALID_ARGUMENT when the raw buffers do not pair with the inputs or an input comes twice."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                              "send one raw buffer per input, in input order")
    seen = set()
    for i, tensor in enumerate(request.inputs):
        if tensor.name in seen:
            raise InvalidArgument(f"input '{tensor.name}' is given twice")
        seen.add(tensor.name)
        yield tensor, (raw[i] if raw else None)


def decode_tensor(tensor, raw: bytes | None) -> np.ndarray:
    """One input as a numpy array; INVALID_ARGUMENT names the tensor and what does not match."""
    try:
        if raw is None:
            return from_contents(tensor.name, tensor.datatype, tensor.shape, tensor.contents)
        return from_raw(tensor.name, tensor.datatype, tensor.shape, raw)
    except TensorError as err:
        raise InvalidArgument(str(err)) from None


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    return {tensor.name: decode_tensor(tensor, raw) for tensor, raw in input_tensors(request)}


def parameters(params) -> dict:
    """A `parameters` map as Python values (parameters with no value set are left out)."""
    return {key: getattr(value, value.WhichOneof("parameter_choice"))
            for key, value in params.items() if value.WhichOneof("parameter_choice")}


def requested_outputs(request: pb.ModelInferRequest, names: list[str]) -> list[str]:
    """The outputs a request asks for, all of `names` when it names none; INVALID_ARGUMENT names unknown ones."""
    if not request.outputs:
        return list(names)
    wanted = [out.name for out in request.outputs]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise InvalidArgument(f"requested output(s) {unknown} not produced by model '{request.model_name}'; "
                              f"it has {', '.join(names)}")
    return wanted


def encode_response(request: pb.ModelInferRequest, version: str, outputs: dict, names: list[str]) -> pb.ModelInferResponse:
    """The `names` outputs as raw_output_contents (row-major, little-endian)."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    for name in names:
        array = np.asarray(outputs[name])
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(to_raw(array))
    return response
