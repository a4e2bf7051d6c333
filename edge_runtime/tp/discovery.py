"""Finding tensor-parallel peers on the home network: DNS-SD over multicast DNS (zeroconf).

    # a worker (`edge-runtime tp worker --advertise kitchen-pi --listen 0.0.0.0:29600`)
    profile = {"name": "raspberry-pi-5", "memory_bandwidth_gbs": 17.1, "memory_bytes": 8 << 30}
    with Advertisement("kitchen-pi", 29600, key=worker_public, profile=profile, model="3f9a0c1e"):
        serve()                                               # unregisters (goodbye packets) on exit

    # the master (`discover = 3`): the first 3 suitable peers, sorted by name, or TimeoutError
    peers = discover(3, timeout_s=10.0, model="3f9a0c1e", known_keys=Path("~/.edgefold/known_peers"),
                     trust_on_first_use=True)
    peers[0].host, peers[0].port, peers[0].key, peers[0].profile["memory_bandwidth_gbs"]

A peer is one `NAME._edgefold-tp._tcp.local.` service whose SRV record gives its control port, whose
A records give its IPv4 addresses and whose TXT record holds four strings (each <= 255 bytes, the
DNS-SD limit): `v=1`, `model=<hex>`, `profile=<compact JSON>` and, when it has one, `key=<Z85>`, its
CURVE public key. Anyone on the network can advertise anything, so a record only names a candidate:
discover() accepts a keyed record only if its key is pinned or recorded in known_keys (one `NAME KEY`
line per peer, 0600; trust_on_first_use records a new NAME and refuses a recorded NAME whose key
changed, like SSH). require_key=False (a network you trust, `--insecure`) checks no keys at all.
Every record that is refused is logged once with its reason; nothing waits without a deadline.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from zeroconf import IPVersion, NonUniqueNameException, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf
from zmq.utils import z85

SERVICE = "_edgefold-tp._tcp.local."
VERSION = "1"
TXT_STRING_MAX = 255  # RFC 6763 section 6.1: each TXT string is one length byte plus its data
RESOLVE_S = 3.0  # how long one record may take to answer with its SRV, TXT and A records
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # one DNS label; safe in a `NAME KEY` line
MODEL = re.compile(r"[0-9a-f]{1,64}")


class RefusedRecord(ValueError):
    """A record that is not a usable peer; the message is the reason."""


@dataclass(frozen=True)
class PeerRecord:
    name: str            # the advertised instance name (the NAME of --advertise)
    host: str            # an IPv4 address to dial
    port: int            # the peer's control port
    key: bytes | None    # its CURVE public key (Z85 text, 40 bytes), None when it advertises none
    profile: dict        # {"name": str, "memory_bandwidth_gbs": float > 0, "memory_bytes": int > 0, ...}
    model: str           # identity of the model it holds (a short hex hash string)


def encode_txt(key: bytes | None, profile: dict, model: str) -> dict[str, str]:
    """The TXT properties of an advertisement (checked by parse_record before they go out)."""
    try:
        text = json.dumps(profile, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RefusedRecord(f"profile is not JSON-serialisable: {err}") from None
    txt = {"v": VERSION, "model": model, "profile": text}
    if key is not None:
        txt["key"] = key if isinstance(key, str) else bytes(key).decode("ascii", "replace")
    for field, value in txt.items():
        size = len(f"{field}={value}".encode())
        if size > TXT_STRING_MAX:
            raise RefusedRecord(f"TXT string {field}= is {size} bytes, over the DNS-SD limit of {TXT_STRING_MAX}")
    return txt


def _text(properties: dict, field: str) -> str:
    value = properties.get(field.encode())
    if not isinstance(value, bytes):
        raise RefusedRecord(f"TXT has no {field}=")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise RefusedRecord(f"TXT {field}= is not UTF-8 text") from None


def _key(properties: dict) -> bytes | None:
    if b"key" not in properties:
        return None
    key = properties[b"key"]
    if not isinstance(key, bytes) or len(key) != 40:
        raise RefusedRecord("key= is not a 40-character Z85 CURVE public key")
    try:
        z85.decode(key)  # 40 characters decode to 32 bytes, or raise (KeyError, struct.error, ...)
    except Exception:
        raise RefusedRecord("key= is not valid Z85 text for a 32-byte CURVE public key") from None
    return key


def _profile(text: str) -> dict:
    try:
        profile = json.loads(text)
    except ValueError:
        raise RefusedRecord("profile= is not JSON") from None
    if not isinstance(profile, dict):
        raise RefusedRecord("profile= is not a JSON object")
    if not isinstance(profile.get("name"), str) or not profile["name"]:
        raise RefusedRecord("profile.name must be a non-empty string")
    bandwidth, memory = profile.get("memory_bandwidth_gbs"), profile.get("memory_bytes")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < math.inf:
        raise RefusedRecord(f"profile.memory_bandwidth_gbs must be a number > 0, got {bandwidth!r}")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise RefusedRecord(f"profile.memory_bytes must be an integer > 0, got {memory!r}")
    return {**profile, "memory_bandwidth_gbs": float(bandwidth)}


def _host(addresses: list) -> str:
    """The address to dial: the first IPv4 one that is not loopback or link-local, else the first."""
    found = []
    for text in addresses:
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Address(text if isinstance(text, str) else ""))
    if not found:
        raise RefusedRecord("no IPv4 address")
    usable = [a for a in found if not (a.is_loopback or a.is_link_local)]
    return str((usable or found)[0])


def parse_record(name: str, port, addresses: list, properties: dict) -> PeerRecord:
    """A resolved record -> PeerRecord; anything malformed raises RefusedRecord naming the field."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RefusedRecord("the instance name is not 1..63 letters, digits, '-' or '_'")
    if not isinstance(properties, dict):
        raise RefusedRecord("no TXT record")
    version = _text(properties, "v")
    if version != VERSION:
        raise RefusedRecord(f"TXT v={version} is not the version this edgefold reads ({VERSION})")
    model = _text(properties, "model")
    if not MODEL.fullmatch(model):
        raise RefusedRecord("model= is not 1..64 lowercase hex digits")
    key, profile = _key(properties), _profile(_text(properties, "profile"))
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RefusedRecord(f"port {port!r} is not in 1..65535")
    return PeerRecord(name, _host(addresses), port, key, profile, model)


