"""The fleet registry: every device's last status, counters, telemetry window and rollbacks, and
the operators' rollout groups and pins, kept in the state database (cloud_service/state.py) so
that all of it survives a restart.

    registry = Registry(StateStore(repo))       # loads each device's status and kept sample times
    registry.start()                            # on the event loop: the flusher task
    accepted = registry.heartbeat(request, now) # memory only: answered at once
    await registry.flush()                      # pending writes, one transaction, in a thread
    registry.list_devices("", include_samples=False)   # [dict], read from the database (in a thread)
    registry.pinned("stages", "pi-1")           # Pin("2", "group 'canary'") or None (in a thread)
    await registry.close()                      # last flush

Heartbeats are answered from memory and written in batches every FLUSH_S (one transaction, off
the event loop): a thousand devices a second cost the registry ~5 % of a core (scripts/bench_fleet.py);
a crash (not a SIGTERM) loses at most that last second. What memory holds per device is bounded:
its status (profile, versions, models, counters, the newest sample's values), the times of its
kept samples (KEEP_SAMPLES floats, to count a resent sample once) and the keys of its kept
rollbacks; the sample values themselves live only in the database.

Rollout (written by `cloud-service rollout`, read per manifest, so a change applies to the next
manifest without a restart): a device's own pin wins over its group's; no pin means the highest.
The functions below that take `db` (an sqlite3 connection from StateStore.connect) are what the
commands use; the CLI reads while the server runs (WAL), seeing what was flushed up to ~1 s ago.
"""
import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
from array import array
from bisect import bisect_left, insort
from contextlib import closing
from itertools import islice
from typing import NamedTuple

import grpc

from cloud_service.config import ConfigError
from cloud_service.state import StateStore
from edgefold_proto.fleet import DEVICE_ID, VERSION, fleet_pb
from edgefold_proto.serving import ServiceError, Unavailable

log = logging.getLogger(__name__)
KEEP_SAMPLES = 256           # per device, in memory (times) and in the database (values)
KEEP_ROLLBACKS = 16          # per device, the newest
MAX_DEVICES = 10_000         # a new device past this is RESOURCE_EXHAUSTED (`devices --forget` makes room)
FLUSH_S = 1.0                # pending heartbeats are written this often
MAX_FLUSH_SAMPLES = 50_000   # samples written in one transaction (more wait for the next one)
MAX_PENDING_SAMPLES = 500_000  # while the database cannot be written; the oldest are dropped past this
SLOW_FLUSH_S = 0.5           # a flush slower than this is logged


