"""`cloud-service token add|list|revoke`: the credential store's commands (cloud_service/credentials.py).

    cloud-service token add --repository DIR --role device --device-id pi-kitchen-1 [--note TEXT] [--json]
    cloud-service token list --repository DIR [--json]
    cloud-service token revoke --repository DIR ID

`add` prints the new token once (with --json: {"id": ..., "token": ...} and nothing else on stdout);
only its hash is kept. A running server picks up an added or revoked credential within a second.
"""
import json
import sys
import time
from pathlib import Path

from cloud_service.caller import ROLES
from cloud_service.config import ConfigError
from cloud_service.credentials import CredentialStore, problem
from cloud_service.state import StateStore

FLAGS = {"role": "--role", "device_id": "--device-id", "note": "--note"}


def add_commands(commands) -> None:
    """Add this module's subcommands to the `cloud-service` parser."""
    token = commands.add_parser("token", help="scoped credentials: add, list, revoke")
    actions = token.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a credential and print its token once")
    add.add_argument("--role", required=True, choices=ROLES,
                     help="app: inference; device: + manifests, downloads, its own heartbeats; operator: everything")
    add.add_argument("--device-id", help="the device a 'device' credential is bound to")
    add.add_argument("--note", default="", help="what it is for (shown by `token list`)")
    add.add_argument("--json", action="store_true", help='print {"id": ..., "token": ...}')
    listing = actions.add_parser("list", help="every credential (never a token or its hash)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = actions.add_parser("revoke", help="revoke a credential: refused by a running server within a second")
    revoke.add_argument("id", help="the credential id (the part of the token before the '.')")
    for parser, run in ((add, run_add), (listing, run_list), (revoke, run_revoke)):
        parser.add_argument("--repository", type=Path, required=True, help="the model repository the server serves")
        parser.set_defaults(run=run)


def _store(args, create: bool) -> CredentialStore:
    if not args.repository.is_dir():
        raise ConfigError(f"--repository {args.repository}: no such folder")
    return CredentialStore(StateStore(args.repository, create=create))


def run_add(args) -> int:
    if bad := problem(args.role, args.device_id, args.note):
        raise ValueError(f"{FLAGS[bad[0]]}: {bad[1]}")
    cid, token = _store(args, create=True).add(args.role, args.device_id, args.note)
    if args.json:
        print(json.dumps({"id": cid, "token": token}))
    else:
        bound = f", device {args.device_id}" if args.device_id else ""
        print(f"credential {cid} (role {args.role}{bound}): {token}")
        print("the token is shown only this once (only its hash is kept): store it as a secret", file=sys.stderr)
    return 0


def _when(unix_time) -> str:
    return "" if unix_time is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_time))


def run_list(args) -> int:
    rows = _store(args, create=False).list()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    columns = ("id", "role", "device_id", "created", "revoked", "note")
    table = [columns] + [(r["id"], r["role"], r["device_id"] or "", _when(r["created"]), _when(r["revoked"]),
                          r["note"]) for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
    return 0


def run_revoke(args) -> int:
    before = _store(args, create=False).revoke(args.id)
    print(f"credential {args.id} was already revoked at {_when(before)}" if before is not None
          else f"credential {args.id} revoked")
    return 0
