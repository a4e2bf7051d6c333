"""The device runtime against a real cloud-service: split offload with a deadline, the cloud
killed mid-stream (every frame answered, degraded ones flagged), a late cloud behind the link
emulator, and full-frame offload."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.vision.runtime import Runtime
from server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(1)
NEVER = {"stage1": 1.0, "stage2": 1.0}


def local_logits(net, frame):
    with torch.no_grad():
        return net(torch.from_numpy(frame[None]))[-1][0].numpy()


def test_cloud_killed_mid_stream_every_frame_answered(split_deployment):
    device, repo, net, _ = split_deployment
    proc = ServerProcess(repo)
    frames = RNG.random((16, 1, 64, 64), dtype=np.float32)
    results = []
    try:
        with Runtime(device, "split:stage2:int8", cloud=proc.address, deadline_s=2.0, thresholds=NEVER,
                     retry_after_s=0.2) as rt:
            for i, frame in enumerate(frames):
                if i == 6:
                    proc.kill()
                results.append(rt.infer(frame))
    finally:
        proc.kill()
    assert len(results) == 16
    assert all(r.where == "cloud" and not r.degraded for r in results[:6])
    assert all(r.degraded and r.where == "exit:stage2" for r in results[6:]), [r.where for r in results]
    assert "UNAVAILABLE" in results[6].error
    for r, f in zip(results[:6], frames):    # int8 on the wire: the cloud answer is the model's answer
        want = local_logits(net, f)
        assert np.abs(r.logits - want).max() < 0.05 * np.abs(want).max()
        assert r.bytes_sent < 16 * 16 * 32 + 800           # 1 byte per element + 32 scales as text


def test_bottleneck_split_and_local_fallback(split_deployment):
    device, repo, net, bn = split_deployment
    proc = ServerProcess(repo)
    frame = RNG.random((1, 64, 64), dtype=np.float32)
    try:
        with Runtime(device, "split:stage2:b4:int4", cloud=proc.address, thresholds=NEVER) as rt:
            r = rt.infer(frame)
            with torch.no_grad():
                x = torch.from_numpy(frame[None])
                want = net.backbone[3:](bn(net.backbone[:3](x)))[0].numpy()
            assert r.where == "cloud" and r.bytes_sent < 4 * 16 * 8 + 200
            assert np.abs(r.logits - want).max() < 0.3 * np.abs(want).max()
        with Runtime(device, "offload", cloud=proc.address, thresholds=NEVER) as rt:
            q = np.round(frame * 255) / 255
            r = rt.infer(q)
            assert r.where == "cloud" and r.stages_run == 0
            np.testing.assert_allclose(r.logits, local_logits(net, q.astype(np.float32)), atol=1e-4)
    finally:
        proc.kill()
    with Runtime(device, "offload", cloud=proc.address, thresholds=NEVER, fallback="local") as rt:
        r = rt.infer(frame)                 # cloud gone: the device runs the whole model itself
        assert r.degraded and r.where == "local" and r.stages_run == 6
        np.testing.assert_allclose(r.logits, local_logits(net, frame), atol=1e-4)


def test_late_cloud_is_cut_off_by_the_deadline(split_deployment):
    device, repo, _, _ = split_deployment
    proc = ServerProcess(repo)
    emu = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "linkemu.py"), "--listen", "127.0.0.1:0",
                            "--target", proc.address, "--delay-ms", "150"], stdout=subprocess.PIPE, text=True)
    try:
        line = emu.stdout.readline()
        port = line.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1]
        with Runtime(device, "split:stage2:int8", cloud=f"127.0.0.1:{port}", deadline_s=0.1,
                     thresholds=NEVER) as rt:
            r = rt.infer(RNG.random((1, 64, 64), dtype=np.float32))
        assert r.degraded and "DEADLINE_EXCEEDED" in r.error and r.latency_s < 0.5
    finally:
        emu.terminate()
        emu.wait(10)
        proc.kill()


def test_edge_split_path_imports_without_torch():
    code = ("import sys, edge_runtime.vision.runtime, edge_runtime.vision.placement_cli, edge_runtime.vision.switch, "
            "edge_runtime.vision.deployment, "
            "split, split.codec, split.planner, split.placement, devices.profiles, devices.probe, "
            "cloud_service.compressed; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_slowdown_stretches_device_compute(split_deployment):
    device, _, _, _ = split_deployment
    frame = RNG.random((1, 64, 64), dtype=np.float32)
    with Runtime(device, "local", thresholds=NEVER) as fast, Runtime(device, "local", thresholds=NEVER,
                                                                      slowdown=20) as slow:
        fast.infer(frame)
        t_fast = min(fast.infer(frame).latency_s for _ in range(5))
        t_slow = min(slow.infer(frame).latency_s for _ in range(5))
    assert t_slow > 8 * t_fast
    with pytest.raises(ValueError, match="slowdown 0.5"):
        Runtime(device, "local", slowdown=0.5)