def load_known_keys(path: Path | None) -> dict[str, bytes]:
    """known_keys: `NAME KEY` per line (blank lines and # comments skipped); a missing file is empty."""
    if path is None or not Path(path).exists():
        return {}
    known = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2 or not NAME.fullmatch(fields[0]) or len(fields[1]) != 40:
            raise ValueError(f"{path}:{number}: expected `NAME KEY` (a peer name and its 40-character Z85 key)")
        known[fields[0]] = fields[1].encode()
    return known


def record_known_key(path: Path, name: str, key: bytes) -> None:
    """Append `NAME KEY` to known_keys, creating it (and its folder) readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as file:
        file.write(f"{name} {key.decode()}\n")
    os.chmod(path, 0o600)


class TrustPolicy:
    """Which keys a master trusts: pinned ones, those in known_keys, and (tofu) new names' keys."""

    def __init__(self, pinned: set[bytes] | None = None, known_keys: Path | None = None,
                 trust_on_first_use: bool = False, require_key: bool = True):
        if trust_on_first_use and known_keys is None:
            raise ValueError("trust_on_first_use needs known_keys: the file where first-seen keys are recorded")
        self.pinned = set(pinned or ())
        self.path = Path(known_keys).expanduser() if known_keys is not None else None
        self.known = load_known_keys(self.path)
        self.tofu, self.require_key = trust_on_first_use, require_key

    def refusal(self, record: PeerRecord) -> str | None:
        """Why `record` is not trusted, or None when it is (a tofu acceptance records its key)."""
        if not self.require_key:
            return None
        if record.key is None:
            return "it advertises no CURVE key, and keys are required"
        recorded = self.known.get(record.name)
        if record.key in self.pinned or recorded == record.key:
            return None
        if self.path is None and not self.pinned:
            return ("no key is trusted: give pinned keys, known_keys or trust_on_first_use "
                    "(or require_key=False on a network you trust)")
        if recorded is not None:
            return (f"key changed: {self.path} records {recorded[:8].decode()}..., it advertises "
                    f"{record.key[:8].decode()}... (if the peer was re-keyed, delete its line)")
        if self.tofu:
            record_known_key(self.path, record.name, record.key)
            self.known[record.name] = record.key
            return None
        return f"its key {record.key[:8].decode()}... is not pinned, nor recorded for {record.name} in known_keys"


