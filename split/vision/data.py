"""Data made on the fly from scikit-learn's bundled digits (1,797 8x8 images; no downloads).

    images, labels = digits("train")       # (N, 1, 64, 64) float32 in [0, 1], (N,) int64
    stream = frame_stream("test")          # FrameStream: frames (T, 1, 96, 96), labels, xy, sequence ids

Fixed seeds and fixed splits: the 1,797 digits are split 60/20/20 (stratified, seed 0) into
train / val / test before any augmentation, so no test digit is ever seen in training, even
augmented. Digits are upscaled to 64x64 with a random rotation (+-15 deg), scale and shift,
contrast jitter and sensor noise. The frame stream moves one digit at a time smoothly over a
textured 96x96 background; the digit changes every 30-90 frames; each frame is labelled with
the digit's class and its centre (x, y) in [0, 1].
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")
COPIES = {"train": 4, "val": 1, "test": 2}           # augmented copies of each digit
SEEDS = {"train": 1, "val": 2, "test": 3}


@lru_cache(maxsize=1)
def _split_indices() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, rest = train_test_split(idx, test_size=0.4, stratify=digits.target, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
    images = (digits.images / 16.0).astype(np.float32)                       # (1797, 8, 8)
    return {"images": images, "labels": digits.target.astype(np.int64), "train": train, "val": val, "test": test}


def base_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's original 8x8 digits (N, 8, 8) in [0, 1] and labels (N,)."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not one of {SPLITS}")
    data = _split_indices()
    return data["images"][data[split]], data["labels"][data[split]]


def render(glyphs: torch.Tensor, out: int, size: torch.Tensor, angle: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Draw 8x8 glyphs (N, 8, 8) into (N, 1, out, out): `size` in pixels, `angle` in radians,
    `centre` (N, 2) in pixels (x, y). Bilinear, zero outside the glyph."""
    src = F.interpolate(glyphs[:, None], size=32, mode="bicubic", align_corners=False).clamp(0, 1)  # (N, 1, 32, 32)
    n = glyphs.shape[0]
    inv = out / size                                                     # output extent / glyph extent
    cos, sin = torch.cos(angle) * inv, torch.sin(angle) * inv
    shift = (centre / out) * 2 - 1                                       # (N, 2) in [-1, 1]
    theta = torch.stack([torch.stack([cos, -sin, -(cos * shift[:, 0] - sin * shift[:, 1])], 1),
                         torch.stack([sin, cos, -(sin * shift[:, 0] + cos * shift[:, 1])], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, (n, 1, out, out), align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@lru_cache(maxsize=4)
def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Augmented 64x64 digits of one split: (N, 1, 64, 64) float32, (N,) int64."""
    glyphs, labels = base_digits(split)
    g = torch.Generator().manual_seed(SEEDS[split])
    glyphs = torch.from_numpy(np.repeat(glyphs, COPIES[split], 0))
    labels = np.repeat(labels, COPIES[split], 0)
    n = glyphs.shape[0]
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=g)  # noqa: E731
    with torch.no_grad():
        x = render(glyphs, 64, u(38, 54), u(-0.26, 0.26), 32 + u(-6, 6, n, 2))
        x = x * u(0.7, 1.2)[:, None, None, None] + 0.05 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1).numpy().astype(np.float32), labels


def background(g: torch.Generator, n: int, size: int = 96) -> torch.Tensor:
    """Textured backgrounds (n, 1, size, size): a few random gratings plus fine noise, in [0.1, 0.5]."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = torch.full((n, size, size), 0.3)
    for _ in range(4):
        freq = 0.05 + 0.25 * torch.rand(n, 2, generator=g)                      # cycles per pixel * 2pi / ...
        phase = 6.28 * torch.rand(n, 1, 1, generator=g)
        out += 0.05 * torch.sin(freq[:, 0, None, None] * xx + freq[:, 1, None, None] * yy + phase)
    out += 0.04 * torch.randn(out.shape, generator=g)
    return out.clamp(0.1, 0.5)[:, None]


def compose(bg: torch.Tensor, glyph: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """White digit over the background, plus sensor noise: (n, 1, 96, 96)."""
    frame = bg * (1 - glyph) + glyph + 0.03 * torch.randn(bg.shape, generator=g)
    return frame.clamp(0, 1)


@dataclass
class FrameStream:
    frames: np.ndarray      # (T, 1, 96, 96) float32
    labels: np.ndarray      # (T,) int64
    xy: np.ndarray          # (T, 2) float32, digit centre / 96
    sequence: np.ndarray    # (T,) int64: which sequence a frame belongs to


@lru_cache(maxsize=4)
def frame_stream(split: str, sequences: int = 4, length: int = 250) -> FrameStream:
    """Smoothly moving digits over a fixed textured background per sequence."""
    glyphs, labels = base_digits(split)
    g = torch.Generator().manual_seed(100 + SEEDS[split])
    frames, ys, xys, seq = [], [], [], []
    for s in range(sequences):
        bg = background(g, 1)
        t = torch.arange(length, dtype=torch.float32)
        amp, freq, phase = 8 + 14 * torch.rand(2, 2, generator=g), 0.01 + 0.05 * torch.rand(2, 2, generator=g), \
            6.28 * torch.rand(2, 2, generator=g)
        centre = 48 + (amp[:, :, None] * torch.sin(freq[:, :, None] * t + phase[:, :, None])).sum(1).T  # (T, 2)
        centre = centre.clamp(20, 76)
        which = np.empty(length, np.int64)
        start = 0
        while start < length:                                   # a new digit every 30-90 frames
            span = int(torch.randint(30, 91, (1,), generator=g))
            which[start:start + span] = int(torch.randint(len(glyphs), (1,), generator=g))
            start += span
        size = 30 + 4 * torch.sin(0.02 * t)                     # slow zoom, like a drone moving
        angle = 0.2 * torch.sin(0.03 * t + s)
        with torch.no_grad():
            glyph = render(torch.from_numpy(glyphs[which]), 96, size, angle, centre)
            frames.append(compose(bg.expand(length, -1, -1, -1), glyph, g).numpy())
        ys.append(labels[which])
        xys.append((centre / 96).numpy())
        seq.append(np.full(length, s))
    return FrameStream(np.concatenate(frames).astype(np.float32), np.concatenate(ys),
                       np.concatenate(xys).astype(np.float32), np.concatenate(seq))


@lru_cache(maxsize=4)
def frames_iid(split: str, n: int) -> FrameStream:
    """Independent frames (random digit, position, background) for training the frame models."""
    glyphs, labels = base_digits(split)
    g = torch.Generator().manual_seed(200 + SEEDS[split])
    which = torch.randint(len(glyphs), (n,), generator=g).numpy()
    centre = 20 + 56 * torch.rand(n, 2, generator=g)
    size = 26 + 8 * torch.rand(n, generator=g)
    angle = 0.25 * (2 * torch.rand(n, generator=g) - 1)
    with torch.no_grad():
        glyph = render(torch.from_numpy(glyphs[which]), 96, size, angle, centre)
        frames = compose(background(g, n), glyph, g).numpy()
    return FrameStream(frames.astype(np.float32), labels[which], (centre / 96).numpy().astype(np.float32),
                       np.arange(n))
