"""The 4-DoF pose stream (issue 18) and the pose model pairs: fixed, in-range, eventful data; the error
figures; output shapes and ONNX parity with the auxiliary predicted-error column. No real training."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from split.vision import pose
from split.vision.export import export_onnx
from split.vision.pose_models import POSE_BUILDERS, POSE_INPUT, POSE_PAIRS, build_pose, has_aux
from split.vision.train import train_pose_aux, train_pose_model


def test_stream_is_deterministic_and_in_range():
    a = pose.pose_stream.__wrapped__("val", sequences=2, length=200)
    b = pose.pose_stream.__wrapped__("val", sequences=2, length=200)
    for field in ("frames", "pose", "sequence", "event"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.frames.shape == (400, 1, 96, 96) and a.frames.dtype == np.float32
    assert a.pose.shape == (400, 4) and a.pose.dtype == np.float32
    assert a.sequence.dtype == np.int64 and a.event.dtype == np.int64 and set(a.sequence.tolist()) == {0, 1}
    assert 0 <= a.frames.min() and a.frames.max() <= 1
    assert a.pose.min() >= 0 and a.pose.max() <= 1
    px = pose.denormalise(a.pose)
    assert np.all(px >= pose.POSE_RANGES[:, 0]) and np.all(px <= pose.POSE_RANGES[:, 1])


def test_normalise_round_trips():
    px = np.array([[20, 76, 30, -1.0], [48, 20, 40, 0.5]], np.float32)
    assert np.allclose(pose.normalise(px), [[0, 1, 0.5, 0], [0.5, 0, 1, 0.75]])
    p01 = np.random.default_rng(0).random((50, 4)).astype(np.float32)
    assert np.allclose(pose.normalise(pose.denormalise(p01)), p01, atol=1e-6)


def test_each_split_draws_its_own_digits(monkeypatch):
    asked = []

    def spy(split):
        asked.append(split)
        return real(split)
    real = pose.base_digits
    monkeypatch.setattr(pose, "base_digits", spy)
    pose.pose_stream.__wrapped__("test", sequences=1, length=60)
    pose.pose_frames_iid.__wrapped__("train", 8)
    assert asked == ["test", "train"]
    a = pose.pose_stream.__wrapped__("val", sequences=1, length=60)
    b = pose.pose_stream.__wrapped__("test", sequences=1, length=60)
    assert not np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_sequence_has_manoeuvres_and_occlusions(split):
    s = pose.pose_stream(split)
    assert len(s.frames) == 4 * 300
    for q in range(4):
        counts = np.bincount(s.event[s.sequence == q], minlength=3)
        assert counts[pose.MANOEUVRE] >= 10 and counts[pose.OCCLUDED] >= 10, (q, counts)
        assert counts[pose.SMOOTH] > 0.6 * 300


def test_manoeuvres_are_fast_and_smooth_frames_are_slow():
    s = pose.pose_stream("val")
    step = np.abs(np.diff(s.pose, axis=0)).mean(1)                     # (T-1,) mean |change| per frame
    same, event = s.sequence[1:] == s.sequence[:-1], s.event[1:]
    smooth, fast = step[same & (event != pose.MANOEUVRE)], step[same & (event == pose.MANOEUVRE)]
    assert fast.mean() > 8 * smooth.mean()
    assert smooth.max() < 0.01 and np.median(fast) > 0.02
    span = [np.abs(s.pose[i:j].max(0) - s.pose[i:j].min(0)) for i, j in _runs(s.event == pose.MANOEUVRE)]
    assert all(5 <= j - i <= 15 for i, j in _runs(s.event == pose.MANOEUVRE))
    assert all((d > 0.25).sum() >= 2 for d in span)                    # at least two DoF move far


def _runs(flags):
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    return list(zip(np.where(edges == 1)[0], np.where(edges == -1)[0]))


def test_occluder_covers_a_good_part_of_the_digit():
    glyphs, _ = pose.base_digits("val")
    n = 64
    which = np.arange(n)
    p01 = torch.rand(n, 4, generator=torch.Generator().manual_seed(0))
    bars = pose._occluders(torch.Generator().manual_seed(1), n, torch.ones(n))
    bg = torch.full((n, 1, 96, 96), 0.3)
    clear = pose._draw(glyphs, which, p01, bars * torch.tensor([0, 1, 1, 1, 1.0]), bg, torch.Generator().manual_seed(2))
    hidden = pose._draw(glyphs, which, p01, bars, bg, torch.Generator().manual_seed(2))
    ink = clear > 0.6
    covered = (np.abs(clear - hidden) > 0.15) & ink
    fraction = covered.sum((1, 2, 3)) / ink.sum((1, 2, 3))
    assert fraction.mean() > 0.3 and (fraction > 0.1).mean() > 0.9


def test_iid_frames_cover_the_ranges_with_some_occlusions():
    s = pose.pose_frames_iid.__wrapped__("train", 400)
    assert s.frames.shape == (400, 1, 96, 96) and s.pose.shape == (400, 4)
    assert s.pose.min() >= 0 and s.pose.max() <= 1 and (s.pose.max(0) - s.pose.min(0)).min() > 0.9
    assert 0.06 < (s.event == pose.OCCLUDED).mean() < 0.2 and set(s.event.tolist()) <= {pose.SMOOTH, pose.OCCLUDED}
    other = pose.pose_frames_iid.__wrapped__("train", 16, draw=1)
    assert not np.array_equal(other.pose, s.pose[:16])


def test_mae_figures():
    true = np.full((10, 4), 0.5, np.float32)
    pred = true + np.array([0.1, -0.05, 0.0, 0.05], np.float32)
    pred = np.concatenate([pred, np.full((10, 1), 9.0, np.float32)], 1)     # an aux column is ignored
    r = pose.mae(pred, true)
    assert r["x_px"] == pytest.approx(5.6, abs=1e-4) and r["y_px"] == pytest.approx(2.8, abs=1e-4)
    assert r["size_px"] == pytest.approx(0.0) and r["angle_deg"] == pytest.approx(np.degrees(0.1), abs=1e-3)
    assert r["nmae_x"] == pytest.approx(0.1) and r["nmae_angle"] == pytest.approx(0.05)
    assert r["nmae"] == pytest.approx(0.05, abs=1e-6)
    assert np.allclose(pose.frame_error(pred, true), 0.05)


@pytest.mark.parametrize("name", list(POSE_BUILDERS))
def test_pose_model_shapes(name):
    model = build_pose(name).eval()
    with torch.no_grad():
        out = model(torch.rand(3, *POSE_INPUT))
    small = name in {s for s, _ in POSE_PAIRS.values()}
    assert has_aux(model) == small
    assert out.shape == (3, 5 if small else 4)
    if small:
        assert (out[:, 4] >= 0).all()


@pytest.mark.parametrize("name", [s for s, _ in POSE_PAIRS.values()])
def test_small_model_onnx_carries_the_aux_output(name, tmp_path):
    model = build_pose(name, seed=1).eval()
    x = torch.rand(4, *POSE_INPUT, generator=torch.Generator().manual_seed(0))
    path = export_onnx(model, x[:1], tmp_path / f"{name}.onnx", "x", ["y"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_training_stages_touch_only_their_own_parameters():
    s = pose.pose_frames_iid("train", 32)
    model = build_pose("pose_cnn_small")
    aux0 = {k: v.clone() for k, v in model.head.aux.state_dict().items()}
    train_pose_model(model, s.frames, s.pose, epochs=1, batch=16)
    assert all(torch.equal(v, model.head.aux.state_dict()[k]) for k, v in aux0.items())
    rest0 = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.aux.")}
    train_pose_aux(model, s.frames, s.pose, epochs=2, batch=16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in rest0.items())
    assert not all(torch.equal(v, model.head.aux.state_dict()[k]) for k, v in aux0.items())
