"""The cloud's own state, beside the model repository: one SQLite file that survives restarts.

    <repository>/.edgefold/state.sqlite3       (a dot folder: never taken for a model)

    state = StateStore(repository_root)        # creates the file and its tables on first use
    with closing(state.connect()) as db, db:   # a new connection, one transaction; WAL, so
        db.execute("SELECT ...")               # readers (the CLI) never block the running server

What lives here, each table owned by one module:
    credentials     tokens and their roles          cloud_service/credentials.py
    devices         the fleet registry              cloud_service/registry.py
    samples         telemetry, a bounded window     cloud_service/registry.py
    rollbacks       what devices rolled back        cloud_service/registry.py
    pins, groups    staged rollout                  cloud_service/registry.py

The file's schema version is checked on open; a file that is not one of ours (or is damaged)
stops the server or the command with an error naming the file, never a silent fresh start.
"""
import sqlite3
from contextlib import closing
from pathlib import Path

from cloud_service.config import ConfigError

STATE_DIR = ".edgefold"
STATE_FILE = "state.sqlite3"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x65646666          # "edff": marks the file as ours

SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    id            TEXT PRIMARY KEY,                  -- public part of the token: "<id>.<secret>"
    role          TEXT NOT NULL CHECK (role IN ('app', 'device', 'operator')),
    device_id     TEXT,                              -- set exactly for role 'device'
    secret_sha256 BLOB NOT NULL,                     -- sha256 of the secret part; the token is never stored
    created       REAL NOT NULL,
    revoked       REAL,                              -- unix time, NULL while valid
    note          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS devices (
    device_id        TEXT PRIMARY KEY,
    profile          TEXT NOT NULL DEFAULT '',
    agent_version    TEXT NOT NULL DEFAULT '',
    last_seen        REAL NOT NULL DEFAULT 0,
    uptime_s         REAL NOT NULL DEFAULT 0,
    models           TEXT NOT NULL DEFAULT '[]',     -- JSON [{name, version, digest}]
    counters         TEXT NOT NULL DEFAULT '{}',     -- JSON {name: int}
    telemetry        TEXT NOT NULL DEFAULT '{}',     -- JSON: the newest sample's values
    samples_received INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS samples (
    device_id TEXT NOT NULL,
    unix_time REAL NOT NULL,
    vals      TEXT NOT NULL,                         -- JSON {name: float}
    PRIMARY KEY (device_id, unix_time)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollbacks (
    device_id        TEXT NOT NULL,
    unix_time        REAL NOT NULL,
    name             TEXT NOT NULL,
    version          TEXT NOT NULL,
    digest           TEXT NOT NULL,
    reason           TEXT NOT NULL,
    restored_version TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (device_id, name, digest, unix_time)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    device_id TEXT PRIMARY KEY,
    name      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    model       TEXT NOT NULL,
    target_kind TEXT NOT NULL CHECK (target_kind IN ('device', 'group')),
    target      TEXT NOT NULL,
    version     TEXT NOT NULL,
    PRIMARY KEY (model, target_kind, target)
);
"""


def state_path(repository_root) -> Path:
    return Path(repository_root) / STATE_DIR / STATE_FILE


class StateStore:
    def __init__(self, repository_root, create: bool = True):
        self.path = state_path(repository_root)
        if not self.path.exists():
            if not create:
                raise ConfigError(f"{self.path}: no state database (the server creates it on its first start)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self.connect()) as db:
            self._check_or_create(db)

    def connect(self) -> sqlite3.Connection:
        """A new connection: `with db:` is one transaction (commit, or rollback on error); close it
        when done (`contextlib.closing`). Use one from one thread at a time."""
        try:
            db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"{self.path}: not a usable SQLite database ({err}); move it away to start afresh") from None
        return db

    def _check_or_create(self, db: sqlite3.Connection) -> None:
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and version == 0 and tables == 0:        # a new file
                db.executescript(SCHEMA + f"PRAGMA application_id={APPLICATION_ID};"
                                 f"PRAGMA user_version={SCHEMA_VERSION};")
                return
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"{self.path}: not a usable SQLite database ({err}); move it away to start afresh") from None
        if app_id != APPLICATION_ID:
            raise ConfigError(f"{self.path}: not an edgefold state database (application_id {app_id:#x})")
        if version != SCHEMA_VERSION:
            raise ConfigError(f"{self.path}: schema version {version}, this cloud-service reads {SCHEMA_VERSION}")
