"""Exit branches: threshold semantics, calibration, and the ONNX stage chain on the device."""
import numpy as np
import pytest
import torch

from edge_runtime.vision.deployment import Deployment
from edge_runtime.vision.runtime import Runtime
from split.vision.exits import calibrate_threshold, first_exit, max_softmax

RNG = np.random.default_rng(0)


def frames(n=6):
    return RNG.random((n, 1, 64, 64), dtype=np.float32)


def test_threshold_one_never_exits_and_zero_exits_first(split_deployment):
    device, _, net, _ = split_deployment
    dep = Deployment.load(device)
    with Runtime(dep, "local", thresholds={"stage1": 1.0, "stage2": 1.0}) as rt:
        results = [rt.infer(f) for f in frames()]
        assert all(r.where == "local" and r.stages_run == len(dep.stages) for r in results)
    with Runtime(dep, "local", thresholds={"stage1": 0.0, "stage2": 0.0}) as rt:
        results = [rt.infer(f) for f in frames()]
        # stem + stage1 ran, then the frame left: nothing after the first exit was computed
        assert all(r.where == "exit:stage1" and r.stages_run == 2 for r in results)


def test_stage_chain_matches_pytorch(split_deployment):
    device, _, net, _ = split_deployment
    dep = Deployment.load(device)
    x = frames(3)
    with torch.no_grad():
        expected = [t.numpy() for t in net(torch.from_numpy(x))]
    outputs, a = [], x
    for i in range(len(dep.stages)):
        a, exit_logits = dep.run_stage(i, a)
        if exit_logits is not None:
            outputs.append(exit_logits)
    outputs.append(a)
    assert len(outputs) == 3
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with Runtime(dep, "local", thresholds={"stage1": 1.0, "stage2": 1.0}) as rt:
        np.testing.assert_allclose(rt.infer(x[0]).logits, expected[-1][0], atol=1e-5)


def test_first_exit_and_max_softmax():
    conf = np.array([[0.5, 0.95, 0.2], [0.9, 0.99, 0.3]])        # (exits, frames)
    assert first_exit(conf, [0.85, 0.85]).tolist() == [1, 0, 2]
    assert first_exit(conf, 1.0).tolist() == [2, 2, 2]
    assert first_exit(conf, 0.0).tolist() == [0, 0, 0]
    assert np.allclose(max_softmax(np.array([[0.0, 0.0], [10.0, 0.0]])), [0.5, 1 / (1 + np.exp(-10))])


def test_calibrated_threshold_meets_the_target_on_calibration_data():
    conf = RNG.random(2000)
    correct = RNG.random(2000) < conf            # more confident, more often right
    for target in (0.7, 0.9, 0.97):
        t = calibrate_threshold(conf, correct, target)
        taken = conf > t
        assert taken.any() and correct[taken].mean() >= target
        # one step lower would take a frame that breaks the target (t is the lowest such threshold)
        lower = conf >= t
        assert lower.sum() == taken.sum() + 1 or correct[lower].mean() < target
    assert calibrate_threshold(conf, np.zeros(2000, bool), 0.5) == 1.0
    assert calibrate_threshold(conf, np.ones(2000, bool), 0.5) == 0.0


def test_runtime_rejects_unknown_placements(split_deployment):
    device, _, _, _ = split_deployment
    with pytest.raises(ValueError, match="stage 'stage9' is not in deployment"):
        Runtime(device, "split:stage9:int8", cloud="127.0.0.1:1")
    with pytest.raises(ValueError, match="no bottleneck 'stage2_b16'"):
        Runtime(device, "split:stage2:b16:int8", cloud="127.0.0.1:1")
    with pytest.raises(ValueError, match="needs a cloud address"):
        Runtime(device, "split:stage2:int8")
    with pytest.raises(ValueError, match="exit threshold for 'stage1' is 2"):
        Runtime(device, "local", thresholds={"stage1": 2})
