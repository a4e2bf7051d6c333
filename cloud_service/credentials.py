"""Scoped credentials: bearer tokens with a role, kept hashed in the repository's state database.

    store = CredentialStore(StateStore(repository))               # the CLI's side
    cid, token = store.add("device", device_id="pi-kitchen-1")    # token "<id>.<secret>", shown once
    store.revoke(cid)

    creds = Credentials(StateStore(repository), token="legacy")   # the server's side, in memory
    creds.authenticate("Bearer " + token)    # Caller(role="device", device_id="pi-kitchen-1", credential=cid)
    creds.poll()                             # reload when the database changed (blocking: off the loop)

A token is `<id>.<secret>`: id = 12 hex characters (public, the row's key), secret = 32 random bytes
url-safe base64. Only sha256(secret) is stored; a presented secret is compared in constant time.
Unknown id and wrong secret get the same answer; "revoked" is said only to a holder of the secret.
`--token-file`'s token is one more credential: an operator, compared in constant time.
"""
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass

import grpc

from cloud_service.caller import ROLES, Caller
from cloud_service.config import ConfigError
from cloud_service.fleet import DEVICE_ID
from cloud_service.state import StateStore
from edgefold_proto.auth import BearerToken
from edgefold_proto.serving import ServiceError

log = logging.getLogger(__name__)
TOKEN = re.compile(r"^([0-9a-f]{12})\.([A-Za-z0-9_-]{20,200})$")
CREDENTIAL_ID = re.compile(r"^[0-9a-f]{12}$")
MAX_NOTE = 200
ASK = "send metadata 'authorization: Bearer <token>'"
_DUMMY = hashlib.sha256(b"no such credential").digest()


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def problem(role: str, device_id: str | None, note: str = "") -> tuple[str, str] | None:
    """(field, what is wrong) with a credential about to be added, or None."""
    if role not in ROLES:
        return "role", f"'{role[:40]}' is not one of {', '.join(ROLES)}"
    if role == "device" and not device_id:
        return "device_id", "a device credential is bound to one device id: give it"
    if role != "device" and device_id:
        return "device_id", f"only a device credential has one (role is '{role}')"
    if device_id and not DEVICE_ID.match(device_id):
        return "device_id", f"'{device_id[:80]}' must match {DEVICE_ID.pattern}"
    if len(note) > MAX_NOTE or any(ord(c) < 32 or ord(c) == 127 for c in note):
        return "note", f"at most {MAX_NOTE} printable characters"
    return None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class CredentialStore:
    """The credentials table: add, list, revoke (what `cloud-service token` runs)."""

    def __init__(self, state: StateStore):
        self.state = state

    def add(self, role: str, device_id: str | None = None, note: str = "") -> tuple[str, str]:
        """A new credential; returns (id, token). The token is not stored: show it once."""
        if bad := problem(role, device_id, note):
            raise ValueError(f"{bad[0]}: {bad[1]}")
        secret = secrets.token_urlsafe(32)
        with closing(self.state.connect()) as db, db:
            for _ in range(8):
                cid = secrets.token_hex(6)
                try:
                    db.execute("INSERT INTO credentials (id, role, device_id, secret_sha256, created, note) "
                               "VALUES (?, ?, ?, ?, ?, ?)", (cid, role, device_id, _digest(secret), time.time(), note))
                    return cid, f"{cid}.{secret}"
                except sqlite3.IntegrityError:      # an id taken already: draw another
                    continue
        raise ConfigError(f"{self.state.path}: could not draw a free credential id")

    def list(self) -> list[dict]:
        """Every credential, oldest first: id, role, device_id, created, revoked, note (never the hash)."""
        with closing(self.state.connect()) as db:
            rows = db.execute("SELECT id, role, device_id, created, revoked, note FROM credentials "
                              "ORDER BY created, id").fetchall()
        return [dict(zip(("id", "role", "device_id", "created", "revoked", "note"), r)) for r in rows]

    def revoke(self, credential_id: str) -> float | None:
        """Revoke `credential_id`; returns when it was revoked before (None: revoked now).
        ValueError for an id that is not in the table."""
        if not CREDENTIAL_ID.match(credential_id):
            raise ValueError(f"id '{credential_id[:80]}' must be 12 hex characters (see `token list`)")
        with closing(self.state.connect()) as db, db:
            row = db.execute("SELECT revoked FROM credentials WHERE id = ?", (credential_id,)).fetchone()
            if row is None:
                raise ValueError(f"id '{credential_id}': no such credential in {self.state.path}")
            if row[0] is not None:
                return row[0]
            db.execute("UPDATE credentials SET revoked = ? WHERE id = ?", (time.time(), credential_id))
        return None


