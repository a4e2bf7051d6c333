"""A 4-DoF pose-regression stream (issue 18), after "Adaptive Deep Learning for Efficient Visual Pose
Estimation aboard Ultra-low-power Nano-drones": one digit at a time over a textured 96x96 background,
labelled per frame with its pose (x, y, size, angle) = centre in pixels, apparent size in pixels (the
paper's distance) and in-plane rotation in radians (the paper's heading).

    s = pose_stream("val")                  # PoseStream: frames (T, 1, 96, 96), pose (T, 4) in [0, 1], sequence, event
    t = pose_frames_iid("train", 20000)     # independent frames with uniform random poses, for training
    mae(pred01, s.pose)                     # {"x_px": .., "angle_deg": .., "nmae_x": .., "nmae": ..}
    denormalise(s.pose)                     # (T, 4) in pixels / radians

Targets are normalised to [0, 1] per DoF over POSE_RANGES. The stream moves smoothly (cosine-eased
waypoints every 40-90 frames plus a slow wobble), with a few FAST manoeuvres per sequence (5-15 frames,
0.3-0.55 of the range in at least two DoF) and a few OCCLUSIONS (5-20 frames, a dark or background-
coloured bar over about half of the digit; the label stays the true pose). Digits come from the split's
own held-out digits (data.base_digits), so no test digit is seen in training. Seeds are fixed.
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from split.vision.data import SEEDS, background, base_digits, compose, render

POSE_NAMES = ("x", "y", "size", "angle")
POSE_RANGES = np.array([[20.0, 76.0], [20.0, 76.0], [20.0, 40.0], [-1.0, 1.0]], np.float32)   # (4, [lo, hi])
UNITS = ("x_px", "y_px", "size_px", "angle_deg")
SMOOTH, MANOEUVRE, OCCLUDED = 0, 1, 2          # PoseStream.event codes
FRAME = 96
_LO, _HI = 0.08, 0.92                          # stream waypoints stay this far inside the range


def normalise(pose_px: np.ndarray) -> np.ndarray:
    """(..., 4) pose in pixels / radians -> (..., 4) in [0, 1] over POSE_RANGES."""
    return ((pose_px - POSE_RANGES[:, 0]) / (POSE_RANGES[:, 1] - POSE_RANGES[:, 0])).astype(np.float32)


def denormalise(pose01: np.ndarray) -> np.ndarray:
    """(..., 4) in [0, 1] -> (..., 4) pose in pixels / radians."""
    return (POSE_RANGES[:, 0] + pose01 * (POSE_RANGES[:, 1] - POSE_RANGES[:, 0])).astype(np.float32)


def frame_error(pred01: np.ndarray, true01: np.ndarray) -> np.ndarray:
    """Per-frame normalised error (T,): mean over the 4 DoF of |pred - true| (extra columns of pred ignored).
    This is what a small model's auxiliary output predicts."""
    return np.abs(np.asarray(pred01)[:, :4] - true01).mean(1)


def mae(pred01: np.ndarray, true01: np.ndarray) -> dict:
    """Mean absolute error of normalised poses (T, >=4) vs (T, 4); a 5th (aux) column of pred is ignored.

    x_px, y_px, size_px: MAE in pixels; angle_deg: MAE in degrees; nmae_<dof>: MAE of the normalised
    value (a fraction of the DoF's range); nmae: the mean of the four nmae_<dof> (the one number the
    benchmark compares)."""
    err = np.abs(np.asarray(pred01, np.float64)[:, :4] - true01).mean(0)                   # (4,) normalised
    natural = err * (POSE_RANGES[:, 1] - POSE_RANGES[:, 0])
    natural[3] = np.degrees(natural[3])
    out = {unit: float(v) for unit, v in zip(UNITS, natural)}
    out.update({f"nmae_{name}": float(v) for name, v in zip(POSE_NAMES, err)})
    out["nmae"] = float(err.mean())
    return out


