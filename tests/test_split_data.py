"""The digits data and the frame stream: fixed, disjoint splits; repeatable augmentation."""
import numpy as np

from split.vision import data


def test_splits_are_fixed_disjoint_and_stratified():
    idx = data._split_indices()
    train, val, test = (set(idx[s].tolist()) for s in data.SPLITS)
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 1797 and len(test) == 360
    _, labels = data.base_digits("test")
    assert np.bincount(labels).min() >= 35                      # every class in the test split


def test_augmentation_is_repeatable():
    a, ya = data.digits.__wrapped__("val")
    b, yb = data.digits.__wrapped__("val")
    assert a.shape == (359, 1, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert 0 <= a.min() and a.max() <= 1


def test_frame_stream_moves_smoothly_and_is_labelled():
    s = data.frame_stream.__wrapped__("val", sequences=1, length=60)
    assert s.frames.shape == (60, 1, 96, 96) and s.labels.shape == (60,) and s.xy.shape == (60, 2)
    assert np.all((s.xy > 0) & (s.xy < 1))
    assert np.abs(np.diff(s.xy, axis=0)).max() < 0.05           # under 5 px per frame
    assert len(set(s.labels.tolist())) >= 1
