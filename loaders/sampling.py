"""Which frames and which crop a clip takes: the sampling policy, declared once.

Every backend asks a :class:`ClipSampler` (pytorchvideo's ``ClipSampler``
pattern: a strategy object) for the views of a sample and only executes them:
PyAV and DALI decode the frame ids it names and resize and crop as its
:class:`Crop` says; FFCV reads the same plans from its metadata. A sampler
sees a sample as a :class:`ClipInfo` (frame count, size, rate and, for
time-anchored samples, where the member starts on the annotations' clock and
the event's time) and the sample's random stream; it returns one
:class:`View` per clip x crop.

* :class:`VideoClips`: whole videos (pretraining, recognition). Training: a
  window start uniform over the valid starts and SlowFast's random crop;
  evaluation: ``num_clips`` evenly spaced windows (one: the centre window) x
  ``num_crops`` crops at the short side crop*8/7.
* :class:`KeyframeClips`: AVA keyframes. The window is centred on the
  keyframe as PySlowFast takes it (fast frame k at ``c - T*tau/2 +
  k*tau/alpha``, ``c`` the keyframe's frame, clamped to the member); training
  crops as above, evaluation takes the whole frame with its short side scaled
  to ``eval_short_side``.
* :class:`ObservedClips`: EPIC-Kitchens anticipation. The clip covers the
  ``tau_o`` seconds that end ``tau_a`` seconds before the segment starts,
  its frames spread evenly over them (the slow clip's T frames at
  ``tau_o / T`` apart); a window that starts before the video is clamped to
  frame 0 and the view says so.

Frames of time-anchored samples are chosen by time on the member's own
frame grid (``round((t - time_start) * fps)``), so the packed rate and the
source's never mix.
"""
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
    """Resize the frame to (height, width), take the window of the output size
    at (y0, x0), mirror if flip. The output is ``out_height`` x ``out_width``;
    0 there means the loader's crop_size square."""
    height: int
    width: int
    y0: int
    x0: int
    flip: bool
    out_height: int = 0
    out_width: int = 0

    def shape(self, size: int) -> tuple[int, int]:
        """(h, w) of the output, ``size`` being the loader's crop size."""
        return self.out_height or size, self.out_width or size

    def params(self, source_height: int, source_width: int, size: int) -> np.ndarray:
        """float32 [9]: the source size, the resized size, the window's corner,
        the output size and the mirror — what a graph engine (DALI) executes."""
        oh, ow = self.shape(size)
        return np.array([source_height, source_width, self.height, self.width, self.y0, self.x0, oh, ow,
                         float(self.flip)], np.float32)

    def boxes(self, boxes: np.ndarray, size: int) -> np.ndarray:
        """Boxes [K, 4] (x1, y1, x2, y2, normalised to the source frame) in the
        output's coordinates, normalised to it, clipped to it, mirrored with it."""
        oh, ow = self.shape(size)
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        x = np.clip(b[:, [0, 2]] * self.width - self.x0, 0, ow)
        y = np.clip(b[:, [1, 3]] * self.height - self.y0, 0, oh)
        if self.flip:
            x = ow - x[:, ::-1]
        return np.stack([x[:, 0] / ow, y[:, 0] / oh, x[:, 1] / ow, y[:, 1] / oh], 1).astype(np.float32)


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
    """The random stream of one sample: the same in every worker, rank, backend and run."""
    return np.random.default_rng([seed, epoch, index, view])


@dataclass(frozen=True)
class ClipInfo:
    """What a sampler knows of a sample before it is decoded."""
    num_frames: int
    height: int
    width: int
    fps: float = 30.0
    time_start: float = 0.0  # the annotations' clock at the member's frame 0
    time: float | None = None  # a time-anchored sample's time on that clock

    @classmethod
    def from_json(cls, info: dict, time: float | None = None) -> "ClipInfo":
        """From a member's KEY.json (make_shards), with an event's time."""
        return cls(int(info["num_frames"]), int(info["height"]), int(info["width"]), float(info["fps"]),
                   float(info.get("time_start", 0.0)), time)

    def frame_at(self, t: float) -> int:
        """The member frame shown at time ``t`` (the annotations' clock), unclamped."""
        return int(math.floor((t - self.time_start) * self.fps + 0.5))


