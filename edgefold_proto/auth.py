"""The bearer token every edgefold server checks: the cloud's gRPC port, the agent's gRPC port and
its OpenAI-compatible HTTP port. One comparison, in constant time; gRPC health and reflection
stay open so probes and load balancers work without the secret.

    token = BearerToken(read_token("token.txt", "--token-file"))
    token.allows(details.method, details.invocation_metadata)   # a gRPC call
    token.matches(headers.get(b"authorization"))                # an HTTP Authorization header
"""
import hmac
from pathlib import Path

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
DRAIN_S = 0.2  # how long a refused gRPC stream's requests are read before the refusal (else INTERNAL)


def read_token(path, what: str = "token_file") -> str:
    """The token in `path` (whitespace stripped); ValueError naming `what` for an empty file."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{what} {path}: the file is empty")
    return token


class BearerToken:
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def matches(self, presented: str | bytes | None) -> bool:
        """Is `presented` (an authorization value: "Bearer <token>") this token? Constant time."""
        if isinstance(presented, str):
            presented = presented.encode()
        return hmac.compare_digest(presented or b"", self._expected)

    def allows(self, method: str, metadata) -> bool:
        """May a gRPC call to `method` with this invocation metadata go ahead?"""
        if method.startswith(OPEN_PREFIXES):
            return True
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                presented = value
        return self.matches(presented)
