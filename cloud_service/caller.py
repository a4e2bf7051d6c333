"""Who is calling: the credential an RPC was authenticated with, as the handlers see it.

cloud_service/auth.py authenticates every call and runs the handler inside `acting_as(caller)`;
a handler that needs more than the role check (the Fleet service: a device acts only for its
own id, and gets the versions it is pinned to) reads `current()`:

    caller = current()            # None when the server runs open (no credentials at all)
    caller.require_device(request.device_id)     # PERMISSION_DENIED for another device's id
"""
import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from edgefold_proto.serving import ServiceError

ROLES = ("app", "device", "operator")      # each may do what the one before it may, and more


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class Caller:
    role: str                       # one of ROLES
    device_id: str | None = None    # the device a 'device' credential is bound to
    credential: str = ""            # what authenticated it, for logs: a credential id, "token-file", "cert:CN"

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def require_device(self, device_id: str) -> None:
        """A device credential acts only for its own device id; operators act for any."""
        if self.role == "device" and device_id != self.device_id:
            raise PermissionDenied(f"device_id: this credential belongs to device '{self.device_id}', "
                                   f"not '{device_id[:80]}'")


# set and reset directly by cloud_service/auth.py around each call (cheaper than acting_as, same effect)
CURRENT: ContextVar[Caller | None] = ContextVar("edgefold_caller", default=None)


def current() -> Caller | None:
    return CURRENT.get()


@contextlib.contextmanager
def acting_as(caller: Caller | None):
    token = CURRENT.set(caller)
    try:
        yield caller
    finally:
        CURRENT.reset(token)