class TooManyDevices(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Pin(NamedTuple):
    version: str
    source: str              # "device 'pi-1'" or "group 'canary'", for errors


class _Device:
    __slots__ = ("profile", "agent_version", "uptime_s", "last_seen", "models", "models_json", "counters",
                 "telemetry", "newest", "samples_received", "times", "rollbacks")

    def __init__(self, profile="", agent_version="", uptime_s=0.0, last_seen=0.0, models=(), counters=None,
                 telemetry=None, samples_received=0):
        self.profile, self.agent_version, self.uptime_s, self.last_seen = profile, agent_version, uptime_s, last_seen
        self.models = models                    # ((name, version, digest), ...), and as JSON (set when it changes)
        self.models_json = json.dumps([{"name": n, "version": v, "digest": g} for n, v, g in models])
        self.counters = counters or {}          # replaced, never changed in place: a flush serializes it in a thread
        self.telemetry = telemetry or {}        # the newest sample's values
        self.newest = -math.inf                 # its unix_time
        self.samples_received = samples_received
        self.times = array("d")                 # kept samples' unix_time, ascending (at most KEEP_SAMPLES)
        self.rollbacks = []                     # kept rollbacks' (unix_time, name, digest), ascending

    def row(self, device_id):
        return (device_id, self.profile, self.agent_version, self.last_seen, self.uptime_s, self.models_json,
                self.counters, self.telemetry, self.samples_received)


class Registry:
    def __init__(self, state: StateStore, max_devices: int = MAX_DEVICES, flush_s: float = FLUSH_S):
        self.state, self.max_devices, self.flush_s = state, max_devices, flush_s
        self._devices: dict[str, _Device] = {}
        self._dirty: set[str] = set()           # status rows to write
        self._inserts: dict = {}                # (device_id, unix_time) -> values: samples to write
        self._deletes: list = []                # (device_id, unix_time): written samples that left a window
        self._rollbacks: list = []              # rows to write
        self._flush_lock = asyncio.Lock()       # flushes run one after another, in order
        self._read_lock = threading.Lock()
        self._reader = self._writer = None
        self._task = self._stopping = None
        self.last_flush = {}                    # seconds, devices, samples of the last flush (the benchmark)
        self._quiet_until = 0.0                 # no slow-flush warning before this (time.monotonic)
        try:
            with closing(state.connect()) as db:
                self._load(db)
        except (sqlite3.DatabaseError, ValueError, TypeError) as err:
            raise ConfigError(f"{state.path}: the fleet registry cannot be read ({err}); "
                              "restore a backup or move the file away to start afresh") from None

    def _load(self, db) -> None:
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("damaged: " + "; ".join(problems).replace("\n", "; ")[:300])
        for device_id, profile, agent, seen, uptime, models, counters, telemetry, received in db.execute(
                "SELECT device_id, profile, agent_version, last_seen, uptime_s, models, counters, telemetry, "
                "samples_received FROM devices"):
            models = tuple((m["name"], m["version"], m["digest"]) for m in json.loads(models))
            self._devices[device_id] = _Device(profile, agent, uptime, seen, models, json.loads(counters),
                                               json.loads(telemetry), received)
        for device_id, t in db.execute("SELECT device_id, unix_time FROM samples ORDER BY device_id, unix_time"):
            if (d := self._devices.get(device_id)) is not None:
                d.times.append(t)
        for device_id, d in self._devices.items():
            if len(d.times) > KEEP_SAMPLES:      # a window written by an older or interrupted run
                self._deletes += [(device_id, t) for t in d.times[:-KEEP_SAMPLES]]
                del d.times[:-KEEP_SAMPLES]
            d.newest = d.times[-1] if d.times else -math.inf
        for device_id, t, name, digest in db.execute(
                "SELECT device_id, unix_time, name, digest FROM rollbacks ORDER BY device_id, unix_time, name, digest"):
            if (d := self._devices.get(device_id)) is not None:
                d.rollbacks.append((t, name, digest))
                del d.rollbacks[:-KEEP_ROLLBACKS]
        log.info("fleet registry: %d devices from %s", len(self._devices), self.state.path)

    # --- heartbeats (memory) -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._devices)

    def last_seen(self) -> dict[str, float]:
        return {device_id: d.last_seen for device_id, d in list(self._devices.items())}

    def active(self, since: float) -> int:
        """Devices whose last heartbeat came at or after `since`."""
        return sum(d.last_seen >= since for d in list(self._devices.values()))

    def heartbeat(self, r: fleet_pb.HeartbeatRequest, now: float) -> int:
        """Record a (validated) heartbeat; returns how many of its samples were new."""
        d = self._devices.get(r.device_id)
        if d is None:
            if len(self._devices) >= self.max_devices:
                raise TooManyDevices(f"device_id: the fleet registry already holds {self.max_devices} devices; "
                                     "`cloud-service devices --forget ID` removes retired ones")
            d = self._devices[r.device_id] = _Device()
        d.profile, d.agent_version, d.uptime_s, d.last_seen = r.profile, r.agent_version, r.uptime_s, now
        if (models := tuple((m.name, m.version, m.digest) for m in r.models)) != d.models:
            d.models = models
            d.models_json = json.dumps([{"name": n, "version": v, "digest": g} for n, v, g in models])
        d.counters = dict(r.counters)
        new = self._add_samples(r.device_id, d, r.samples) if r.samples else 0
        if r.rollbacks:
            self._add_rollbacks(r.device_id, d, r.rollbacks)
        self._dirty.add(r.device_id)
        return new

    def _add_samples(self, device_id: str, d: _Device, samples) -> int:
        """A sample already held (a resend) or older than a full window is not new."""
        new, times = 0, d.times
        for s in samples:
            t = s.unix_time
            i = bisect_left(times, t)
            if (i < len(times) and times[i] == t) or (i == 0 and len(times) >= KEEP_SAMPLES):
                continue
            times.insert(i, t)
            values = self._inserts[device_id, t] = dict(s.values)
            if len(times) > KEEP_SAMPLES and self._inserts.pop(gone := (device_id, times.pop(0)), None) is None:
                self._deletes.append(gone)              # written already (an unwritten one is just dropped)
            if t > d.newest:
                d.newest, d.telemetry = t, values
            new += 1
        d.samples_received += new
        return new

    def _add_rollbacks(self, device_id: str, d: _Device, rollbacks) -> None:
        """The newest KEEP_ROLLBACKS are kept; a resent one (same name, digest, unix_time) counts once."""
        new = []
        for rb in rollbacks:
            key = (rb.unix_time, rb.name, rb.digest)
            i = bisect_left(d.rollbacks, key)
            if (i < len(d.rollbacks) and d.rollbacks[i] == key) or (i == 0 and len(d.rollbacks) >= KEEP_ROLLBACKS):
                continue
            insort(d.rollbacks, key)
            del d.rollbacks[:-KEEP_ROLLBACKS]
            self._rollbacks.append((device_id, rb.unix_time, rb.name, rb.version, rb.digest, rb.reason,
                                    rb.restored_version))
            new.append(rb)
        if new:                                          # one line a heartbeat, however many it brought
            rb = max(new, key=lambda r: r.unix_time)
            log.warning("device %s rolled back %s version %s (restored %s): %s%s", device_id, rb.name, rb.version,
                        rb.restored_version or "none", rb.reason[:200],
                        f" (and {len(new) - 1} more)" if len(new) > 1 else "")

    # --- writing -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the flusher (call on the running event loop)."""
        if self._task is None:
            self._stopping = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while not self._stopping.is_set():       # never cancelled mid-write: close() sets _stopping
            try:
                await asyncio.wait_for(self._stopping.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
            await self.flush()

    async def flush(self) -> None:
        """Write what changed since the last flush, off the event loop: one transaction, or one per
        MAX_FLUSH_SAMPLES samples after an outage (devices resending their buffers). A failed write
        is logged and retried at the next flush; it never stops heartbeats."""
        async with self._flush_lock:
            while any(batch := self._take()):
                try:
                    await asyncio.to_thread(self._write, *batch)
                except (sqlite3.Error, OSError, ValueError) as err:
                    log.error("fleet registry: cannot write %s (%s); retrying in %.0f s", self.state.path, err,
                              self.flush_s)
                    self._requeue(*batch)
                    return
                if len(batch[1]) < MAX_FLUSH_SAMPLES:
                    return

    def _take(self):
        rows = [self._devices[i].row(i) for i in self._dirty if i in self._devices]
        if len(self._inserts) <= MAX_FLUSH_SAMPLES:
            inserts, self._inserts = self._inserts, {}
        else:                                            # the oldest first; the rest in the next transaction
            inserts = {k: self._inserts.pop(k) for k in list(islice(self._inserts, MAX_FLUSH_SAMPLES))}
        batch = (rows, inserts, self._deletes, self._rollbacks)
        self._dirty, self._deletes, self._rollbacks = set(), [], []
        return batch

    def _requeue(self, rows, inserts, deletes, rollbacks) -> None:
        self._dirty.update(row[0] for row in rows)
        evicted = {k for k in self._deletes if k in inserts}     # left their window while the write failed
        self._deletes = [k for k in deletes + self._deletes if k not in evicted]
        self._inserts = {**{k: v for k, v in inserts.items() if k not in evicted}, **self._inserts}
        self._rollbacks[:0] = rollbacks
        if (extra := len(self._inserts) - MAX_PENDING_SAMPLES) > 0:
            log.error("fleet registry: dropped %d unwritten samples (the database is not writable)", extra)
            for k in list(islice(self._inserts, extra)):
                del self._inserts[k]

    def _write(self, rows, inserts, deletes, rollbacks) -> None:
        started = time.perf_counter()
        if self._writer is None:
            self._writer = self.state.connect()
        dumps, as_json = json.dumps, {}                 # id(values) -> JSON: telemetry is a sample's values
        samples = [(i, t, as_json.setdefault(id(values), dumps(values))) for (i, t), values in inserts.items()]
        with self._writer as db:
            db.executemany(
                "INSERT INTO devices (device_id, profile, agent_version, last_seen, uptime_s, models, counters, "
                "telemetry, samples_received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE "
                "SET profile = excluded.profile, agent_version = excluded.agent_version, last_seen = excluded.last_seen, "
                "uptime_s = excluded.uptime_s, models = excluded.models, counters = excluded.counters, "
                "telemetry = excluded.telemetry, samples_received = excluded.samples_received",
                [(i, p, a, seen, up, models, dumps(counters), as_json.get(id(telemetry)) or dumps(telemetry), n)
                 for i, p, a, seen, up, models, counters, telemetry, n in rows])
            db.executemany("INSERT OR REPLACE INTO samples (device_id, unix_time, vals) VALUES (?, ?, ?)", samples)
            db.executemany("DELETE FROM samples WHERE device_id = ? AND unix_time = ?", deletes)
            if rollbacks:
                db.executemany("INSERT OR IGNORE INTO rollbacks (device_id, unix_time, name, version, digest, reason, "
                               "restored_version) VALUES (?, ?, ?, ?, ?, ?, ?)", rollbacks)
                db.executemany(
                    "DELETE FROM rollbacks WHERE device_id = ?1 AND (unix_time, name, digest) NOT IN (SELECT "
                    "unix_time, name, digest FROM rollbacks WHERE device_id = ?1 "
                    f"ORDER BY unix_time DESC, name DESC, digest DESC LIMIT {KEEP_ROLLBACKS})",
                    [(i,) for i in {row[0] for row in rollbacks}])
        seconds = time.perf_counter() - started
        self.last_flush = {"seconds": seconds, "devices": len(rows), "samples": len(inserts)}
        if seconds > SLOW_FLUSH_S and time.monotonic() > self._quiet_until:      # at most once a minute
            self._quiet_until = time.monotonic() + 60
            log.warning("fleet registry: a flush of %d devices, %d samples took %.2f s (the server's core is "
                        "busy, or the disk slow)", len(rows), len(inserts), seconds)

    async def close(self) -> None:
        """Stop the flusher and write what is pending."""
        if self._task is not None:
            self._stopping.set()
            await self._task
            self._task = None
        await self.flush()
        for db in (self._writer, self._reader):
            if db is not None:
                db.close()
        self._writer = self._reader = None

    # --- reading (sync: call in a thread) ----------------------------------------------------
    def _read(self, fn, *args):
        try:
            with self._read_lock:
                if self._reader is None:
                    self._reader = self.state.connect()
                return fn(self._reader, *args)
        except (sqlite3.Error, ValueError) as err:
            log.error("fleet registry: cannot read %s: %s", self.state.path, err)
            raise Unavailable("the cloud's fleet registry cannot be read right now; retry later") from None

    def list_devices(self, device_id: str = "", include_samples: bool = False) -> list[dict]:
        """What the database holds (flush first to include the latest heartbeats)."""
        return self._read(read_devices, device_id, include_samples)

    def pinned(self, model: str, device_id: str) -> Pin | None:
        return self._read(pinned_version, model, device_id)


# --- the database: reads ---------------------------------------------------------------------
def read_devices(db, device_id: str = "", include_samples: bool = False) -> list[dict]:
    """One dict per device, sorted by device_id, keyed like fleet_pb.DeviceStatus's fields
    (fleet_pb.DeviceStatus(**d) builds the message): device_id, group, profile, agent_version,
    last_seen_unix_time, uptime_s, models, counters, telemetry, samples_received, rollbacks (the
    newest KEEP_ROLLBACKS, oldest first), pins (model -> version in effect), samples (with
    include_samples: {unix_time, values}, oldest first)."""
    where, args = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
    db.execute("BEGIN")                  # one snapshot while the server writes
    try:
        devices = {}
        for i, profile, agent, seen, uptime, models, counters, telemetry, received in db.execute(
                "SELECT device_id, profile, agent_version, last_seen, uptime_s, models, counters, telemetry, "
                f"samples_received FROM devices {where} ORDER BY device_id", args):
            devices[i] = dict(device_id=i, group="", profile=profile, agent_version=agent, last_seen_unix_time=seen,
                              uptime_s=uptime, models=json.loads(models), counters=json.loads(counters),
                              telemetry=json.loads(telemetry), samples_received=received, rollbacks=[], pins={})
            if include_samples:
                devices[i]["samples"] = []
        for i, *rb in db.execute("SELECT device_id, name, version, digest, reason, unix_time, restored_version "
                                 f"FROM rollbacks {where} ORDER BY device_id, unix_time, name, digest", args):
            if i in devices:
                devices[i]["rollbacks"].append(dict(zip(("name", "version", "digest", "reason", "unix_time",
                                                         "restored_version"), rb)))
        for i, t, values in (db.execute(f"SELECT device_id, unix_time, vals FROM samples {where} "
                                        "ORDER BY device_id, unix_time", args) if include_samples else ()):
            if i in devices:
                devices[i]["samples"].append({"unix_time": t, "values": json.loads(values)})
        groups = dict(db.execute("SELECT device_id, name FROM groups"))
        pins = db.execute("SELECT model, target_kind, target, version FROM pins "
                          "ORDER BY target_kind = 'device', model").fetchall()      # group pins first
    finally:
        db.rollback()
    for i, d in devices.items():
        d["group"] = groups.get(i, "")
        for model, kind, target, version in pins:
            if target == (i if kind == "device" else d["group"] or None):
                d["pins"][model] = version                                           # the device's own wins
    return list(devices.values())


def pinned_version(db, model: str, device_id: str) -> Pin | None:
    """The version `device_id` is pinned to for `model`: its own pin, else its group's, else None."""
    row = db.execute(
        "SELECT version, target_kind, target FROM pins WHERE model = ?1 AND ((target_kind = 'device' AND target = ?2) "
        "OR (target_kind = 'group' AND target = (SELECT name FROM groups WHERE device_id = ?2))) "
        "ORDER BY target_kind = 'device' DESC LIMIT 1", (model, device_id)).fetchone()
    return Pin(row[0], f"{row[1]} '{row[2]}'") if row else None


def read_rollout(db) -> dict:
    """{"pins": [{model, target_kind, target, version, devices}], "groups": {name: [device_id]}}."""
    groups = {}
    for device_id, name in db.execute("SELECT device_id, name FROM groups ORDER BY name, device_id"):
        groups.setdefault(name, []).append(device_id)
    pins = [dict(model=m, target_kind=k, target=t, version=v, devices=len(groups.get(t, ())) if k == "group" else 1)
            for m, k, t, v in db.execute("SELECT model, target_kind, target, version FROM pins "
                                         "ORDER BY model, target_kind DESC, target")]
    return {"pins": pins, "groups": groups}


# --- the database: the operators' changes ---------------------------------------------------
def check_name(what: str, value: str) -> str:
    if not DEVICE_ID.match(value):
        raise ValueError(f"{what} '{value[:80]}' must match {DEVICE_ID.pattern}")
    return value


def set_pin(db, model: str, target_kind: str, target: str, version: str) -> None:
    """Pin `model` to `version` for a device or a group (replaces an earlier pin of that target)."""
    if target_kind not in ("device", "group"):
        raise ValueError(f"target_kind '{target_kind}' must be 'device' or 'group'")
    check_name(target_kind, target)
    if not VERSION.match(version):
        raise ValueError(f"version '{version[:80]}' must be a number (a version folder)")
    with db:
        db.execute("INSERT OR REPLACE INTO pins (model, target_kind, target, version) VALUES (?, ?, ?, ?)",
                   (model, target_kind, target, version))


def remove_pin(db, model: str, target_kind: str, target: str) -> bool:
    with db:
        return db.execute("DELETE FROM pins WHERE model = ? AND target_kind = ? AND target = ?",
                          (model, target_kind, target)).rowcount > 0


def set_group(db, device_ids, group: str) -> None:
    """Put devices in `group` (moving them from another); "" takes them out of any group."""
    for device_id in device_ids:
        check_name("device id", device_id)
    if group:
        check_name("group", group)
    with db:
        if group:
            db.executemany("INSERT OR REPLACE INTO groups (device_id, name) VALUES (?, ?)",
                           [(i, group) for i in device_ids])
        else:
            db.executemany("DELETE FROM groups WHERE device_id = ?", [(i,) for i in device_ids])


def forget_devices(db, device_ids) -> int:
    """Remove devices' status, samples and rollbacks (their group and pins stay). A running server
    still counts them until it restarts, and a device that heartbeats again comes back."""
    with db:
        for table in ("samples", "rollbacks"):
            db.executemany(f"DELETE FROM {table} WHERE device_id = ?", [(i,) for i in device_ids])
        return sum(db.execute("DELETE FROM devices WHERE device_id = ?", (i,)).rowcount for i in device_ids)