@dataclass
class PoseStream:
    frames: np.ndarray      # (T, 1, 96, 96) float32
    pose: np.ndarray        # (T, 4) float32, normalised (x, y, size, angle) in [0, 1]
    sequence: np.ndarray    # (T,) int64: which sequence a frame belongs to
    event: np.ndarray       # (T,) int64: SMOOTH, MANOEUVRE or OCCLUDED


def _draw(glyphs: np.ndarray, which: np.ndarray, pose01: torch.Tensor, occluder: torch.Tensor,
          bg: torch.Tensor, g: torch.Generator) -> np.ndarray:
    """Render frames (N, 1, 96, 96). occluder (N, 5): [on, vertical, dark, thickness, offset] (fractions
    of the digit size); the bar is axis-aligned, spans 1.3x the size across the digit, follows it."""
    px = torch.from_numpy(denormalise(pose01.numpy()))                                  # (N, 4)
    centre, size = px[:, :2], px[:, 2]
    glyph = render(torch.from_numpy(glyphs[which]), FRAME, size, px[:, 3], centre)      # (N, 1, 96, 96)
    on, vertical, dark, thick, offset = occluder.T
    half_w = torch.where(vertical > 0, thick * size / 2, 0.65 * size)
    half_h = torch.where(vertical > 0, 0.65 * size, thick * size / 2)
    cx = centre[:, 0] + torch.where(vertical > 0, offset * size, 0)
    cy = centre[:, 1] + torch.where(vertical > 0, 0, offset * size)
    grid = torch.arange(FRAME, dtype=torch.float32) + 0.5
    mask = ((grid[None, None, :] - cx[:, None, None]).abs() < half_w[:, None, None]) \
        & ((grid[None, :, None] - cy[:, None, None]).abs() < half_h[:, None, None]) & (on[:, None, None] > 0)
    mask = mask[:, None].float()                                                        # (N, 1, 96, 96)
    shade = 0.02 + 0.06 * torch.rand(len(which), 1, 1, 1, generator=g)
    bg = bg * (1 - mask * dark[:, None, None, None]) + shade * mask * dark[:, None, None, None]
    return compose(bg, glyph * (1 - mask), g).numpy()


def _occluders(g: torch.Generator, n: int, on: torch.Tensor) -> torch.Tensor:
    """(n, 5) random bars: [on, vertical, dark, thickness 0.4-0.6, offset -0.15..0.15]."""
    r = torch.rand(n, 4, generator=g)
    return torch.stack([on.float(), (r[:, 0] < 0.5).float(), (r[:, 1] < 0.5).float(),
                        0.4 + 0.2 * r[:, 2], 0.3 * r[:, 3] - 0.15], 1)