def host_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses, or ["127.0.0.1"] when it has no other."""
    found = [a.address for nics in psutil.net_if_addrs().values() for a in nics
             if a.family == socket.AF_INET and not a.address.startswith("127.")]
    return sorted(set(found)) or ["127.0.0.1"]


class Advertisement:
    """Advertise this peer under NAME until close(); a context manager. Registering takes ~1.5 s
    (mDNS probing); a NAME another host already advertises raises ValueError."""

    def __init__(self, name: str, port: int, *, key: bytes | None, profile: dict, model: str,
                 addresses: list[str] | None = None):
        addresses = host_addresses() if addresses is None else list(addresses)
        try:
            txt = encode_txt(key, profile, model)
            parse_record(name, port, addresses, {k.encode(): v.encode() for k, v in txt.items()})
        except RefusedRecord as err:
            raise ValueError(f"advertise {name!r}: {err}") from None
        self.info = ServiceInfo(SERVICE, f"{name}.{SERVICE}", port=port, properties=txt,
                                parsed_addresses=addresses)
        self.zeroconf = Zeroconf(ip_version=IPVersion.V4Only)
        try:
            self.zeroconf.register_service(self.info)
        except BaseException as err:
            self.zeroconf.close()
            if isinstance(err, NonUniqueNameException):
                raise ValueError(f"advertise {name!r}: another peer on this network uses that name") from None
            raise

    def close(self) -> None:
        """Send goodbye packets and close the sockets; safe to call twice."""
        self.zeroconf.close()

    def __enter__(self) -> Advertisement:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolve(zc: Zeroconf, name: str, timeout_s: float, events: queue.SimpleQueue) -> None:
    """Thread body: ask for one record's SRV, TXT and A records; post (None, name, PeerRecord | reason)."""
    try:
        info = ServiceInfo(SERVICE, f"{name}.{SERVICE}")
        complete = info.request(zc, timeout_s * 1000)
        try:
            result = parse_record(name, info.port, info.parsed_addresses(IPVersion.V4Only), info.properties)
        except RefusedRecord as err:
            result = str(err) if complete else f"{err} (no complete answer within {timeout_s:.1f} s)"
    except Exception as err:  # a closed Zeroconf, a name zeroconf rejects: a refusal, never a dead thread
        result = f"could not be resolved: {err}"
    events.put((None, name, result))


