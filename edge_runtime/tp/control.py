"""The control link of an elastic group: small JSON requests from the master to a peer's listening port.

    # a peer (`edge-runtime tp worker --model M --listen 0.0.0.0:29600`)
    with ControlServer("0.0.0.0:29600", keys) as server:
        got = server.next(timeout_s=1.0)            # (reply, request dict, sender's IP) or None
        if got:
            reply, request, sender = got
            reply({"ok": True, "state": "idle"})

    # the master (group.py): one request, one reply, a deadline
    answer = ask("10.0.0.3:29600", {"op": "describe"}, timeout_s=1.0, keys=keys)   # dict, or None: no answer

Each request travels on a fresh DEALER socket and carries a random id that the reply must echo, so a
reply that arrives late (a peer that was stopped, then resumed) never answers a later question.
Messages are one frame of UTF-8 JSON of at most MAX_MESSAGE bytes; anything else is dropped and
counted. With CURVE keys (`tp keys`) the peer is the CURVE server (worker.key_secret) and admits only
the master's key (master.key), and the master checks the peer's public key: worker.key, or the key
a discovery record carried (discovery.py) once it is pinned.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import zmq

from devices.address import parse_address

from . import curve

MAX_MESSAGE = 64 << 10  # a plan, shares and a profile: a few KB


def _endpoint(address: str, what: str, listen: bool = False) -> str:
    host, port = parse_address(address, what, listen)
    host = "*" if listen and host in ("0.0.0.0", "*") else host
    return f"tcp://{f'[{host}]' if ':' in host else host}:{port}"


def ask(address: str, request: dict, timeout_s: float, keys: Path | None = None,
        server_key: bytes | None = None) -> dict | None:
    """Send `request` to the peer at address and return its reply (a dict), or None if none came
    within timeout_s (the peer is down, stopped, busy or refused our key)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if keys is not None:
            curve.configure_control_client(sock, keys, server_key)
        sock.connect(_endpoint(address, "peer"))
        rid = os.urandom(8).hex()
        sock.send(json.dumps({**request, "id": rid}).encode(), zmq.NOBLOCK)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, math.ceil(left * 1000))):
                break
            reply = _parse(sock.recv_multipart())
            if reply is not None and reply.get("id") == rid:
                return reply
        return None
    except zmq.ZMQError:
        return None
    finally:
        sock.close(linger=0)


def _parse(frames: list[bytes]) -> dict | None:
    if len(frames) != 1 or len(frames[0]) > MAX_MESSAGE:
        return None
    try:
        msg = json.loads(frames[0])
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


class ControlServer:
    """A peer's listening port: requests in, one reply each (a ROUTER socket)."""

    def __init__(self, listen: str, keys: Path | None = None):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._auth = None
        self.dropped = 0  # messages that were not one JSON object
        try:
            if keys is not None:
                self._auth = curve.configure_control_server(self._ctx, self._sock, keys)
            self._sock.bind(_endpoint(listen, "--listen", listen=True))
            self.address = self._sock.last_endpoint.decode().removeprefix("tcp://")
        except BaseException:
            self.close()
            raise

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def next(self, timeout_s: float):
        """(reply, request, sender_ip) for the next well-formed request within timeout_s, else None.
        reply(dict) answers it (echoing its id)."""
        if not self._sock.poll(max(0, math.ceil(timeout_s * 1000))):
            return None
        frames = self._sock.recv_multipart(copy=False)
        identity, body = frames[0].bytes, frames[1:]
        request = _parse([f.bytes for f in body])
        if request is None or not isinstance(request.get("id"), str):
            self.dropped += 1
            return None
        sender = body[0].get("Peer-Address")  # the master's address as this host sees it

        def reply(answer: dict) -> None:
            try:
                self._sock.send_multipart([identity, json.dumps({**answer, "id": request["id"]}).encode()],
                                          zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the asker is gone

        return reply, request, sender

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
