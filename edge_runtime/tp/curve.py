"""ZeroMQ CURVE keys for the star collective: encrypted, authenticated peer links.

    edge-runtime tp keys --out keys/      # -> make_keys("keys/")

writes two key pairs (zmq.auth.create_certificates, Z85 text files):
    master.key, master.key_secret   the master's pair; workers need only master.key (public)
    worker.key, worker.key_secret   shared by all workers; the master needs only worker.key
So copy master.key + worker.key_secret (+ worker.key) to each worker device, and master.key_secret +
worker.key to the master. The control link of an elastic group (control.py) uses the same files the
other way round: the peer listens as the CURVE server (worker pair) and admits only master.key. The master runs a ZAP handler that accepts only the worker public key:
a peer without worker.key_secret fails the handshake and never reaches the master's code.
"""
from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

MASTER, WORKER = "master", "worker"


def make_keys(directory: str | Path) -> Path:
    """Create the master and worker key pairs in `directory` (made if missing); secrets are 0600."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (MASTER, WORKER):
        _, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
    return directory


def _load(directory: Path, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(directory) / (f"{name}.key_secret" if secret else f"{name}.key")
    if not path.is_file():
        raise FileNotFoundError(f"curve_keys: {path} is missing (make it with `edge-runtime tp keys --out DIR`)")
    public, secret_key = zmq.auth.load_certificate(path)
    if secret and not secret_key:
        raise ValueError(f"curve_keys: {path} holds no secret key")
    return public, secret_key


class _OnlyKey:
    """ZAP credentials provider: accept exactly one client public key (Z85)."""

    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


def _server(context: zmq.Context, sock: zmq.Socket, directory: Path, own: str, admitted: str) -> ThreadAuthenticator:
    """Make `sock` a CURVE server holding the `own` pair that admits only the `admitted` public key.
    Returns the running authenticator (stop it when the socket closes). Call before bind."""
    public, secret = _load(directory, own, secret=True)
    admitted_public, _ = _load(directory, admitted, secret=False)
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_OnlyKey(admitted_public))
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def _client(sock: zmq.Socket, directory: Path, own: str, server: str, server_key: bytes | None = None) -> None:
    """Make `sock` a CURVE client holding the `own` pair, of a server proving `server`'s key (or
    `server_key`). Call before connect."""
    public, secret = _load(directory, own, secret=True)
    if server_key is None:
        server_key, _ = _load(directory, server, secret=False)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_key


def configure_master(context: zmq.Context, sock: zmq.Socket, directory: Path) -> ThreadAuthenticator:
    """The master's collective socket: admits only holders of worker.key_secret."""
    return _server(context, sock, directory, MASTER, WORKER)


def configure_worker(sock: zmq.Socket, directory: Path) -> None:
    """A worker dialing the master (needs worker.key_secret and master.key)."""
    _client(sock, directory, WORKER, MASTER)


def configure_control_server(context: zmq.Context, sock: zmq.Socket, directory: Path) -> ThreadAuthenticator:
    """A peer's control port (control.py): the worker pair, admitting only the master's public key."""
    return _server(context, sock, directory, WORKER, MASTER)


def configure_control_client(sock: zmq.Socket, directory: Path, server_key: bytes | None = None) -> None:
    """The master asking a peer (control.py): the master pair; the peer must hold the secret of
    `server_key` (default worker.key)."""
    _client(sock, directory, MASTER, WORKER, server_key)


def worker_public_key(directory: Path) -> bytes:
    """worker.key's public key (Z85): what a peer's control port must prove it holds the secret of,
    and the key a master pins for discovered peers (discovery.py)."""
    return _load(Path(directory), WORKER, secret=False)[0]
