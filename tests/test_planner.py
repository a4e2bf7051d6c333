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
    assert [r["offload"] for r in data["rows"]] == [0.0] + [1.0] * 6 and data["notes"] == []   # thresholds 1.0
    bad = subprocess.run(cmd + ["--device", "toaster", "--link", "10mbit,40ms"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "no device profile 'toaster'" in bad.stderr


# --- exits: expected cost per frame -------------------------------------------------------------

def previous_formula(c, link, device=None, cloud=None, host=1.0, rpc=0.0005):
    """The planner's prediction before exits were accounted for: (device, network, cloud, energy)."""
    def scale(s, prof):
        return s if prof is None or s == 0 else s * host / prof.fp32_gflops + prof.overhead_ms / 1e3
    device_s, cloud_s, network_s, upload_s = scale(c.device_s, device), scale(c.cloud_s, cloud), 0.0, 0.0
    if c.up_bytes:
        upload_s = (c.up_bytes + 150) * 8 / (link.rate_mbit * 1e6)
        network_s = link.rtt_ms / 1e3 + upload_s + (c.down_bytes + 150) * 8 / (link.rate_mbit * 1e6) + rpc
    energy = 0.0 if device is None else \
        device.active_w * device_s + device.radio_tx_w * upload_s + device.idle_w * (network_s - upload_s + cloud_s)
    return device_s, network_s, cloud_s, energy


@pytest.mark.parametrize("device", [None, profile("mid", 10.0, overhead_ms=2.0)])
def test_no_exits_or_never_exit_is_the_previous_prediction(device):
    link, cloud = parse_link("10mbit,40ms"), profile("cloud", 1000.0, kind="cloud")
    never = [Candidate(**{**c.__dict__, "exits": ((0.0, c.device_s / 2), (0.0, c.device_s))}) for c in CANDIDATES]
    for candidates in (CANDIDATES, never):       # no exits; exits at threshold 1.0 (p_exit = 0)
        p = plan(candidates, link, device, cloud, HOST_GFLOPS)
        for row, c in zip(p.rows, CANDIDATES):
            assert (row.device_s, row.network_s, row.cloud_s, row.energy_j) == \
                previous_formula(c, link, device, cloud, HOST_GFLOPS)
            assert row.offload == (1.0 if c.up_bytes else 0.0)
        assert not any("exit" in n for n in p.notes)


STAGE1, STAGE2, REST = 0.001, 0.001, 0.002          # seconds on this machine; an exit after stage1 catches 60%


def test_an_exit_after_stage1_cuts_local_and_split_costs():
    link = parse_link("10mbit,20ms")
    local = Candidate("local", STAGE1 + STAGE2 + REST, exits=((0.6, STAGE1),))
    cut = Candidate("split:stage2:int8", STAGE1 + STAGE2, cloud_s=REST, up_bytes=8200, down_bytes=40,
                    exits=((0.6, STAGE1),))
    dev = profile("dev", 1.0)                         # host_gflops 1: device times unscaled, 5 W active
    p = plan([local, cut], link, dev, host_gflops=1.0, rpc_overhead_s=0.0)
    loc, split = p.rows
    assert loc.total_s == pytest.approx(STAGE1 + 0.4 * (STAGE2 + REST))
    assert loc.offload == 0.0 and loc.energy_j == pytest.approx(5.0 * loc.device_s)
    full = previous_formula(cut, link, dev, None, 1.0, 0.0)       # a frame that reaches the cut
    assert split.device_s == pytest.approx(0.6 * STAGE1 + 0.4 * (STAGE1 + STAGE2))
    assert split.network_s == pytest.approx(0.4 * full[1])         # upload and RTT on the 40% only
    assert split.cloud_s == pytest.approx(0.4 * REST)
    assert split.offload == pytest.approx(0.4)
    assert split.energy_j == pytest.approx(0.6 * 5.0 * STAGE1 + 0.4 * full[3])
    assert any("leaves at an exit" in n for n in p.notes)
    text = format_table(p)
    assert "offload" in text.splitlines()[0] and "0.40" in text


def test_exits_change_the_choice():
    # latency: an exit after stage2 makes local cheap; the cut after stage1 is before it and gains nothing
    head = Candidate("split:stage1:int8", 0.0011, cloud_s=0.001, up_bytes=4000, down_bytes=40)
    for p_exit, choice in ((0.0, "split:stage1:int8"), (0.7, "local")):
        local = Candidate("local", 0.010, exits=((p_exit, 0.002),))
        p = plan([local, head], parse_link("1gbit,5ms"), rpc_overhead_s=0.0)
        assert p.choice.candidate.placement == choice
    # energy: an exit after stage1 makes a deep cut cheaper than shipping the frame
    dev = profile("dev", 1.0)
    offload = Candidate("offload", 0.0002, cloud_s=0.010, up_bytes=4000, down_bytes=40)
    for p_exit, choice in ((0.0, "offload"), (0.6, "split:stage2:b8:int8")):
        cut = Candidate("split:stage2:b8:int8", 0.0022, cloud_s=0.008, up_bytes=600, down_bytes=40,
                        exits=((p_exit, 0.001),))
        p = plan([offload, cut], parse_link("10mbit,5ms"), dev, host_gflops=1.0, objective="energy")
        assert p.choice.candidate.placement == choice


def test_exit_rates_are_conditional_on_reaching_the_exit():
    from split.vision.exits import exit_rates
    import numpy as np
    conf = np.array([[0.9, 0.9, 0.9, 0.1, 0.1],      # exit 1: 3 of 5 leave
                     [0.0, 0.0, 0.0, 0.9, 0.1]])     # exit 2: 1 of the 2 that reach it
    assert exit_rates(conf, [0.5, 0.5]) == [0.6, 0.5]
    assert exit_rates(conf, [1.0, 1.0]) == [0.0, 0.0]
    assert exit_rates(conf, [0.0, 0.5]) == [1.0, 0.0]              # none reach exit 2


def test_deployment_with_exit_rates_plans_with_them_and_without_them_plans_as_before(split_deployment, tmp_path):
    import json
    import shutil
    import numpy as np
    import torch
    from edge_runtime.vision.deployment import Deployment
    from edge_runtime.vision.placement_costs import measure_candidates
    from split.vision.deploy import build_deployment
    from split.vision.exits import exit_rates, max_softmax
    _, _, net, _ = split_deployment
    frames = np.random.default_rng(1).random((64, 1, 64, 64), dtype=np.float32)
    with torch.no_grad():
        conf = np.stack([max_softmax(o.double().numpy()) for o in net(torch.from_numpy(frames))[:-1]])
    thresholds = {"stage1": float(np.median(conf[0])), "stage2": 0.0}     # half leave at stage1, the rest at stage2
    device = build_deployment(net, "res_cnn", tmp_path / "device", tmp_path / "repository", (1, 64, 64),
                              cuts=["stage1"], thresholds=thresholds, validation=frames)
    manifest = json.loads((device / "deployment.json").read_text())
    assert list(manifest["exit_rates"].values()) == exit_rates(conf, list(thresholds.values())) == [0.5, 1.0]

    rows, measured = measure_candidates(Deployment.load(device), repeats=3)
    by = {r.placement: r for r in rows}
    stage_s = measured["stage_s"]
    assert by["local"].exits == ((0.5, stage_s[0] + stage_s[1]), (1.0, sum(stage_s[:3])))
    assert by["split:stage1:int8"].exits == ((0.5, stage_s[0] + stage_s[1]),)     # the stage2 exit is in the cloud
    assert by["offload"].exits == () and measured["notes"] == []
    p = plan(rows, parse_link("10mbit,40ms"))
    assert [r.offload for r in p.rows if r.candidate.placement.startswith("split")] == [0.5] * 3
    assert p.rows[0].total_s == pytest.approx(0.5 * (stage_s[0] + stage_s[1]) + 0.5 * sum(stage_s[:3]))

    old = tmp_path / "old"                            # the same deployment.json before exit_rates existed
    shutil.copytree(device, old)
    del manifest["exit_rates"]
    (old / "deployment.json").write_text(json.dumps(manifest))
    rows, measured = measure_candidates(Deployment.load(old), repeats=3)
    assert all(r.exits == () for r in rows)
    assert len(measured["notes"]) == 1 and "stage1, stage2 not accounted for" in measured["notes"][0]


def test_an_adaptive_pair_costs_its_expected_big_model_share_on_each_profile():
    from split.planner import predict
    pi4, gap8 = load_profile("raspberry-pi-4"), load_profile("gap8-nano-drone")
    small_s, big_s, host = 0.0002, 0.002, 100.0
    pair = Candidate("adaptive", device_s=big_s, models=((1.0, small_s), (0.25, big_s)))
    for profile, precision in ((pi4, "fp32"), (gap8, "int8")):
        got = predict(pair, parse_link("10mbit,40ms"), profile, host_gflops=host, precision=precision)
        rate = profile.int8_gops if precision == "int8" else profile.fp32_gflops
        one = lambda s: s * host / rate + profile.overhead_ms / 1e3  # noqa: E731
        assert got.device_s == pytest.approx(one(small_s) + 0.25 * one(big_s))
        big_only = predict(Candidate("big", device_s=big_s), parse_link("10mbit,40ms"), profile, host_gflops=host,
                           precision=precision)
        assert got.device_s < big_only.device_s and got.network_s == 0
