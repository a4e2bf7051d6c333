"""Bearer-token authentication for every inference RPC; health and reflection stay open
so load balancers and probes work without the secret."""
import asyncio

import grpc

from edgefold_proto.auth import DRAIN_S, BearerToken, read_token

__all__ = ["BearerTokenInterceptor", "read_token"]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._token = BearerToken(token)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self._token.allows(details.method, details.invocation_metadata):
            return handler
        return _denying(handler)


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer <token>' metadata")


async def _drain(request_iterator) -> None:
    async for _ in request_iterator:
        pass


def _denying(handler):
    """A handler of the same kind as `handler` that refuses the call."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        async def deny_stream(request_iterator, context):
            # Let the client finish sending first (bounded): ending a stream while its requests are
            # still arriving makes the client's gRPC core report INTERNAL, not UNAUTHENTICATED.
            try:
                await asyncio.wait_for(_drain(request_iterator), DRAIN_S)
            except asyncio.TimeoutError:
                pass
            await _deny(None, context)
            yield  # pragma: no cover - makes this an async generator
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.response_streaming:
        async def deny_server_stream(request, context):
            await _deny(request, context)
            yield  # pragma: no cover
        return grpc.unary_stream_rpc_method_handler(deny_server_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_deny, **kwargs)
