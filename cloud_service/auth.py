"""Who may call what. Every RPC but health and reflection needs a credential whose role is at least
the RPC's (MIN_ROLE; a path not in it needs 'operator'); the handler then runs as that Caller
(cloud_service/caller.py), so the Fleet service can hold a device to its own id.

    creds = Credentials(StateStore(repository), token=legacy_token, client_certificates=bool(ca))
    server = grpc.aio.server(interceptors=[AuthInterceptor(creds, metrics)])
    cert, key, ca = tls_files(Path("cert.pem"), Path("key.pem"), Path("clients-ca.pem"))

Credentials: a bearer token (`authorization: Bearer <token>`) from the credential store or
--token-file (an operator), or, under --tls-client-ca, the client certificate: its subject common
name is a device id, and it acts as that device. gRPC Python can only require a client
certificate or not ask for one, so under --tls-client-ca every client presents one (signed by
that CA). A bearer token, when sent, wins over the certificate: it may carry a higher role, and
a wrong token is refused even beside a good certificate. Refused: UNAUTHENTICATED (no, malformed, unknown or revoked credential) or
PERMISSION_DENIED (a known caller whose role is too low; the message names the role needed).
A server with no credentials at all runs open (no caller), as Credentials.enforced says.
"""
import asyncio
import hmac
from pathlib import Path

import grpc

from cloud_service.caller import CURRENT, Caller, PermissionDenied
from cloud_service.credentials import ASK, Credentials, Unauthenticated
from cloud_service.fleet import DEVICE_ID
from edgefold_proto import METHODS
from edgefold_proto.auth import DRAIN_S, OPEN_PREFIXES, read_token
from edgefold_proto.fleet import FLEET_METHODS
from edgefold_proto.serving import ServiceError

__all__ = ["AuthInterceptor", "MIN_ROLE", "required_role", "certificate_caller", "tls_files", "read_token"]

_APP = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelStatistics", "RepositoryIndex")
_DEVICE = ("ModelManifest", "DownloadModelFile", "Heartbeat")     # Heartbeat: its own id only (fleet.py)
_OPERATOR = ("RepositoryModelLoad", "RepositoryModelUnload", "ListDevices")
MIN_ROLE = {(METHODS.get(name) or FLEET_METHODS[name]).path: role
            for role, names in (("app", _APP), ("device", _DEVICE), ("operator", _OPERATOR)) for name in names}


def required_role(method: str) -> str | None:
    """The least role that may call `method` (a gRPC path); None when it is open to anyone."""
    return None if method.startswith(OPEN_PREFIXES) else MIN_ROLE.get(method, "operator")


