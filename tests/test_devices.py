"""Device profiles (bundled, broken, user folders), the probe, telemetry, `edge-runtime probe`, and
tensor-parallel shares from profiles.

    .venv/bin/python -m pytest -q tests/test_devices.py
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from devices import probe, telemetry
from devices.profiles import (PROFILE_DIR, ProfileError, load_profile, profile_names,
                              share_weights)
from edge_runtime import cli as edge_cli

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ["cloud-cpu", "cloud-gpu", "gap8-nano-drone", "jetson-nano", "orin-nano", "phone-midrange",
           "raspberry-pi-4", "raspberry-pi-5"]
GOOD = (PROFILE_DIR / "raspberry-pi-4.toml").read_text()


@pytest.fixture(autouse=True)
def no_user_profiles(monkeypatch):
    monkeypatch.delenv("EDGEFOLD_PROFILE_PATH", raising=False)


def uncommented_values(text: str) -> list[str]:
    """Value lines that no comment explains: the bundled files' convention is a comment (on its own
    line or after a value) that covers the values below it, up to a blank line or a table header."""
    bare, covered = [], False
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("["):
            covered = False
        elif "#" in s:
            covered = True
        elif not covered:
            bare.append(s)
    return bare


# --------------------------------------------------------------------------- profiles

def test_every_bundled_profile_validates():
    assert set(BUNDLED) <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert p.key == name and p.kind in ("edge", "cloud") and p.links
        assert p.fp32_gflops > 0 and p.memory_bandwidth_gbs > 0 and p.storage_read_mbs > 0
        assert uncommented_values((PROFILE_DIR / f"{name}.toml").read_text()) == [], name


@pytest.mark.parametrize("text, field", [
    (GOOD.replace("fp32_gflops = 48.0", ""), "compute.fp32_gflops"),                 # missing field
    (GOOD.replace("memory_gb = 4.0", "memory_gb = -4.0"), "compute.memory_gb"),      # negative
    (GOOD.replace("idle_w = 2.7", 'idle_w = "low"'), "power.idle_w"),                # not a number
    (GOOD.replace("[compute]", "[compute"), "not valid TOML"),                        # bad TOML
    (GOOD.replace('kind = "edge"', 'kind = "toaster"'), "kind 'toaster'"),           # unknown kind
    (GOOD.split("[[links]]")[0], "[[links]]"),                                        # no links
    (GOOD.replace("rtt_ms = 0.5", "rtt_ms = -1"), "links[1].rtt_ms"),                # bad link
    (GOOD.replace('name = "wifi"', "name = 3"), "links[0].name"),
    (GOOD.replace("[power]", "[powr]"), "[power]"),                                   # missing table
    (GOOD.replace('name = "Raspberry Pi 4 Model B (4 GB)"', ""), "'name'"),
])
def test_broken_profile_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_user_profile_path(tmp_path, monkeypatch):
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir(), other.mkdir()
    (mine / "my-board.toml").write_text(GOOD.replace("Raspberry Pi 4 Model B (4 GB)", "My board"))
    (other / "raspberry-pi-4.toml").write_text(GOOD.replace("Raspberry Pi 4 Model B (4 GB)", "Pi 4, overclocked"))
    (other / "broken.toml").write_text(GOOD.replace("memory_gb = 4.0", "memory_gb = 0"))
    with pytest.raises(ProfileError, match="no device profile 'my-board'.*EDGEFOLD_PROFILE_PATH"):
        load_profile("my-board")
    monkeypatch.setenv("EDGEFOLD_PROFILE_PATH", os.pathsep.join([str(tmp_path / "absent"), str(mine), "",
                                                                   str(other)]))
    assert load_profile("my-board").name == "My board" and load_profile("my-board").key == "my-board"
    assert {"my-board", "broken", *BUNDLED} <= set(profile_names())
    assert load_profile("raspberry-pi-4").name == "Pi 4, overclocked"      # user folders come first
    assert load_profile("jetson-nano").name.startswith("NVIDIA")             # the bundled ones still load
    with pytest.raises(ProfileError, match=f"{other / 'broken.toml'}: compute.memory_gb"):
        load_profile("broken")
    assert load_profile(mine / "my-board.toml").name == "My board"          # a path still works


def test_share_weights():
    pi4, pi5 = load_profile("raspberry-pi-4"), load_profile("raspberry-pi-5")
    w = share_weights(["raspberry-pi-4", "raspberry-pi-5", PROFILE_DIR / "raspberry-pi-4.toml"])
    assert w == pytest.approx([12.8 / 42.7, 17.1 / 42.7, 12.8 / 42.7]) and sum(w) == pytest.approx(1.0)
    assert share_weights([pi4, pi5], by="fp32_gflops") == pytest.approx([48 / 201.6, 153.6 / 201.6])
    assert share_weights([pi5]) == [1.0]
    with pytest.raises(ProfileError, match="world size is 3: give one profile per rank"):
        share_weights([pi4, pi5], world_size=3)
    with pytest.raises(ProfileError, match="at least one profile"):
        share_weights([])
    with pytest.raises(ProfileError, match="by='watts' is not a \\[compute\\] field"):
        share_weights([pi4], by="watts")
    with pytest.raises(ProfileError, match="'raspberry-pi-4': compute.overhead_ms is 0.0"):
        share_weights([dataclasses.replace(pi4, overhead_ms=0.0), pi5], by="overhead_ms")
    with pytest.raises(ProfileError, match="no device profile 'toaster'"):
        share_weights(["toaster"])


# --------------------------------------------------------------------------- probe

def test_probe_numbers_are_sane(tmp_path):
    assert 0.1 <= probe.gemm_gflops(128, 0.05, 1) <= 10000
    assert 0.1 <= probe.peak_gflops() <= 100000
    assert 0.1 <= probe.memory_bandwidth_gbs(32, 2) <= 1000
    disk = probe.disk_read(tmp_path, mib=8)
    assert 1 <= disk.mbs <= 100000 and isinstance(disk.cached, bool) and disk.how
    assert list(tmp_path.iterdir()) == []                                   # the test file is removed
    with pytest.raises(probe.ProbeError, match="cannot write a test file"):
        probe.disk_read(Path("/proc/edgefold-probe"), mib=1)


@pytest.mark.skipif(probe._fstype(Path("/dev/shm")) != "tmpfs", reason="needs /dev/shm on tmpfs")
def test_disk_read_on_tmpfs_says_cached(tmp_path):
    folder = Path("/dev/shm") / f"edgefold-test-{os.getpid()}"
    try:
        disk = probe.disk_read(folder, mib=4)
    finally:
        folder.rmdir()
    assert disk.cached and "tmpfs" in disk.how


@pytest.fixture
def listener():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)                      # the kernel completes the handshakes; nobody accepts
        yield f"127.0.0.1:{srv.getsockname()[1]}"


def closed_port() -> socket.socket:
    """A bound, not listening socket: connects to its port are refused while it is held."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def test_rtt_to_a_listening_socket(listener):
    assert 0 <= probe.rtt_ms(listener, count=5) <= 1000