@dataclass(frozen=True)
class _Entry:
    caller: Caller
    digest: bytes
    revoked: bool


def _entry(row) -> _Entry:
    """A table row as an entry; ValueError naming the field that is wrong."""
    cid, role, device_id, digest, revoked = row
    if not isinstance(cid, str) or not CREDENTIAL_ID.match(cid):
        raise ValueError(f"id {str(cid)[:40]!r} is not 12 hex characters")
    if bad := problem(role if isinstance(role, str) else repr(role), device_id if isinstance(device_id, str) else None):
        raise ValueError(f"credential {cid}: {bad[0]}: {bad[1]}")
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise ValueError(f"credential {cid}: secret_sha256 is not 32 bytes")
    return _Entry(Caller(role, device_id, credential=cid), digest, revoked is not None)


class Credentials:
    """What the server authenticates against: the table in memory, reloaded by `poll()` when the
    database changed. Enforced once any credential row exists (even revoked), or with a legacy
    token (`--token-file`) or client certificates (`--tls-client-ca`); open (no caller) otherwise."""

    def __init__(self, state: StateStore, token: str | None = None, client_certificates: bool = False):
        self.state = state
        self._legacy = BearerToken(token) if token else None
        self._fixed = bool(token) or client_certificates
        self._db = state.connect()          # its own connection: data_version moves on others' commits
        self._version = None
        self._seen = None                   # _changes() at the last reload
        self._by_id: dict[str, _Entry] = {}
        self._has_rows = False
        self._failing = None                # the error of the last failed reload (logged once)
        self.generation = 0                 # +1 at each reload, after the new table is in place
        try:
            self._version, self._by_id, self._has_rows = self._read(strict=True)
        except (sqlite3.DatabaseError, ValueError) as err:
            self._db.close()
            raise ConfigError(f"{state.path}: credentials: {err}") from None

    @property
    def enforced(self) -> bool:
        return self._fixed or self._has_rows

    def _changes(self) -> tuple:
        """What a credential change moves (rows are only added and revoked, never edited or deleted):
        other writers to the database (the registry's flushes, every second) leave it as it is."""
        return self._db.execute("SELECT count(*), max(created), max(revoked) FROM credentials").fetchone()

    def _read(self, strict: bool):
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._seen = self._changes()
        by_id, rows = {}, self._db.execute(
            "SELECT id, role, device_id, secret_sha256, revoked FROM credentials").fetchall()
        for row in rows:
            try:
                entry = _entry(row)
            except ValueError as err:
                if strict:
                    raise
                log.error("%s: credentials: %s; that credential is refused", self.state.path, err)
                continue
            by_id[entry.caller.credential] = entry
        return version, by_id, bool(rows)

    def poll(self) -> bool:
        """Reload the table if the database changed since the last look; True when it did. Blocking
        (SQLite): run it off the event loop. A failed read refuses every stored token until one succeeds."""
        try:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version and not self._failing:
                return False
            if self._changes() == self._seen and not self._failing:
                self._version = version
                return False
            version, by_id, has_rows = self._read(strict=False)
        except sqlite3.DatabaseError as err:
            if str(err) != self._failing:
                log.error("%s: cannot read the credentials (%s): refusing every stored token until it can",
                          self.state.path, err)
            self._failing, self._by_id, self._has_rows = str(err), {}, True     # fail closed
            self.generation += 1
            return True
        if has_rows and not self.enforced:
            log.warning("credentials exist now: every RPC but health and reflection needs one")
        self._failing = None
        self._version, self._by_id, self._has_rows = version, by_id, has_rows
        self.generation += 1                # last: a decision cached against the old table is never reused
        return True

    def authenticate(self, authorization: str | bytes | None) -> Caller:
        """The caller an 'authorization' metadata value stands for; Unauthenticated says why not."""
        if not authorization:
            raise Unauthenticated(f"no credential: {ASK}")
        if isinstance(authorization, bytes):
            authorization = authorization.decode("utf-8", "replace")
        if self._legacy is not None and self._legacy.matches(authorization):
            return Caller("operator", credential="token-file")
        scheme, _, token = authorization.partition(" ")
        match = TOKEN.match(token) if scheme == "Bearer" else None
        if match is None:
            raise Unauthenticated(f"malformed or wrong token: {ASK} with a token from `cloud-service token add`")
        entry = self._by_id.get(match.group(1))
        if not hmac.compare_digest(_digest(match.group(2)), entry.digest if entry else _DUMMY) or entry is None:
            raise Unauthenticated("unknown or wrong token in 'authorization: Bearer <token>'")
        if entry.revoked:
            raise Unauthenticated(f"credential {entry.caller.credential} was revoked: "
                                  f"{ASK} with a valid token")
        return entry.caller

    def close(self) -> None:
        self._db.close()