@dataclass(frozen=True)
class View:
    """One clip of a sample: the fast frame ids (member frames), the crop and,
    with independent crops, the slow clip's own crop. ``clamped``: the window
    reached past the member's start or end and was held at its edge."""
    frame_ids: np.ndarray
    crop: Crop
    slow_crop: Crop | None = None
    clamped: bool = False


class ClipSampler:
    """The strategy every backend asks: the views of a sample (see the module docstring)."""

    def __init__(self, spec: ClipSpec, crop_size: int, train: bool, num_clips: int = 1, num_crops: int = 1,
                 independent_crops: bool = False):
        self.spec, self.crop_size, self.train = spec, crop_size, train
        self.num_clips, self.num_crops = (1, 1) if train else (num_clips, num_crops)
        self.independent_crops = independent_crops

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    def windows(self, info: ClipInfo, rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
        """Fast frame ids of each temporal view, and whether they were clamped."""
        raise NotImplementedError

    def crop(self, info: ClipInfo, rng: np.random.Generator, crop_idx: int) -> Crop:
        return crop_params(info.height, info.width, self.crop_size, self.train, rng, crop_idx, self.num_crops)

    def views(self, info: ClipInfo, rng: np.random.Generator) -> list[View]:
        """Every view, clip-major; the random draws in this order: the windows,
        then per view its crop (and the slow clip's crop)."""
        out = []
        for ids, clamped in self.windows(info, rng):
            for j in range(self.num_crops):
                crop = self.crop(info, rng, j)
                slow = self.crop(info, rng, j) if self.independent_crops else None
                out.append(View(ids, crop, slow, clamped))
        return out


class VideoClips(ClipSampler):
    """Whole videos: a random window in training, evenly spaced windows in
    evaluation; a video shorter than the window is looped from frame 0."""

    def windows(self, info, rng):
        n = info.num_frames
        return [(self.spec.frame_ids(s, n), False) for s in self.spec.starts(n, self.train, rng, self.num_clips)]


def _clamped(ids: np.ndarray, num_frames: int) -> tuple[np.ndarray, bool]:
    held = np.clip(ids, 0, max(0, num_frames - 1)).astype(np.int64)
    return held, bool((held != ids).any())


class KeyframeClips(ClipSampler):
    """AVA keyframes: the window centred on the keyframe (PySlowFast's
    ``c - T*tau/2 + k*tau/alpha``), one clip; evaluation takes the whole frame
    with its short side at ``eval_short_side`` (no crop)."""

    def __init__(self, *args, eval_short_side: int = 256, **kw):
        super().__init__(*args, **kw)
        self.num_clips = self.num_crops = 1
        self.eval_short_side = eval_short_side

    def windows(self, info, rng):
        c = info.frame_at(info.time)
        s = self.spec
        return [_clamped(c - s.window // 2 + s.stride * np.arange(s.fast_frames, dtype=np.int64), info.num_frames)]

    def crop(self, info, rng, crop_idx):
        if self.train:
            return super().crop(info, rng, crop_idx)
        h, w = scaled_size(info.height, info.width, self.eval_short_side)
        return Crop(h, w, 0, 0, False, h, w)


class ObservedClips(ClipSampler):
    """EPIC anticipation: the ``tau_o`` seconds ending ``tau_a`` seconds before
    the segment's start, fast frame k at ``start - tau_a - tau_o + k * tau_o /
    (alpha * T)``; one clip, SlowFast's crops."""

    def __init__(self, *args, tau_a: float = 1.0, tau_o: float = 1.0, **kw):
        super().__init__(*args, **kw)
        if tau_a < 0 or tau_o <= 0:
            raise ValueError(f"tau_a must be >= 0 and tau_o > 0 (got {tau_a}, {tau_o})")
        self.num_clips = 1
        self.tau_a, self.tau_o = tau_a, tau_o

    def windows(self, info, rng):
        begin = info.time - self.tau_a - self.tau_o
        f = self.spec.fast_frames
        ids = np.array([info.frame_at(begin + k * self.tau_o / f) for k in range(f)], np.int64)
        return [_clamped(ids, info.num_frames)]


SAMPLERS = {"video": VideoClips, "ava": KeyframeClips, "epic": ObservedClips}
