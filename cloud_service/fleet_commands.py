"""`cloud-service devices` and `cloud-service rollout`: the fleet registry's commands
(cloud_service/registry.py). They read and write the state database directly, so they work with
the server running or not; a running server flushes heartbeats every second, and applies a pin or
a group change to the next manifest a device asks for.

    cloud-service devices --repository DIR [--device-id ID] [--samples] [--json]
        a table (id, group, profile, agent, last seen, models, rollbacks, key telemetry);
        --json: one JSON object per device per line, keyed like fleet.proto's DeviceStatus
        (with --samples: "samples", the kept window, oldest first)
    cloud-service devices --repository DIR --forget ID [--forget ID ...]     (retired devices)
    cloud-service rollout pin   --repository DIR --model M --version V (--device ID | --group G)
    cloud-service rollout unpin --repository DIR --model M (--device ID | --group G)
    cloud-service rollout group --repository DIR (--group G | --remove) DEVICE_ID [DEVICE_ID ...]
    cloud-service rollout list  --repository DIR [--json]
        --json: {"pins": [{model, target_kind, target, version, devices}], "groups": {name: [ids]}}

A device asking for version "" gets its own pin, else its group's pin, else the highest version.
"""
import json
import math
import sqlite3
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

from cloud_service import registry
from cloud_service.config import ConfigError
from cloud_service.repository import MODEL_NAME, version_dirs
from cloud_service.state import StateStore

KEY_TELEMETRY = (("cpu_percent", "cpu {:.0f}%"), ("temperature_c", "{:.0f}C"),
                 ("memory_available_mb", "mem {:.0f}M"), ("battery_percent", "bat {:.0f}%"))


def add_commands(commands) -> None:
    """Add this module's subcommands to the `cloud-service` parser."""
    devices = commands.add_parser("devices", help="the fleet: every device's last status (survives restarts)")
    devices.add_argument("--device-id", default="", help="only this device")
    devices.add_argument("--samples", action="store_true", help="also the kept telemetry samples (256 per device)")
    devices.add_argument("--json", action="store_true", help="one JSON object per device per line")
    devices.add_argument("--forget", action="append", metavar="DEVICE_ID",
                         help="remove a retired device's status, samples and rollbacks (repeatable)")
    devices.set_defaults(run=run_devices)
    rollout = commands.add_parser("rollout", help="staged rollout: pin devices or groups to a model version")
    actions = rollout.add_subparsers(dest="action", required=True)
    pin = actions.add_parser("pin", help="pin a device or a group to a version of a model")
    unpin = actions.add_parser("unpin", help="remove a pin: the device or group follows its group or the highest")
    for parser in (pin, unpin):
        parser.add_argument("--model", required=True, help="a model folder of the repository")
        if parser is pin:
            parser.add_argument("--version", required=True, help="one of its version folders")
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--device", help="a device id")
        target.add_argument("--group", help="a group name (see `rollout group`)")
    group = actions.add_parser("group", help="put devices in a rollout group, or take them out")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--group", help="the group (\"\" takes the devices out of theirs)")
    which.add_argument("--remove", action="store_true", help="take the devices out of their group")
    group.add_argument("device_ids", nargs="+", metavar="DEVICE_ID")
    listing = actions.add_parser("list", help="the pins and groups")
    listing.add_argument("--json", action="store_true", help='{"pins": [...], "groups": {...}}')
    for parser, run in ((devices, run_devices), (pin, run_pin), (unpin, run_unpin), (group, run_group),
                        (listing, run_list)):
        parser.add_argument("--repository", type=Path, required=True, help="the model repository the server serves")
        parser.set_defaults(run=run)


@contextmanager
def _connect(args, create: bool = False):
    """A connection to the repository's state database; its errors name the file."""
    if not args.repository.is_dir():
        raise ConfigError(f"--repository {args.repository}: no such folder")
    store = StateStore(args.repository, create=create)
    with closing(store.connect()) as db:
        try:
            yield db
        except (sqlite3.DatabaseError, json.JSONDecodeError) as err:
            raise ConfigError(f"{store.path}: cannot be read ({err}); restore a backup or move it away") from None


def _target(args) -> tuple[str, str]:
    kind, target = ("device", args.device) if args.device is not None else ("group", args.group)
    registry.check_name(f"--{kind}", target)
    return kind, target


def _check_version(root: Path, model: str, version: str) -> None:
    """The pin must name a model and version the repository has: the folder is right here."""
    if not MODEL_NAME.match(model) or model.startswith("."):
        raise ValueError(f"--model '{model[:80]}' must be letters, digits, '_', '.', '-' (a repository folder)")
    if not (root / model).is_dir():
        raise ValueError(f"--model: '{model}' is not a model folder of {root}")
    if not registry.VERSION.match(version):
        raise ValueError(f"--version '{version[:80]}' must be a number (a version folder)")
    versions = [p.name for p in version_dirs(root / model)]
    if version not in versions:
        raise ValueError(f"--version: model '{model}' has no version '{version}' in {root}; "
                         f"it has {', '.join(versions) or 'none'}")


