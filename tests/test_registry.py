"""The fleet registry against real `cloud-service serve` processes: devices, counters, sample
windows and rollbacks survive a restart (ListDevices and `cloud-service devices --json` agree),
staged rollout pins change what a device credential's manifest resolves to on a running server,
and bad input (a damaged database, a pin to a missing version, bad rollbacks) is refused by name.

    .venv/bin/python -m pytest -q tests/test_registry.py
"""
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import grpc
import pytest

from cloud_service import registry
from cloud_service.caller import Caller, acting_as
from cloud_service.cli import main as cli_main
from cloud_service.fleet import FleetService
from cloud_service.metrics import Metrics
from cloud_service.state import StateStore, state_path
from edgefold_proto.fleet import FLEET_METHODS, fleet_pb
from models import write
from server_process import ServerProcess

T0 = 1_700_000_000.0


def make_repo(root):
    """A device package `stages` with versions 1 and 2 (a config.toml and one file each)."""
    write(root / "stages" / "config.toml", 'backend = "device"\n')
    for version in ("1", "2"):
        write(root / "stages" / version / "chain.json", json.dumps({"version": version}))
    return root


class Fleet:
    """Raw Fleet RPCs (no client-side checks), optionally with a bearer token."""

    def __init__(self, address, token=None):
        self.channel = grpc.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def call(self, rpc, **fields):
        method = FLEET_METHODS[rpc]
        make = self.channel.unary_stream if method.kind == "server-streaming" else self.channel.unary_unary
        call = make(method.path, request_serializer=method.request.SerializeToString,
                    response_deserializer=method.response.FromString)
        reply = call(method.request(**fields), timeout=10, metadata=self.metadata)
        return list(reply) if method.kind == "server-streaming" else reply

    def beat(self, device_id, **fields):
        return self.call("Heartbeat", device_id=device_id, **fields).accepted_samples

    def devices(self, **fields):
        return list(self.call("ListDevices", **fields).devices)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.channel.close()


def samples(times, **values):
    return [fleet_pb.TelemetrySample(unix_time=t, values={k: v + t - T0 for k, v in values.items()}) for t in times]


def rollback(i, reason="smoke inference failed"):
    return fleet_pb.Rollback(name="stages", version=str(10 + i), digest=f"{i:064x}", reason=reason,
                             unix_time=T0 + i, restored_version="1")


