"""Where a clip's frames and crop come from (the same rules in every backend):
the window and its frame ids, SlowFast's spatial sampling, and the random
stream of one sample."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    tau: int = 8
    alpha: int = 2
    slow_frames: int = 8

    def __post_init__(self):
        if self.tau < 1 or self.alpha < 1 or self.slow_frames < 1:
            raise ValueError("tau, alpha and slow_frames must be at least 1")
        if self.tau % self.alpha:
            raise ValueError(f"tau ({self.tau}) must be a multiple of alpha ({self.alpha}): "
                             "the fast clip takes every tau/alpha-th frame")

    @property
    def window(self) -> int:
        return self.slow_frames * self.tau

    @property
    def stride(self) -> int:
        return self.tau // self.alpha

    @property
    def fast_frames(self) -> int:
        return self.alpha * self.slow_frames

    def starts(self, num_frames: int, train: bool, rng: np.random.Generator | None = None,
               num_clips: int = 1) -> list[int]:
        """Window starts: uniform over the valid starts in training; in evaluation
        ``num_clips`` evenly spaced windows (one: the centre window)."""
        delta = num_frames - self.window
        if delta < 0:
            return [0] * (1 if train else num_clips)
        if train:
            return [int(rng.integers(0, delta + 1))]
        return [(delta * (2 * k + 1)) // (2 * num_clips) for k in range(num_clips)]

    def frame_ids(self, start: int, num_frames: int) -> np.ndarray:
        return (start + self.stride * np.arange(self.fast_frames, dtype=np.int64)) % max(1, num_frames)


def scale_range(crop_size: int) -> tuple[int, int]:
    """SlowFast-style short-side jitter: [crop*8/7, crop*10/7] ([256, 320] for 224)."""
    return int(round(crop_size * 8 / 7)), int(round(crop_size * 10 / 7))


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side ``short_side``, aspect kept (rounded half up)."""
    if height <= width:
        return short_side, int(math.floor(width * short_side / height + 0.5))
    return int(math.floor(height * short_side / width + 0.5)), short_side


@dataclass(frozen=True)
class Crop:
    """Resize the frame to (height, width), take the crop_size square at (y0, x0), mirror if flip."""
    height: int
    width: int
    y0: int
    x0: int
    flip: bool


def crop_params(height: int, width: int, crop_size: int, train: bool, rng: np.random.Generator | None = None,
                crop_idx: int = 1, num_crops: int = 1) -> Crop:
    """SlowFast's spatial sampling. Training: short side S ~ U[crop*8/7,
    crop*10/7] (integers), a random crop_size square, a coin-flip mirror.
    Evaluation: S = crop*8/7 and the centre square, or for num_crops=3 the
    left/top, centre and right/bottom squares along the long side."""
    lo, hi = scale_range(crop_size)
    short = int(rng.integers(lo, hi + 1)) if train else lo
    h, w = scaled_size(height, width, max(short, crop_size))
    if train:
        return Crop(h, w, int(rng.integers(0, h - crop_size + 1)), int(rng.integers(0, w - crop_size + 1)),
                    bool(rng.integers(0, 2)))
    y0, x0 = (h - crop_size) // 2, (w - crop_size) // 2
    if num_crops > 1:
        frac = crop_idx / (num_crops - 1)
        if h > w:
            y0 = int(math.floor((h - crop_size) * frac + 0.5))
        else:
            x0 = int(math.floor((w - crop_size) * frac + 0.5))
    return Crop(h, w, y0, x0, False)


def sample_rng(seed: int, epoch: int, index: int, view: int = 0) -> np.random.Generator:
    """The random stream of one sample: the same in every worker, rank and run."""
    return np.random.default_rng([seed, epoch, index, view])
