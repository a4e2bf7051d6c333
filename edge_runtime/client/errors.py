"""Typed errors of an Open Inference Protocol call: one class per thing an app handles differently.

    from edge_runtime.client import sdk
    try:
        y = client.infer("mlp", {"x": x})["y"]
    except sdk.Unavailable:                 # down or unreachable: answer on the device
        y = local_model(x)
    except sdk.InvalidInput as err:         # a bug in the request: retrying will not help
        print(err.code().name, err.details())

Every error is also a `grpc.RpcError` with grpc's own `code()` (a grpc.StatusCode) and `details()`
(the server's message) methods, so code written against plain grpc keeps working. `cause` is the
grpc error it came from, or None when the client refused the request before sending it.

    code                                   class
    INVALID_ARGUMENT, OUT_OF_RANGE         InvalidInput (also a ValueError)
    UNAUTHENTICATED, PERMISSION_DENIED     Unauthenticated
    UNAVAILABLE                            Unavailable
    DEADLINE_EXCEEDED                      DeadlineExceeded
    NOT_FOUND                              NotFound
    RESOURCE_EXHAUSTED                     ResourceExhausted
    FAILED_PRECONDITION                    FailedPrecondition
    anything else (INTERNAL, CANCELLED..)  ServerError
"""
import grpc

_CODE = grpc.StatusCode


class EdgefoldError(grpc.RpcError):
    """Base class; `code()` -> grpc.StatusCode, `details()` -> str, `cause` -> grpc.RpcError | None."""
    default_code = _CODE.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None, cause: grpc.RpcError | None = None):
        super().__init__(details)
        self._details = details
        self._code = code or self.default_code
        self.cause = cause

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        method = getattr(self.cause, "trailing_metadata", None)
        return method() if callable(method) else ()

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class InvalidInput(EdgefoldError, ValueError):
    """The request is wrong (tensor name, shape, datatype, bytes, parameters); fix it, do not retry."""
    default_code = _CODE.INVALID_ARGUMENT


class Unauthenticated(EdgefoldError):
    """Missing or wrong bearer token, or a token without permission."""
    default_code = _CODE.UNAUTHENTICATED


class Unavailable(EdgefoldError):
    """The server is down, unreachable, or not serving yet; worth a retry later or a local answer."""
    default_code = _CODE.UNAVAILABLE


class DeadlineExceeded(EdgefoldError):
    """No answer within the call's deadline (`timeout_s`)."""
    default_code = _CODE.DEADLINE_EXCEEDED


class NotFound(EdgefoldError):
    """No such model (or version) on the server."""
    default_code = _CODE.NOT_FOUND


class ResourceExhausted(EdgefoldError):
    """A message over the size limit, or the server is out of capacity (queue, memory, sessions)."""
    default_code = _CODE.RESOURCE_EXHAUSTED


class FailedPrecondition(EdgefoldError):
    """The server's state does not allow the call (e.g. an unknown or expired sequence)."""
    default_code = _CODE.FAILED_PRECONDITION


class ServerError(EdgefoldError):
    """Any other status: INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED, ..."""
    default_code = _CODE.INTERNAL


_BY_CODE = {
    _CODE.INVALID_ARGUMENT: InvalidInput, _CODE.OUT_OF_RANGE: InvalidInput,
    _CODE.UNAUTHENTICATED: Unauthenticated, _CODE.PERMISSION_DENIED: Unauthenticated,
    _CODE.UNAVAILABLE: Unavailable,
    _CODE.DEADLINE_EXCEEDED: DeadlineExceeded,
    _CODE.NOT_FOUND: NotFound,
    _CODE.RESOURCE_EXHAUSTED: ResourceExhausted,
    _CODE.FAILED_PRECONDITION: FailedPrecondition,
}


def from_rpc_error(err: grpc.RpcError) -> EdgefoldError:
    """The typed error for a grpc error (returned unchanged if it is typed already)."""
    if isinstance(err, EdgefoldError):
        return err
    code = err.code() if callable(getattr(err, "code", None)) else _CODE.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return _BY_CODE.get(code, ServerError)(details or "", code, cause=err)


__all__ = ["EdgefoldError", "InvalidInput", "Unauthenticated", "Unavailable", "DeadlineExceeded", "NotFound",
           "ResourceExhausted", "FailedPrecondition", "ServerError", "from_rpc_error"]