def cli(*argv):
    """`cloud-service ...` in a subprocess: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "cloud_service.cli", *argv], capture_output=True, text=True,
                          timeout=60)
    return done.returncode, done.stdout, done.stderr


def devices_json(repo, *extra):
    status, out, err = cli("devices", "--repository", str(repo), "--json", *extra)
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


def expect_error(code, fragment, fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details(), err.value.details()


# --- persistence ----------------------------------------------------------------------------
def test_registry_survives_a_restart(tmp_path):
    repo = make_repo(tmp_path / "repo")
    cloud = ServerProcess(repo)
    try:
        with Fleet(cloud.address) as fleet:
            model = fleet_pb.InstalledModel(name="stages", version="2", digest="ab" * 32)
            assert fleet.beat("pi-1", profile="raspberry_pi_5", agent_version="0.3.0", uptime_s=12.5, models=[model],
                              counters={"requests_local": 7}, samples=samples([T0, T0 + 1], cpu_percent=10.0),
                              rollbacks=[rollback(0), rollback(1)]) == 2
            assert fleet.beat("pi-1", profile="raspberry_pi_5", agent_version="0.3.0", models=[model],
                              counters={"requests_local": 9}, samples=samples([T0 + 1, T0 + 2], cpu_percent=10.0),
                              rollbacks=[rollback(1)]) == 1                       # resent sample and rollback
            assert fleet.beat("pi-2", samples=samples([T0 + i for i in range(300)], temperature_c=40.0)) == 300
            assert fleet.beat("pi-3", rollbacks=[rollback(i) for i in range(20)]) == 0   # the newest 16 are kept
            before = fleet.devices(include_samples=True)
        listed = devices_json(repo, "--samples")                                  # while the server runs
        assert cloud.terminate() == 0
    finally:
        cloud.kill()

    by_id = {d.device_id: d for d in before}
    pi1, pi2, pi3 = by_id["pi-1"], by_id["pi-2"], by_id["pi-3"]
    assert (pi1.profile, pi1.agent_version, pi1.uptime_s, pi1.samples_received) == ("raspberry_pi_5", "0.3.0", 0.0, 3)
    assert dict(pi1.counters) == {"requests_local": 9} and dict(pi1.telemetry) == {"cpu_percent": 12.0}
    assert [s.unix_time for s in pi1.samples] == [T0, T0 + 1, T0 + 2]
    assert [(r.version, r.unix_time, r.restored_version) for r in pi1.rollbacks] == [("10", T0, "1"), ("11", T0 + 1, "1")]
    assert len(pi2.samples) == 256 and pi2.samples[0].unix_time == T0 + 44 and pi2.samples_received == 300
    assert [r.version for r in pi3.rollbacks] == [str(10 + i) for i in range(4, 20)]
    assert [d["device_id"] for d in listed] == ["pi-1", "pi-2", "pi-3"]
    assert [s["unix_time"] for s in listed[1]["samples"]] == [s.unix_time for s in pi2.samples]
    assert listed[0]["counters"] == {"requests_local": 9} and len(listed[2]["rollbacks"]) == 16

    cloud = ServerProcess(repo)
    try:
        with Fleet(cloud.address) as fleet:
            assert fleet.devices(include_samples=True) == before                  # the same, field by field
            assert devices_json(repo, "--samples") == listed
            assert fleet.beat("pi-1", samples=samples([T0, T0 + 2], cpu_percent=1.0)) == 0    # resent after restart
            assert fleet.beat("pi-1", samples=samples([T0 + 3], cpu_percent=1.0)) == 1
            assert fleet.beat("pi-2", samples=samples([T0 + i for i in range(300)], temperature_c=0.0)) == 0
            assert fleet.beat("pi-2", samples=samples([T0 + 300, T0 + 301], temperature_c=0.0)) == 2
            assert fleet.beat("pi-3", rollbacks=[rollback(19), rollback(2)]) == 0    # held, and older than 16
            after = {d.device_id: d for d in fleet.devices(include_samples=True)}
    finally:
        cloud.terminate()
    assert after["pi-1"].samples_received == 4 and after["pi-1"].profile == ""     # a heartbeat replaces the status
    kept = [s.unix_time for s in after["pi-2"].samples]
    assert len(kept) == 256 and kept[0] == T0 + 46 and kept[-1] == T0 + 301       # the window stays bounded
    assert after["pi-3"].rollbacks == pi3.rollbacks
    with closing(StateStore(repo).connect()) as db:
        assert db.execute("SELECT count(*) FROM samples WHERE device_id = 'pi-2'").fetchone()[0] == 256
        assert db.execute("SELECT count(*) FROM rollbacks WHERE device_id = 'pi-3'").fetchone()[0] == 16


def test_devices_table_and_forget(tmp_path):
    repo = make_repo(tmp_path / "repo")
    cloud = ServerProcess(repo)
    try:
        with Fleet(cloud.address) as fleet:
            fleet.beat("kitchen-1", profile="raspberry_pi_5", agent_version="0.3.0",
                       models=[fleet_pb.InstalledModel(name="stages", version="2")],
                       samples=[fleet_pb.TelemetrySample(unix_time=time.time(),
                                                         values={"cpu_percent": 12.0, "temperature_c": 51.0})],
                       rollbacks=[rollback(0)])
            fleet.beat("garage-2", samples=[fleet_pb.TelemetrySample(unix_time=time.time(),
                                                                     values={"cpu_percent": float("nan")})])
            fleet.devices()                                                       # flushed
        assert cli("rollout", "group", "--repository", str(repo), "--group", "canary", "kitchen-1")[0] == 0
        status, out, _ = cli("devices", "--repository", str(repo))
        assert status == 0
        header, garage, kitchen = out.splitlines()
        assert header.split()[:4] == ["DEVICE", "GROUP", "PROFILE", "AGENT"]
        for text in ("kitchen-1", "canary", "raspberry_pi_5", "0.3.0", "stages@2", "cpu 12%", "51C", "s ago"):
            assert text in kitchen, (text, kitchen)
        assert garage.startswith("garage-2") and "cpu" not in garage
        assert devices_json(repo, "--device-id", "garage-2")[0]["telemetry"] == {"cpu_percent": None}   # valid JSON

        status, out, _ = cli("devices", "--repository", str(repo), "--forget", "garage-2")
        assert status == 0 and "forgot 1 of 1" in out
        assert [d["device_id"] for d in devices_json(repo)] == ["kitchen-1"]
    finally:
        cloud.terminate()
    cloud = ServerProcess(repo)                                                   # gone after a restart too
    try:
        with Fleet(cloud.address) as fleet:
            assert [d.device_id for d in fleet.devices()] == ["kitchen-1"]
    finally:
        cloud.terminate()


# --- staged rollout --------------------------------------------------------------------------
def add_token(repo, role, device_id=None):
    argv = ["token", "add", "--repository", str(repo), "--role", role, "--json"]
    status, out, err = cli(*argv, *(["--device-id", device_id] if device_id else []))
    assert status == 0, err
    return json.loads(out)["token"]


def rollout(repo, *argv):
    status, out, err = cli("rollout", argv[0], "--repository", str(repo), *argv[1:])
    assert status == 0, err
    return out


def test_rollout_pins_on_a_running_server(tmp_path):
    repo = make_repo(tmp_path / "repo")
    write(repo / "stages" / "3" / "chain.json", "{}")
    StateStore(repo)
    tokens = {d: add_token(repo, "device", d) for d in ("pi-1", "pi-2", "pi-3")}
    operator = add_token(repo, "operator")
    cloud = ServerProcess(repo)
    try:
        def version(device):
            with Fleet(cloud.address, tokens[device]) as fleet:
                return fleet.call("ModelManifest", name="stages").version

        assert [version(d) for d in tokens] == ["3", "3", "3"]
        rollout(repo, "pin", "--model", "stages", "--version", "1", "--device", "pi-1")
        assert [version(d) for d in tokens] == ["1", "3", "3"]                   # no restart
        rollout(repo, "group", "--group", "canary", "pi-2", "pi-3")
        rollout(repo, "pin", "--model", "stages", "--version", "2", "--group", "canary")
        assert [version(d) for d in tokens] == ["1", "2", "2"]
        rollout(repo, "pin", "--model", "stages", "--version", "1", "--device", "pi-3")   # its own pin wins
        assert [version(d) for d in tokens] == ["1", "2", "1"]
        rollout(repo, "group", "--remove", "pi-2")
        assert version("pi-2") == "3"

        with Fleet(cloud.address, tokens["pi-1"]) as fleet:                      # downloads follow the pin too
            chunks = fleet.call("DownloadModelFile", name="stages", path="1/chain.json")
            assert json.loads(b"".join(c.data for c in chunks)) == {"version": "1"}
            expect_error(grpc.StatusCode.NOT_FOUND, "'3/chain.json'", fleet.call, "DownloadModelFile",
                         name="stages", path="3/chain.json")
            assert fleet.call("ModelManifest", name="stages", version="3").version == "3"   # asked by name
            fleet.beat("pi-1")
        with Fleet(cloud.address, operator) as fleet:
            assert fleet.call("ModelManifest", name="stages").version == "3"     # operators get the highest
            fleet.call("Heartbeat", device_id="pi-3")
            status = {d.device_id: d for d in fleet.devices()}
            assert dict(status["pi-1"].pins) == {"stages": "1"} and status["pi-1"].group == ""
            assert dict(status["pi-3"].pins) == {"stages": "1"} and status["pi-3"].group == "canary"

        rollout(repo, "pin", "--model", "stages", "--version", "3", "--device", "pi-1")
        shutil.rmtree(repo / "stages" / "3")                                     # the pinned version went away
        with Fleet(cloud.address, tokens["pi-1"]) as fleet:
            expect_error(grpc.StatusCode.NOT_FOUND, "pinned to version '3' for device 'pi-1'",
                         fleet.call, "ModelManifest", name="stages")
        rollout(repo, "unpin", "--model", "stages", "--device", "pi-1")
        assert version("pi-1") == "2"
        listed = json.loads(rollout(repo, "list", "--json"))
        assert listed["groups"] == {"canary": ["pi-3"]}
        assert [(p["target_kind"], p["target"], p["version"], p["devices"]) for p in listed["pins"]] == \
            [("group", "canary", "2", 1), ("device", "pi-3", "1", 1)]
    finally:
        cloud.terminate()


def test_pin_resolution_in_process(tmp_path):
    repo = make_repo(tmp_path / "repo")
    fleet = FleetService(repo, Metrics())
    with closing(fleet.registry.state.connect()) as db:
        registry.set_group(db, ["pi-1", "pi-2"], "canary")
        registry.set_pin(db, "stages", "group", "canary", "1")
        registry.set_pin(db, "stages", "device", "pi-2", "9")
    assert fleet.manifest("stages").version == "2"                                # an open server: the highest
    with acting_as(Caller("operator")):
        assert fleet.manifest("stages").version == "2"
    with acting_as(Caller("device", "pi-1")):
        assert fleet.manifest("stages").version == "1" and fleet.manifest("stages", "2").version == "2"
    with acting_as(Caller("device", "pi-3")):
        assert fleet.manifest("stages").version == "2"
    with acting_as(Caller("device", "pi-2")), pytest.raises(Exception) as err:
        fleet.manifest("stages")
    assert "pinned to version '9' for device 'pi-2'" in str(err.value)


@pytest.mark.parametrize("argv,fragment", [
    (["pin", "--model", "nope", "--version", "1", "--device", "pi-1"], "--model: 'nope' is not a model folder"),
    (["pin", "--model", "stages", "--version", "7", "--device", "pi-1"], "has no version '7'"),
    (["pin", "--model", "stages", "--version", "x", "--group", "g"], "--version 'x' must be a number"),
    (["pin", "--model", "../etc", "--version", "1", "--group", "g"], "--model '../etc'"),
    (["pin", "--model", "stages", "--version", "1", "--group", "bad group"], "--group 'bad group'"),
    (["unpin", "--model", "stages", "--device", "pi-1"], "has no pin"),
    (["group", "--group", "canary", "pi/1"], "device id 'pi/1'"),
])
def test_rollout_refuses_bad_input(tmp_path, capsys, argv, fragment):
    repo = make_repo(tmp_path / "repo")
    StateStore(repo)
    assert cli_main(["rollout", argv[0], "--repository", str(repo), *argv[1:]]) == 2
    assert fragment in capsys.readouterr().err
    with closing(StateStore(repo).connect()) as db:
        assert db.execute("SELECT count(*) FROM pins").fetchone()[0] == 0


# --- bad input ----------------------------------------------------------------------------
def damage(kind, path):
    if kind == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif kind == "truncated":
        with closing(sqlite3.connect(path)) as db, db:                         # pages past the header gone
            db.executemany("INSERT INTO samples VALUES (?, ?, '{}')", [("pi-1", float(i)) for i in range(5000)])
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2] + bytes(len(data) // 2))
    elif kind == "bad-row":
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("INSERT INTO devices (device_id, models) VALUES ('pi-1', '{not json')")
    elif kind == "foreign":
        path.unlink()
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE t (x)")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "bad-row", "foreign"])
def test_a_damaged_database_stops_the_server(tmp_path, kind):
    repo = make_repo(tmp_path / "repo")
    StateStore(repo)
    damage(kind, state_path(repo))
    status, out, err = cli("serve", "--repository", str(repo), "--host", "127.0.0.1", "--port", "0")
    assert status == 2 and str(state_path(repo)) in err, (status, out, err)
    assert "serving" not in out
    status, _, err = cli("devices", "--repository", str(repo), "--samples")
    assert status == 2 and str(state_path(repo)) in err, err


def test_bad_rollbacks_are_invalid_argument(tmp_path):
    repo = make_repo(tmp_path / "repo")
    cloud = ServerProcess(repo)
    try:
        with Fleet(cloud.address) as fleet:
            bad = fleet_pb.Rollback(name="stages", version="2", reason="x" * 513, unix_time=T0)
            for rollbacks, fragment in (([rollback(i) for i in range(65)], "rollbacks: 65 in one heartbeat"),
                                        ([rollback(0), bad], "rollbacks[1].reason: at most 512 characters"),
                                        ([fleet_pb.Rollback(name="n" * 129)], "rollbacks[0]: name"),
                                        ([fleet_pb.Rollback(unix_time=float("inf"))], "rollbacks[0].unix_time")):
                expect_error(grpc.StatusCode.INVALID_ARGUMENT, fragment, fleet.beat, "pi-9", rollbacks=rollbacks)
            assert fleet.devices() == []
            assert fleet.beat("pi-9", rollbacks=[rollback(i) for i in range(64)]) == 0    # at the limit: fine
    finally:
        cloud.terminate()


def test_the_registry_is_bounded(tmp_path):
    store = StateStore(make_repo(tmp_path / "repo"))
    fleet = registry.Registry(store, max_devices=2)
    for device_id in ("pi-1", "pi-2"):
        assert fleet.heartbeat(fleet_pb.HeartbeatRequest(device_id=device_id, samples=samples([T0])), T0) == 1
    with pytest.raises(registry.TooManyDevices, match="device_id: the fleet registry already holds 2 devices"):
        fleet.heartbeat(fleet_pb.HeartbeatRequest(device_id="pi-3"), T0)
    assert fleet.heartbeat(fleet_pb.HeartbeatRequest(device_id="pi-1", samples=samples([T0 + 1])), T0) == 1
    asyncio.run(fleet.close())                                                    # the last flush
    again = registry.Registry(store, max_devices=2)
    assert len(again) == 2 and again.last_seen() == {"pi-1": T0, "pi-2": T0}
    assert [d["samples_received"] for d in again.list_devices()] == [2, 1]


def test_flushes_in_chunks_and_retries_a_failed_write(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(registry, "MAX_FLUSH_SAMPLES", 100)
    fleet = registry.Registry(StateStore(make_repo(tmp_path / "repo")))
    written = fleet._write

    def failing(*batch):
        raise sqlite3.OperationalError("disk I/O error")

    async def scenario():
        assert fleet.heartbeat(fleet_pb.HeartbeatRequest(device_id="pi-1", samples=samples(
            [T0 + i for i in range(250)])), T0) == 250
        fleet._write = failing
        await fleet.flush()                                                       # nothing written, kept
        fleet._write = written
        assert fleet.heartbeat(fleet_pb.HeartbeatRequest(device_id="pi-1", samples=samples(
            [T0 + i for i in range(250, 300)])), T0) == 50                      # 44 leave the window unwritten
        await fleet.flush()                                                       # 3 transactions
        assert fleet.heartbeat(fleet_pb.HeartbeatRequest(device_id="pi-1", samples=samples([T0 + 300])), T0) == 1
        await fleet.close()

    asyncio.run(scenario())
    assert "cannot write" in caplog.text and "disk I/O error" in caplog.text
    (device,) = registry.Registry(StateStore(tmp_path / "repo")).list_devices(include_samples=True)
    assert [s["unix_time"] for s in device["samples"]] == [T0 + i for i in range(45, 301)]
    assert device["samples_received"] == 301