def _knots(g: torch.Generator, length: int) -> tuple[list, np.ndarray]:
    """Waypoints [(t, pose01 (4,))] and per-frame events (manoeuvres only) for one sequence."""
    rand = lambda *s: torch.rand(*s, generator=g).numpy()                               # noqa: E731
    randint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))              # noqa: E731
    event = np.zeros(length, np.int64)
    knots = [(0, _LO + (_HI - _LO) * rand(4))]
    n_man = max(1, min(randint(2, 5), length // 60))
    slot = length / n_man

    def smooth_until(end: int):
        while knots[-1][0] < end:
            t = min(end, knots[-1][0] + randint(40, 91))
            if end - t < 20:
                t = end
            step = (0.5 * rand(4) - 0.25) * min(1.0, (t - knots[-1][0]) / 60)           # <= ~0.0065 / frame
            knots.append((t, np.clip(knots[-1][1] + step, _LO, _HI)))
    for k in range(n_man):
        span = randint(5, 16)
        lo, hi = int(k * slot) + 10, int((k + 1) * slot) - span - 10
        start = lo + randint(0, max(1, hi - lo))
        smooth_until(start - 1)
        cur = knots[-1][1]
        dofs = np.argsort(rand(4))[:randint(2, 5)]                                      # 2-4 DoF change fast
        new = cur.copy()
        for d, m, up in zip(dofs, 0.3 + 0.25 * rand(len(dofs)), rand(len(dofs)) < 0.5):
            room_up, room_down = _HI - cur[d], cur[d] - _LO
            if (room_up if up else room_down) < 0.3:
                up = not up
            new[d] = cur[d] + (min(m, room_up) if up else -min(m, room_down))
        knots.append((start + span - 1, new))
        event[start:start + span] = MANOEUVRE
    smooth_until(length - 1)
    return knots, event


def _trajectory(knots: list, length: int, g: torch.Generator) -> np.ndarray:
    """Cosine-eased interpolation between the waypoints plus a slow wobble: (length, 4) in [0, 1]."""
    t = np.arange(length)
    pose = np.empty((length, 4), np.float32)
    for (t0, v0), (t1, v1) in zip(knots[:-1], knots[1:]):
        u = (t[t0:t1 + 1] - t0) / max(1, t1 - t0)
        pose[t0:t1 + 1] = v0 + (v1 - v0) * ((1 - np.cos(np.pi * u)) / 2)[:, None]
    period, phase = 40 + 40 * torch.rand(4, generator=g).numpy(), 6.28 * torch.rand(4, generator=g).numpy()
    pose += 0.015 * np.sin(2 * np.pi * t[:, None] / period + phase)
    return np.clip(pose, 0, 1).astype(np.float32)


@lru_cache(maxsize=4)
def pose_stream(split: str, sequences: int = 4, length: int = 300) -> PoseStream:
    """Sequences of one digit at a time (a new one every 60-150 frames) over a fixed background."""
    if length < 60:
        raise ValueError(f"a sequence needs at least 60 frames (room for a manoeuvre), not {length}")
    glyphs, _ = base_digits(split)
    g = torch.Generator().manual_seed(300 + SEEDS[split])
    frames, poses, seq, events = [], [], [], []
    for s in range(sequences):
        bg = background(g, 1)
        knots, event = _knots(g, length)
        pose = _trajectory(knots, length, g)
        occluder = torch.zeros(length, 5)
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):                    # 2-4 occlusions
            span = int(torch.randint(5, 21, (1,), generator=g))
            for _try in range(100):
                start = int(torch.randint(3, max(4, length - span - 3), (1,), generator=g))
                if (event[max(0, start - 3):start + span + 3] == SMOOTH).all():
                    event[start:start + span] = OCCLUDED
                    occluder[start:start + span] = _occluders(g, 1, torch.ones(1))      # one bar per occlusion
                    break
        which = np.empty(length, np.int64)
        start = 0
        while start < length:
            span = int(torch.randint(60, 151, (1,), generator=g))
            which[start:start + span] = int(torch.randint(len(glyphs), (1,), generator=g))
            start += span
        with torch.no_grad():
            frames.append(_draw(glyphs, which, torch.from_numpy(pose), occluder, bg.expand(length, -1, -1, -1), g))
        poses.append(pose)
        seq.append(np.full(length, s, np.int64))
        events.append(event)
    return PoseStream(np.concatenate(frames).astype(np.float32), np.concatenate(poses), np.concatenate(seq),
                      np.concatenate(events))


@lru_cache(maxsize=4)
def pose_frames_iid(split: str, n: int, draw: int = 0, occluded: float = 0.12) -> PoseStream:
    """Independent frames: random digit, background and pose uniform over POSE_RANGES; a fraction
    `occluded` carries a bar (event OCCLUDED). `draw` picks an independent set of the same split."""
    glyphs, _ = base_digits(split)
    g = torch.Generator().manual_seed(400 + 10 * draw + SEEDS[split])
    which = torch.randint(len(glyphs), (n,), generator=g).numpy()
    pose = torch.rand(n, 4, generator=g)
    on = torch.rand(n, generator=g) < occluded
    occluder = _occluders(g, n, on)
    frames = np.empty((n, 1, FRAME, FRAME), np.float32)
    with torch.no_grad():
        for i in range(0, n, 2048):                                                     # bounded memory
            j = slice(i, i + 2048)
            frames[j] = _draw(glyphs, which[j], pose[j], occluder[j], background(g, len(which[j])), g)
    return PoseStream(frames, pose.numpy(), np.arange(n, dtype=np.int64),
                      np.where(on.numpy(), OCCLUDED, SMOOTH).astype(np.int64))