def test_rtt_unreachable_is_a_clear_error_within_its_timeout():
    with closed_port() as s:
        start = time.monotonic()
        with pytest.raises(probe.ProbeError, match=f"127.0.0.1:{s.getsockname()[1]} unreachable: .*listening"):
            probe.rtt_ms(f"127.0.0.1:{s.getsockname()[1]}", timeout_s=0.5)
        assert time.monotonic() - start < 0.5
    # A listener whose accept queue is full drops SYNs (Linux): the connect times out.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):       # fills the queue
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
                pytest.skip("this kernel does not drop SYNs to a full accept queue")
            except socket.timeout:
                pass
            start = time.monotonic()
            with pytest.raises(probe.ProbeError, match="no answer to a TCP connect within 0.4 s"):
                probe.rtt_ms(f"127.0.0.1:{port}", timeout_s=0.4)
            assert 0.35 < time.monotonic() - start < 1.0


@pytest.mark.parametrize("peer", ["nohost", "host:", "host:0", "host:70000", "host:http", ":80"])
def test_rtt_bad_peer_address(peer):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        probe.rtt_ms(peer)


def test_parse_peer():
    assert probe.parse_peer("10.0.0.3:29500") == ("10.0.0.3", 29500)
    assert probe.parse_peer("[::1]:8001") == ("::1", 8001)


# --------------------------------------------------------------------------- telemetry

Temp = namedtuple("Temp", "label current high critical")
Battery = namedtuple("Battery", "percent secsleft power_plugged")


