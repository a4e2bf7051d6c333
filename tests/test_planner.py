"""The split planner on fixed profiles and fixed measured costs (no timing in the test)."""
import pytest

from devices.profiles import DeviceProfile, Link, ProfileError, load_profile, parse_link, profile_names
from split.placement import Placement
from split.planner import Candidate, format_table, plan

HOST_GFLOPS = 100.0   # the machine the costs below were "measured" on

# A frame of 4 KB as PNG; the cut after stage2 sends 8 KB at int8, 512 B through a bottleneck.
CANDIDATES = [
    Candidate("local", device_s=0.004, accuracy=0.993),
    Candidate("offload", device_s=0.0002, cloud_s=0.004, up_bytes=4000, down_bytes=40, accuracy=0.993),
    Candidate("split:stage2:int8", device_s=0.002, cloud_s=0.002, up_bytes=8200, down_bytes=40, accuracy=0.992),
    Candidate("split:stage2:b8:int8", device_s=0.0022, cloud_s=0.0022, up_bytes=600, down_bytes=40, accuracy=0.990),
    Candidate("split:stage1:b4:int4", device_s=0.001, cloud_s=0.003, up_bytes=300, down_bytes=40, accuracy=0.95),
]


def profile(key, gflops, overhead_ms=0.0, kind="edge"):
    return DeviceProfile(key, key, kind, gflops, 4 * gflops, overhead_ms, 1, 1, 1, 1.0, 5.0, 1.0,
                         (Link("wifi", 100, 5),))


def test_fast_device_slow_link_stays_local():
    fast = profile("fast", 1000.0)
    p = plan(CANDIDATES, parse_link("1mbit,200ms"), device=fast, cloud=profile("cloud", 10000, kind="cloud"),
             host_gflops=HOST_GFLOPS)
    assert p.choice.candidate.placement == "local"


def test_slow_device_fast_link_cuts_or_offloads():
    slow = profile("slow", 2.0)
    p = plan(CANDIDATES, parse_link("1gbit,1ms"), device=slow, cloud=profile("cloud", 10000, kind="cloud"),
             host_gflops=HOST_GFLOPS)
    assert Placement.parse(p.choice.candidate.placement).kind in ("split", "offload")
    assert p.choice.candidate.placement == "offload"     # 0.2 ms on the device beats every head
    # with a mid link, the bottleneck's 600 bytes beat the 4 KB frame
    p = plan(CANDIDATES, parse_link("1mbit,10ms"), device=profile("mid", 10.0), cloud=profile("cloud", 10000),
             host_gflops=HOST_GFLOPS)
    assert p.choice.candidate.placement in ("split:stage2:b8:int8", "split:stage1:b4:int4")


def test_accuracy_floor_and_energy_objective():
    slow = profile("slow", 20.0)
    p = plan(CANDIDATES, parse_link("1mbit,10ms"), device=slow, host_gflops=HOST_GFLOPS, accuracy_floor=0.99)
    assert not [r for r in p.rows if r.candidate.placement == "split:stage1:b4:int4"][0].feasible
    assert p.choice.candidate.accuracy >= 0.99
    p = plan(CANDIDATES, parse_link("1mbit,10ms"), device=slow, host_gflops=HOST_GFLOPS, objective="energy")
    assert p.choice.energy_j == min(r.energy_j for r in p.rows)
    assert "choice (energy)" in format_table(p)
    none = plan(CANDIDATES, parse_link("1mbit,10ms"), device=slow, host_gflops=HOST_GFLOPS, accuracy_floor=0.999)
    assert none.choice is None and "no placement meets" in format_table(none)


def test_this_machine_uses_measured_costs_unscaled():
    p = plan(CANDIDATES, parse_link("100mbit,5ms"), rpc_overhead_s=0.0)
    local = p.rows[0]
    assert local.total_s == pytest.approx(0.004)
    off = p.rows[1]
    assert off.total_s == pytest.approx(0.0002 + 0.004 + 0.005 + (4000 + 40 + 300) * 8 / 100e6)


def test_every_shipped_profile_loads():
    names = profile_names()
    for required in ("raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "orin-nano", "gap8-nano-drone",
                     "phone-midrange", "cloud-cpu", "cloud-gpu"):
        assert required in names
    for name in names:
        p = load_profile(name)
        assert p.fp32_gflops > 0 and p.links


@pytest.mark.parametrize("text,fragment", [
    ("name='x'\nkind='edge'\n[compute]\nfp32_gflops=-1", "compute.fp32_gflops must be a number > 0, got -1"),
    ("name='x'\nkind='toaster'", "kind 'toaster'"),
    ("kind='edge'", "'name' must be a non-empty string"),
    ("name='x'\nkind='edge'", "missing [compute] table"),
])
def test_profile_errors_name_file_and_field(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and fragment in str(err.value)
    with pytest.raises(ProfileError, match="no device profile 'nope'"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="expected RATE,RTT"):
        parse_link("10,40")


def test_placement_strings_round_trip():
    for text in ("local", "offload", "split:stage2:int8", "split:stage2:b8:int4", "split:block1:fp32"):
        assert str(Placement.parse(text)) == text
    with pytest.raises(ValueError, match="codec 'int5'"):
        Placement.parse("split:stage2:int5")


def test_plan_command_prints_the_table_and_the_choice(split_deployment):
    import json
    import subprocess
    import sys
    device_dir = split_deployment[0]
    cmd = [sys.executable, "-m", "edge_runtime.cli", "plan", "--deployment", str(device_dir), "--repeats", "3"]
    out = subprocess.run(cmd + ["--device", "raspberry-pi-4", "--link", "10mbit,40ms"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for fragment in ("placement", "local", "offload", "split:stage2:int8", "split:stage2:b4:int4",
                     "choice (latency):", "Raspberry Pi 4"):
        assert fragment in out.stdout
    out = subprocess.run(cmd + ["--device", "this", "--cloud-profile", "this", "--link", "1gbit,1ms", "--json"],
                         capture_output=True, text=True, timeout=60)
    data = json.loads(out.stdout)
    assert data["choice"] in [r["placement"] for r in data["rows"]] and len(data["rows"]) == 2 + 3 + 2
    bad = subprocess.run(cmd + ["--device", "toaster", "--link", "10mbit,40ms"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "no device profile 'toaster'" in bad.stderr