# --- devices --------------------------------------------------------------------------------
def _finite(value):
    return value if math.isfinite(value) else None          # JSON has no NaN or Infinity


def _json_ready(device: dict) -> dict:
    device["telemetry"] = {k: _finite(v) for k, v in device["telemetry"].items()}
    for s in device.get("samples", ()):
        s["values"] = {k: _finite(v) for k, v in s["values"].items()}
    return device


def _age(seconds: float) -> str:
    if seconds < 0:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _telemetry(values: dict) -> str:
    shown = [fmt.format(values[k]) for k, fmt in KEY_TELEMETRY if k in values and math.isfinite(values[k])]
    return " ".join(shown)


def _print_table(rows) -> None:
    widths = [max(len(str(line[i])) for line in rows) for i in range(len(rows[0]))]
    for line in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())


def run_devices(args) -> int:
    if args.forget:
        for device_id in args.forget:
            registry.check_name("--forget", device_id)
        with _connect(args) as db:
            removed = registry.forget_devices(db, args.forget)
        print(f"forgot {removed} of {len(args.forget)} devices (their groups and pins stay; a running server "
              "counts them until it restarts, and a device that heartbeats again comes back)")
        return 0
    if args.device_id:
        registry.check_name("--device-id", args.device_id)
    with _connect(args) as db:
        devices = registry.read_devices(db, args.device_id, args.samples)
    if args.json:
        for device in devices:
            print(json.dumps(_json_ready(device), allow_nan=False))
        return 0
    now = time.time()
    rows = [("DEVICE", "GROUP", "PROFILE", "AGENT", "LAST SEEN", "MODELS", "ROLLBACKS", "TELEMETRY")]
    for d in devices:
        models = ", ".join(f"{m['name']}@{m['version']}" for m in d["models"])
        rows.append((d["device_id"], d["group"] or "-", d["profile"] or "-", d["agent_version"] or "-",
                     _age(now - d["last_seen_unix_time"]), models or "-", len(d["rollbacks"]),
                     _telemetry(d["telemetry"])))
    _print_table(rows)
    for d in devices:
        for s in d.get("samples", ()):
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["unix_time"]))
            print(f"  {d['device_id']}  {when}  " + " ".join(f"{k}={v:g}" for k, v in sorted(s["values"].items())))
    print(f"{len(devices)} devices", file=sys.stderr)
    return 0


# --- rollout --------------------------------------------------------------------------------
def run_pin(args) -> int:
    kind, target = _target(args)
    _check_version(args.repository, args.model, args.version)
    with _connect(args, create=True) as db:
        registry.set_pin(db, args.model, kind, target, args.version)
        rollout = registry.read_rollout(db)
        seen = bool(registry.read_devices(db, target)) if kind == "device" else True
    members = len(rollout["groups"].get(target, ())) if kind == "group" else 1
    print(f"pinned {args.model} to version {args.version} for {kind} '{target}'"
          + (f" ({members} devices)" if kind == "group" else ""))
    if kind == "group" and not members:
        print(f"note: group '{target}' has no devices yet (`cloud-service rollout group --group {target} ID ...`)",
              file=sys.stderr)
    if not seen:
        print(f"note: device '{target}' has not sent a heartbeat yet", file=sys.stderr)
    return 0


def run_unpin(args) -> int:
    kind, target = _target(args)
    with _connect(args) as db:
        removed = registry.remove_pin(db, args.model, kind, target)
    if not removed:
        raise ValueError(f"{kind} '{target}' has no pin for model '{args.model}' (see `cloud-service rollout list`)")
    print(f"unpinned {args.model} for {kind} '{target}'")
    return 0


def run_group(args) -> int:
    group = "" if args.remove else args.group
    with _connect(args, create=True) as db:
        registry.set_group(db, args.device_ids, group)
    print(f"{len(args.device_ids)} devices " + (f"in group '{group}'" if group else "out of their groups"))
    return 0


def run_list(args) -> int:
    with _connect(args) as db:
        rollout = registry.read_rollout(db)
    if args.json:
        print(json.dumps(rollout))
        return 0
    rows = [("MODEL", "TARGET", "VERSION", "DEVICES")]
    rows += [(p["model"], f"{p['target_kind']} {p['target']}", p["version"], p["devices"]) for p in rollout["pins"]]
    _print_table(rows)
    print()
    _print_table([("GROUP", "DEVICES")] + [(g, " ".join(ids)) for g, ids in rollout["groups"].items()])
    return 0
