"""Peer addresses as people type them: "10.0.0.3:29500", "pi.local:22", "[::1]:8001" -> (host, port).

    host, port = parse_address("10.0.0.3:29500", "--peer")           # ("10.0.0.3", 29500)
    parse_address("127.0.0.1:0", "--listen", listen=True)            # port 0: the OS picks one
    is_loopback("127.0.0.1"), is_loopback("0.0.0.0")                 # True, False (a wildcard reaches out)

One parser for every command that takes HOST:PORT (the tensor-parallel master, the probe's peer,
the link emulator). The port is 1..65535 (0 too for an address to listen on); an IPv6 host is
written in brackets. A bad address is a ValueError that names the field and the expected form.
"""
from __future__ import annotations


def parse_address(text: str, what: str, listen: bool = False) -> tuple[str, int]:
    """"HOST:PORT" -> (host, port), brackets stripped from an IPv6 host; `what` names the field in errors."""
    low = 0 if listen else 1
    host, sep, port = str(text).rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not host or (":" in host and not bracketed) or not (port.isascii() and port.isdigit()) \
            or not low <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT with PORT in {low}..65535 (an IPv6 host in brackets, "
                         f"e.g. [::1]:29500), got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Does `host` stay on this machine? (A wildcard such as 0.0.0.0 does not: it listens on every interface.)"""
    return host.startswith("127.") or host in ("localhost", "::1")