def boom():
    raise RuntimeError("sensor driver broke")


@pytest.mark.parametrize("temps, battery", [
    ("delete", "delete"), (lambda: {}, lambda: None), (lambda: None, lambda: None), (boom, boom),
    (lambda: {"acpi": [Temp("", None, None, None)]}, lambda: Battery(None, -2, None)),
])
def test_telemetry_without_sensors(monkeypatch, temps, battery):
    for name, fake in (("sensors_temperatures", temps), ("sensors_battery", battery)):
        if fake == "delete":
            monkeypatch.delattr(psutil, name, raising=False)
        else:
            monkeypatch.setattr(psutil, name, fake, raising=False)
    t = telemetry.read_telemetry()
    assert t.temperature_c is None and t.battery_percent is None and t.power_plugged is None
    assert set(t.as_dict()) == {"cpu_percent", "load_1m", "memory_available_mb"}
    assert 0 <= t.cpu_percent <= 100 and t.load_1m >= 0 and t.memory_available_mb > 0


def test_telemetry_with_sensors(monkeypatch):
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {
        "coretemp": [Temp("Core 0", 51.0, 80.0, 100.0), Temp("Core 1", 57.5, 80.0, 100.0)],
        "nvme": [Temp("Composite", 44.0, None, None)]}, raising=False)
    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(81.5, 3600, False), raising=False)
    d = telemetry.read_telemetry().as_dict()
    assert d["temperature_c"] == 57.5 and d["battery_percent"] == 81.5 and d["power_plugged"] is False


def test_resident_set_peak_covers_what_was_held_since_the_baseline():
    rss = telemetry.ResidentSet()
    assert rss.peak() >= rss.baseline > 0
    block = bytearray(b"\x01") * (64 << 20)  # 64 MiB, every page written
    held = telemetry.rss_bytes()
    del block  # freed (unmapped): the peak must still cover it, within the kernel counters' batching
    assert held >= rss.baseline + (60 << 20) and rss.peak() >= rss.baseline + (60 << 20)
    again = telemetry.ResidentSet()  # a new baseline starts a new high-water mark
    assert again.baseline <= telemetry.rss_bytes() + (8 << 20) and again.peak() >= again.baseline


def test_cpu_percent_does_not_block():
    start = time.perf_counter()
    for _ in range(5):
        assert 0 <= telemetry.read_telemetry().cpu_percent <= 100
    assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------- edge-runtime probe