class _Search:
    """One discover() call's state: records accepted, refused (with reasons) and still resolving."""

    def __init__(self, count: int, model: str | None, trust: TrustPolicy, log):
        self.count, self.model, self.trust, self.log = count, model, trust, log
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.accepted: dict[str, PeerRecord] = {}
        self.refused: dict[str, str] = {}
        self.pending: set[str] = set()

    def on_change(self, zeroconf, service_type, name, state_change) -> None:
        """zeroconf's browser thread: only queue the news (nothing here can raise)."""
        self.events.put((state_change, name[:-len(SERVICE) - 1], None))

    def step(self, zc: Zeroconf, left_s: float) -> None:
        """Handle the next event, waiting at most left_s for one."""
        try:
            change, name, result = self.events.get(timeout=left_s)
        except queue.Empty:
            return
        if change is None:
            self.pending.discard(name)
            self.judge(name, result)
        elif change is ServiceStateChange.Removed:
            self.accepted.pop(name, None)
            self.pending.discard(name)
        else:  # Added or Updated: (re)resolve it
            self.pending.add(name)
            threading.Thread(target=_resolve, args=(zc, name, min(RESOLVE_S, left_s), self.events),
                             daemon=True, name=f"discover-{name}").start()

    def judge(self, name: str, result: PeerRecord | str) -> None:
        """File a resolved record under accepted or refused (logging each new refusal once)."""
        reason = result if isinstance(result, str) else None
        if reason is None and self.model is not None and result.model != self.model:
            reason = f"it holds model {result.model}, not {self.model}"
        reason = reason or self.trust.refusal(result)
        self.accepted.pop(name, None)
        if reason is None:
            self.accepted[name] = result
            self.refused.pop(name, None)
        elif self.refused.get(name) != reason:
            self.refused[name] = reason
            self.log(f"discover: refused {name}: {reason}")

    def shortfall(self, timeout_s: float) -> str:
        found = ", ".join(sorted(self.accepted)) or "none"
        refusals = "; ".join(f"{name} ({why})" for name, why in sorted(self.refused.items())) or "none"
        waiting = ", ".join(sorted(self.pending - self.accepted.keys() - self.refused.keys()))
        return (f"discover: found {len(self.accepted)} of {self.count} peers within {timeout_s:g} s ({found}); "
                f"refused {refusals}" + (f"; still resolving {waiting}" if waiting else ""))


def discover(count: int, timeout_s: float, *, model: str | None = None, pinned: set[bytes] | None = None,
             known_keys: Path | None = None, trust_on_first_use: bool = False, require_key: bool = True,
             log=print) -> list[PeerRecord]:
    """The first `count` suitable peers (well-formed, holding `model` when given, trusted), sorted by
    name, as soon as there are that many; TimeoutError at timeout_s naming what was found and refused."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"discover: count must be an integer >= 1, got {count!r}")
    if not timeout_s > 0:
        raise ValueError(f"discover: timeout_s must be > 0, got {timeout_s!r}")
    search = _Search(count, model, TrustPolicy(pinned, known_keys, trust_on_first_use, require_key), log)
    if not _search(search, timeout_s, lambda: len(search.accepted) >= count):
        raise TimeoutError(search.shortfall(timeout_s))
    return sorted(search.accepted.values(), key=lambda peer: peer.name)[:count]


def browse(timeout_s: float, *, model: str | None = None, pinned: set[bytes] | None = None,
           known_keys: Path | None = None, trust_on_first_use: bool = False, require_key: bool = True,
           log=print) -> list[PeerRecord]:
    """Every suitable peer seen within timeout_s, sorted by name (a group looking for newcomers)."""
    if not timeout_s > 0:
        raise ValueError(f"browse: timeout_s must be > 0, got {timeout_s!r}")
    search = _Search(0, model, TrustPolicy(pinned, known_keys, trust_on_first_use, require_key), log)
    _search(search, timeout_s, lambda: False)
    return sorted(search.accepted.values(), key=lambda peer: peer.name)


def _search(search: _Search, timeout_s: float, enough) -> bool:
    """Browse and resolve records into `search` until enough() (True) or timeout_s (False)."""
    deadline = time.monotonic() + timeout_s
    with contextlib.closing(Zeroconf(ip_version=IPVersion.V4Only)) as zc, \
            ServiceBrowser(zc, SERVICE, handlers=[search.on_change]):
        while not enough():
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return False
            search.step(zc, left_s)
    return True