def certificate_caller(context) -> Caller:
    """The device a verified client certificate names (subject CN), or Unauthenticated saying why not."""
    names = context.auth_context().get("x509_common_name")
    if not names:
        raise Unauthenticated(f"no credential: {ASK}, or present a client certificate")
    name = names[0].decode("utf-8", "replace")
    if not DEVICE_ID.match(name):
        raise Unauthenticated(f"client certificate: its subject common name '{name[:80]}' is not a device id "
                              f"({DEVICE_ID.pattern})")
    return Caller("device", name, credential=f"cert:{name}")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Decides each call from its method path and credential. A token that passed for a method is
    remembered until the credentials next reload (any `token add`/`revoke`): the next call with it
    costs a dict lookup and a constant-time comparison with the token that passed."""
    CACHE_SIZE = 4096

    def __init__(self, credentials: Credentials, metrics=None, client_certificates: bool = False):
        self.credentials = credentials
        self.client_certificates = client_certificates
        self._denied = metrics.auth_denied if metrics is not None else None
        self._passed: dict[tuple, tuple] = {}   # (method, token id) -> (generation, handler, authorization, guarded)
        self._by_certificate: dict[str, tuple] = {}     # method -> (handler, guarded)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        credentials = self.credentials
        if handler is None or not credentials.enforced:
            return handler
        method, authorization = details.method, None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value
        generation = credentials.generation          # read before authenticating: a reload in between misses
        if authorization is not None:
            hit = self._passed.get((method, authorization[7:19]))
            if hit is not None and hit[0] == generation and hit[1] is handler and _equal(hit[2], authorization):
                return hit[3]
        need = required_role(method)
        if need is None:
            return handler
        if authorization is None and self.client_certificates:
            return self._certificate_guarded(method, handler, need)
        try:
            caller = _allowed(credentials.authenticate(authorization), need, method)
        except ServiceError as err:
            return _guarded(handler, _raiser(err), self._count)
        guarded = _guarded(handler, lambda context: caller, self._count)
        if len(self._passed) >= self.CACHE_SIZE:
            self._passed.clear()
        self._passed[method, authorization[7:19]] = generation, handler, authorization, guarded
        return guarded

    def _certificate_guarded(self, method: str, handler, need: str):
        """The handler of `method` that asks the client certificate at each call (built once)."""
        hit = self._by_certificate.get(method)
        if hit is None or hit[0] is not handler:
            hit = self._by_certificate[method] = handler, _guarded(
                handler, lambda context: _allowed(certificate_caller(context), need, method), self._count)
        return hit[1]

    def _count(self, code: grpc.StatusCode) -> None:
        if self._denied is not None:
            self._denied.labels(code.name).inc()


def _equal(a, b) -> bool:
    """Constant-time equality of two metadata values (False for non-ASCII text, which no token is)."""
    try:
        return hmac.compare_digest(a, b)
    except TypeError:
        return False


def _allowed(caller: Caller, need: str, method: str) -> Caller:
    if not caller.at_least(need):
        raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs role '{need}' or higher; credential "
                               f"{caller.credential} has role '{caller.role}'")
    return caller


def _raiser(err: ServiceError):
    def resolve(context):
        raise err
    return resolve


async def _drain(request_iterator) -> None:
    """Read a refused stream's requests first (bounded): ending a stream while its requests are still
    arriving makes the client's gRPC core report INTERNAL, not the refusal."""
    async def read():
        async for _ in request_iterator:
            pass
    try:
        await asyncio.wait_for(read(), DRAIN_S)
    except asyncio.TimeoutError:
        pass


def _guarded(handler, resolve, count):
    """A handler like `handler` that runs its behavior as resolve(context)'s caller, or refuses the
    call with the ServiceError resolve raises. The caller is set as acting_as does (caller.py's ContextVar,
    set and reset around the call, and around each step of a stream); the call runs in its own task."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    async def caller_of(request, context):
        """resolve(context)'s caller, or the call refused (a refused stream's requests drained first)."""
        try:
            return resolve(context)
        except ServiceError as err:
            count(err.code)
            if handler.request_streaming:
                await _drain(request)
            await context.abort(err.code, err.message)

    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def streaming(request, context):
            caller = await caller_of(request, context)
            replies = behavior(request, context)
            try:
                while True:
                    token = CURRENT.set(caller)
                    try:
                        reply = await replies.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        CURRENT.reset(token)
                    yield reply
            finally:
                await replies.aclose()
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(streaming, **kwargs)
    behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request, context):
        caller = await caller_of(request, context)
        token = CURRENT.set(caller)         # acting_as(caller), without contextlib's cost on every call
        try:
            return await behavior(request, context)
        finally:
            CURRENT.reset(token)
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(unary, **kwargs)


# --- TLS files -----------------------------------------------------------------------------
def tls_files(cert: Path, key: Path, client_ca: Path | None = None) -> tuple[bytes, bytes, bytes | None]:
    """The PEM bytes of --tls-cert, --tls-key and --tls-client-ca, checked before the server uses them:
    ValueError naming the flag and the file when one is not PEM, or the key is not the certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def certificates(flag, path):
        data = path.read_bytes()
        try:
            return data, x509.load_pem_x509_certificates(data)
        except ValueError as err:
            raise ValueError(f"{flag} {path}: not a PEM certificate (-----BEGIN CERTIFICATE-----): {err}") from None

    cert_pem, chain = certificates("--tls-cert", cert)
    key_pem = key.read_bytes()
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--tls-key {key}: not an unencrypted PEM private key: {err}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ValueError(f"--tls-key {key}: is not the key of --tls-cert {cert}")
    ca_pem = certificates("--tls-client-ca", client_ca)[0] if client_ca else None
    return cert_pem, key_pem, ca_pem