def test_probe_command_writes_a_profile_that_loads_and_plans(tmp_path, listener):
    out = tmp_path / "profiles" / "this-box.toml"
    cmd = [sys.executable, "-m", "edge_runtime.cli", "probe", "--quick", "--out", str(out), "--name", "This box",
           "--peer", listener, "--link-rate-mbit", "50", "--disk-dir", str(tmp_path / "disk"), "--idle-w", "3.5",
           "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout)
    assert 0.1 <= m["gemm_gflops"] <= 10000 and 0.1 <= m["memory_bandwidth_gbs"] <= 1000
    assert 1 <= m["storage_read_mbs"] <= 100000 and 0 <= m["rtt_ms"] <= 1000 and m["peer"] == listener
    text = out.read_text()
    assert uncommented_values(text) == [] and "measured by `edge-runtime probe` on " + m["date"] in text
    p = load_profile(out)
    assert (p.key, p.name, p.kind) == ("this-box", "This box", "edge")
    assert p.fp32_gflops == max(m["peak_fp32_gflops"], m["gemm_gflops"]) and p.int8_gops == pytest.approx(
        2 * p.fp32_gflops, abs=0.1)
    assert p.memory_bandwidth_gbs == m["memory_bandwidth_gbs"] and p.storage_read_mbs == m["storage_read_mbs"]
    assert (p.idle_w, p.active_w) == (3.5, load_profile("raspberry-pi-4").active_w)
    assert p.link("peer") == dataclasses.replace(p.link("peer"), rate_mbit=50.0, rtt_ms=m["rtt_ms"])
    # What the planners take: a tp share beside a bundled profile, and the split planner's scaling.
    assert share_weights([out, "raspberry-pi-4"], world_size=2) == pytest.approx(
        [p.memory_bandwidth_gbs / (p.memory_bandwidth_gbs + 12.8), 12.8 / (p.memory_bandwidth_gbs + 12.8)])
    from split.planner import Candidate, predict
    pred = predict(Candidate("local", 0.010), p.link("peer"), device=p, host_gflops=p.fp32_gflops)
    assert pred.device_s == pytest.approx(0.010 + p.overhead_ms / 1e3)
    monkey_env = dict(os.environ, EDGEFOLD_PROFILE_PATH=str(out.parent))
    names = subprocess.run([sys.executable, "-c", "from devices.profiles import load_profile as l; "
                            "print(l('this-box').name)"], capture_output=True, text=True, env=monkey_env,
                           timeout=30, cwd=ROOT)
    assert names.stdout.strip() == "This box", names.stderr


def test_probe_command_without_peer_prints_a_profile(tmp_path, capsys):
    assert edge_cli.main(["probe", "--quick", "--disk-dir", str(tmp_path), "--defaults-from", "jetson-nano"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.toml"
    path.write_text(text)
    p = load_profile(path)
    assert [link.name for link in p.links] == ["wifi", "ethernet"] and p.idle_w == 1.25
    assert "copied from the bundled profile 'jetson-nano'" in text and uncommented_values(text) == []


def test_probe_command_errors(tmp_path, capsys):
    out = tmp_path / "p.toml"
    with closed_port() as s:
        args = ["probe", "--quick", "--disk-dir", str(tmp_path), "--out", str(out), "--timeout-s", "0.5"]
        assert edge_cli.main(args + ["--peer", f"127.0.0.1:{s.getsockname()[1]}"]) == 2
    assert "edge-runtime probe: peer 127.0.0.1:" in capsys.readouterr().err and not out.exists()
    for bad, message in ((["--out", str(tmp_path / "p.txt")], "must end in .toml"),
                         (["--peer", "nohost"], "expected HOST:PORT"),
                         (["--link-rate-mbit", "0"], "--link-rate-mbit must be > 0"),
                         (["--active-w", "-1"], "--active-w must be a number > 0"),
                         (["--defaults-from", "toaster"], "no device profile 'toaster'")):
        assert edge_cli.main(["probe", "--quick", "--disk-dir", str(tmp_path)] + bad) == 2
        assert message in capsys.readouterr().err


def test_devices_and_cli_import_without_torch():
    code = ("import sys, devices.probe, devices.telemetry, devices.profiles, edge_runtime.cli, "
            "devices.probe_cli; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


# --------------------------------------------------------------------------- tp prepare --weights-from

def tiny_llama(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from split.llama import Llama, LlamaConfig, hf_name
    config = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(config))
    path.mkdir()
    save_file({hf_name(k): v.contiguous() for k, v in model.named_parameters()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_tp_prepare_weights_from_profiles(tmp_path, capsys):
    model = tiny_llama(tmp_path / "hf")
    args = ["tp", "prepare", "--model", str(model), "--out", str(tmp_path / "shards")]
    assert edge_cli.main(args + ["--world-size", "2", "--weights-from", "raspberry-pi-4, orin-nano"]) == 0
    plan = json.loads((tmp_path / "shards" / "plan.json").read_text())
    assert plan["weights"] == pytest.approx([12.8 / 80.8, 68.0 / 80.8])
    assert plan["kv_heads"] == [[0, 1], [1, 4]] and plan["mlp"] == [[0, 6], [6, 40]]   # 4 heads, 40 columns
    assert edge_cli.main(args + ["--world-size", "3", "--weights-from", "raspberry-pi-4,orin-nano"]) == 2
    assert "world size is 3: give one profile per rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        edge_cli.main(args + ["--world-size", "2", "--weights", "1,1", "--weights-from", "orin-nano,orin-nano"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_plan_command_takes_a_probed_profile(split_deployment, tmp_path, capsys):
    out = tmp_path / "box.toml"
    assert edge_cli.main(["probe", "--quick", "--out", str(out), "--disk-dir", str(tmp_path)]) == 0
    cmd = [sys.executable, "-m", "edge_runtime.cli", "plan", "--deployment", str(split_deployment[0]),
           "--device", str(out), "--link", "10mbit,40ms", "--repeats", "3", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["device"] == str(out) and data["choice"] in [r["placement"] for r in data["rows"]]
