"""ED-ViT across peer devices (issue 16, items 2 and 3): real agents on loopback, each serving one
class-wise sub-model as an ordinary `local` package, and a requesting agent whose `edvit` pipeline
sends the frame to all of them and fuses the answers. The fused answer equals the same computation
in one process (PyTorch sub-models + fusion); a rogue peer (wrong shape, NaN) counts as missing
with a log line; a killed peer gives degraded answers, never a hang; every package can come from
the cloud's repository through the fleet protocol."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from edge_runtime.client.oip_client import OipClient
from edge_runtime.vision.edvit_runtime import EdvitRuntime
from server_process import AgentProcess, ServerProcess
from split.vision.edvit import Fusion, class_wise_submodel, fusion_inputs, importance, partition_classes
from split.vision.edvit_deploy import write_edvit
from split.vision.export import export_onnx
from split.vision.models import vit
from test_agent import agent_toml, wait_ready

DEADLINE_S = 5.0   # generous: a loaded CI machine must not turn a slow peer into a "missing" one
FRAMES = torch.rand(3, 1, 64, 64)


@pytest.fixture(scope="module")
def edvit(tmp_path_factory):
    torch.manual_seed(0)
    full = vit().eval()
    x, y = torch.rand(20, 1, 64, 64).numpy(), np.arange(20) % 10
    parts = partition_classes(10, [1.0, 1.0, 0.5])
    subs = [class_wise_submodel(full, p, importance(full, p, x, y), heads=1, hidden=32) for p in parts]
    fusion = Fusion(parts).eval()
    out = tmp_path_factory.mktemp("edvit")
    package = write_edvit(out, parts, subs, fusion)
    return out, package, parts, subs, fusion


def serve(tmp_path, name: str, pipelines: dict) -> AgentProcess:
    body = "".join(f'[[pipeline]]\nname = "{n}"\nkind = "local"\npath = "{folder}"\n' for n, folder in pipelines.items())
    agent = AgentProcess(agent_toml(tmp_path / f"{name}.toml", None, body, state=f"state-{name}"))
    with OipClient(agent.address) as client:
        wait_ready(client)
    return agent


@pytest.fixture(scope="module")
def peers(edvit, tmp_path_factory):
    out = edvit[0]
    tmp = tmp_path_factory.mktemp("peers")
    agents = [serve(tmp, f"peer{i}", {f"edvit_sub{i}": out / f"edvit_sub{i}"}) for i in range(3)]
    yield agents
    for agent in agents:
        agent.kill()


@pytest.fixture(scope="module")
def requester(edvit, peers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("requester")
    addresses = ", ".join(f'"{a.address}"' for a in peers)
    body = (f'[[pipeline]]\nname = "digits"\nkind = "edvit"\npath = "{edvit[1]}"\npeers = [{addresses}]\n'
            f'deadline_s = {DEADLINE_S}\n')
    agent = AgentProcess(agent_toml(tmp / "agent.toml", None, body))
    with OipClient(agent.address) as client:
        wait_ready(client)
    yield agent
    agent.kill()


@torch.no_grad()
def in_one_process(edvit, missing=()):
    _, _, parts, subs, fusion = edvit
    outputs = [None if i in missing else sub(FRAMES) for i, sub in enumerate(subs)]
    return fusion(*fusion_inputs(outputs, parts)).numpy()


def test_fused_answer_equals_one_process(edvit, requester):
    with OipClient(requester.address, timeout_s=30) as client:
        out = client.infer("digits", {"x": FRAMES.numpy()})
    expected = in_one_process(edvit)
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-4, atol=1e-4)
    assert out["label"].tolist() == expected.argmax(1).tolist()
    assert not out["degraded"].any() and out["peers_answered"].tolist() == [3, 3, 3]


def test_the_partition_is_each_class_once_and_the_package_says_so(edvit):
    runtime_manifest = EdvitRuntime(edvit[1], ["127.0.0.1:1"] * 3).manifest
    classes = [c for sub in runtime_manifest["sub_models"] for c in sub["classes"]]
    assert sorted(classes) == list(range(10)) and runtime_manifest["classes"] == 10
    with pytest.raises(ValueError, match="need one peer each"):
        EdvitRuntime(edvit[1], ["127.0.0.1:1"])


class Rogue(nn.Module):
    """Answers with the wrong width, or NaN."""
    def __init__(self, width: int, nan: bool):
        super().__init__()
        self.width, self.nan = width, nan

    def forward(self, x):
        y = x.flatten(1)[:, :self.width]
        return y * float("nan") if self.nan else y


def test_a_peer_answering_garbage_counts_as_missing_with_a_log_line(edvit, peers, tmp_path, caplog):
    package, parts = edvit[1], edvit[2]
    for i, (width, nan) in {1: (len(parts[1]) + 3, False), 2: (len(parts[2]) + 1, True)}.items():
        export_onnx(Rogue(width, nan), FRAMES[:1], tmp_path / f"rogue{i}" / "model.onnx", "x", ["logits"])
    rogue = serve(tmp_path, "rogue", {"edvit_sub1": tmp_path / "rogue1", "edvit_sub2": tmp_path / "rogue2"})
    runtime = EdvitRuntime(package, [peers[0].address, rogue.address, rogue.address], DEADLINE_S)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_runtime.vision.edvit_runtime"):
            result = runtime.infer(FRAMES.numpy())
    finally:
        runtime.close()
        rogue.kill()
    assert result.present.tolist() == [True, False, False] and result.degraded
    np.testing.assert_allclose(result.logits, in_one_process(edvit, missing=(1, 2)), rtol=1e-4, atol=1e-4)
    logged = caplog.text
    assert f"peer 1 ({rogue.address}) answered logits float32 [3, {len(parts[1]) + 3}]" in logged
    assert "peer 2" in logged and "NaN or Inf" in logged


def test_a_killed_peer_gives_degraded_answers_not_a_hang(edvit, peers, requester):
    peers[2].kill()
    with OipClient(requester.address, timeout_s=30) as client:
        out = client.infer("digits", {"x": FRAMES.numpy()})
    assert out["degraded"].all() and out["peers_answered"].tolist() == [2, 2, 2]
    np.testing.assert_allclose(out["logits"], in_one_process(edvit, missing=(2,)), rtol=1e-4, atol=1e-4)
    assert "edvit: peer 2" in requester.output()


def test_edvit_plan_prints_the_partition_and_the_prediction_per_device(edvit, capsys):
    from devices.profiles import load_profile
    from edge_runtime.cli import main
    argv = ["edvit-plan", "--package", str(edvit[1]), "--peers", "raspberry-pi-4,raspberry-pi-4,jetson-nano",
            "--host-gflops", "100", "--repeats", "3"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [r["classes"] for r in rows] == edvit[2] and [r["device"] for r in rows][2] == "jetson-nano"
    for r in rows:   # scaled as the split planner scales: this machine's time x its peak / the device's
        profile = load_profile(r["device"])
        assert r["device_ms"] == pytest.approx(r["here_ms"] * 100 / profile.fp32_gflops + profile.overhead_ms)
        assert r["macs"] < 4e6 and r["params"] > 0
    assert result["end_to_end_ms"] > max(r["total_ms"] for r in rows)
    assert main(argv) == 0 and "predicted end to end" in capsys.readouterr().out
    assert main(["edvit-plan", "--package", str(edvit[1]), "--peers", "raspberry-pi-4"]) == 2
    assert "3 sub-models need 3 profiles" in capsys.readouterr().err


def test_the_packages_come_through_the_fleet(edvit, tmp_path):
    """Item 3: every package is an ordinary model version in the cloud's repository; the peers pull
    their sub-model, the requesting device pulls the fusion package (a device package)."""
    out, package = edvit[0], edvit[1]
    repo = tmp_path / "repository"
    for i in range(3):
        shutil.copytree(out / f"edvit_sub{i}", repo / f"edvit_sub{i}" / "1")
    shutil.copytree(package, repo / "digits-edvit" / "1")
    (repo / "digits-edvit" / "config.toml").write_text('backend = "device"\n')
    cloud = ServerProcess(repo)
    agents = []
    try:
        for i in range(3):
            body = f'[[pipeline]]\nname = "edvit_sub{i}"\nkind = "local"\nmodel = "edvit_sub{i}"\n'
            agents.append(AgentProcess(agent_toml(tmp_path / f"peer{i}.toml", cloud.address, body, state=f"s{i}")))
        addresses = ", ".join(f'"{a.address}"' for a in agents)
        body = (f'[[pipeline]]\nname = "digits"\nkind = "edvit"\nmodel = "digits-edvit"\npeers = [{addresses}]\n'
                f'deadline_s = {DEADLINE_S}\n')
        agents.append(AgentProcess(agent_toml(tmp_path / "requester.toml", cloud.address, body, state="req")))
        for agent in agents:
            with OipClient(agent.address) as client:
                wait_ready(client)
        with OipClient(agents[-1].address, timeout_s=30) as client:
            out = client.infer("digits", {"x": FRAMES.numpy()})
        np.testing.assert_allclose(out["logits"], in_one_process(edvit), rtol=1e-4, atol=1e-4)
        assert not out["degraded"].any()
    finally:
        for agent in agents:
            agent.kill()
        cloud.kill()
