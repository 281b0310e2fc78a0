"""What every backend shares: finding shards, where a clip's frames and crop
come from, the rank split, and the batch contract.

The contract (one dict per batch, whatever the backend):

- ``fast``: float [B, 3, alpha*slow_frames, H, W] — every (tau/alpha)-th frame
  of a window of slow_frames*tau source frames, from the window start;
- ``slow``: float [B, 3, slow_frames, H, W] — every tau-th frame, i.e.
  ``fast[:, :, ::alpha]`` (the same frames, the same crop);
- ``label``, ``index``: int64 [B] (index: the video's position in manifest order);
- ``frame_ids``: int64 [B, alpha*slow_frames] — the source frame numbers of
  ``fast``. A video shorter than the window is looped: frame ids wrap around
  modulo its frame count, starting at frame 0.

With ``normalize=True`` pixels are ``(x - 255*0.45) / (255*0.225)`` per channel
(the Kinetics statistics of PySlowFast); with ``normalize=False`` they are
floats in 0..255.

A member that cannot be decoded is reported (``loader.stats``: ``skipped``
and ``skip_reasons``, and a warning) and the epoch goes on. Evaluation
(``train=False``) yields every decodable video exactly once, with all its
views: the lost one is left out and the batch it fell in is smaller.
Training keeps batch sizes and step counts by substituting other clips
(``stats.substituted`` counts them). Under DDP every rank reads the same
number of samples: a rank's range may repeat its first video once (padding).
"""
from __future__ import annotations

import glob
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

MEAN = (0.45 * 255, 0.45 * 255, 0.45 * 255)
STD = (0.225 * 255, 0.225 * 255, 0.225 * 255)
H264_LIKE = {"h264", "hevc", "h265", "mpeg4", "av1"}


# --------------------------------------------------------------------------- shards
@dataclass
class Shards:
    """Tars in manifest order, their sample counts and what the manifest says."""
    tars: list[str]
    counts: list[int]
    manifest: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def idx(self, tar: str) -> str:
        return tar[:-4] + ".idx"

    @property
    def codec(self) -> str | None:
        return (self.manifest.get("settings") or {}).get("codec")


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand
    return list(braceexpand.braceexpand(pattern))


def _idx_count(idx_path: str) -> int:
    with open(idx_path) as f:
        return int(f.readline().split()[1])


def resolve_shards(shards) -> Shards:
    """``shards``: a manifest.json, a shard folder, a brace pattern, or a list of tars."""
    if isinstance(shards, Shards):
        return shards
    manifest: dict = {}
    if isinstance(shards, (list, tuple)):
        tars = [str(t) for t in shards]
    else:
        shards = str(shards)
        if os.path.isdir(shards) and os.path.exists(os.path.join(shards, "manifest.json")):
            shards = os.path.join(shards, "manifest.json")
        if shards.endswith(".json"):
            try:
                with open(shards, encoding="utf-8") as f:
                    manifest = json.load(f)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"cannot read the manifest {shards}: {e}") from None
            root = os.path.dirname(os.path.abspath(shards))
            tars = [os.path.join(root, s["path"]) for s in manifest.get("shards", [])]
            counts = [int(s["num_samples"]) for s in manifest.get("shards", [])]
            if not tars or sum(counts) == 0:
                raise ValueError(f"{shards}: the manifest lists no samples (was every video in failed.jsonl?)")
            missing = [t for t in tars if not os.path.exists(t)]
            if missing:
                raise FileNotFoundError(f"{shards}: shard {missing[0]} is missing")
            return Shards(tars, counts, manifest)
        if os.path.isdir(shards):
            tars = sorted(glob.glob(os.path.join(shards, "*.tar")))
            if not tars:
                raise FileNotFoundError(f"no .tar shards in {shards}")
        else:
            tars = _expand_braces(shards)
    missing = [t for t in tars if not os.path.exists(t)]
    if not tars or missing:
        raise FileNotFoundError(f"shard {missing[0] if missing else shards} does not exist")
    for t in tars:
        if not os.path.exists(t[:-4] + ".idx"):
            raise FileNotFoundError(f"{t} has no index {t[:-4]}.idx beside it (make_shards writes one; "
                                    "DALI's wds2idx makes one for other tars)")
    parent = os.path.join(os.path.dirname(os.path.abspath(tars[0])), "manifest.json")
    if os.path.exists(parent):
        with open(parent, encoding="utf-8") as f:
            manifest = json.load(f)
    return Shards(tars, [_idx_count(t[:-4] + ".idx") for t in tars], manifest)


# --------------------------------------------------------------------------- sampling
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


# --------------------------------------------------------------------------- ranks
def rank_indices(total: int, rank: int, world_size: int, epoch: int = 0) -> tuple[list[int], int]:
    """Global sample positions this rank reads in an epoch, and how many padded repeats.

    The manifest order is cut into ``world_size`` contiguous ranges (sequential
    reads) that rotate across epochs; every rank reads ceil(total/world_size)
    samples, so a shorter range repeats its first sample once: equal steps
    for DDP, every video seen, at most one padded repeat per rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    part = (rank + epoch) % world_size
    lo = (total * part) // world_size
    hi = (total * (part + 1)) // world_size
    per_rank = math.ceil(total / world_size)
    idx = list(range(lo, hi)) or [lo % total]  # more ranks than videos: repeat one
    pad = per_rank - len(idx)
    return idx + idx[:1] * pad, pad


# --------------------------------------------------------------------------- epochs
class EpochState:
    """Epoch bookkeeping of the backends that replay an epoch exactly (pyav,
    synthetic): ``len``, ``set_epoch`` and a state to resume mid-epoch."""
    batch_size: int
    drop_last: bool = False
    epoch = _batches = _resume_batches = 0

    def samples_per_epoch(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.samples_per_epoch()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._batches = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration replays epoch ``epoch`` from batch ``batches``."""
        self.epoch, self._resume_batches = int(state["epoch"]), int(state["batches"])

    def _take_resume(self) -> int:
        start, self._resume_batches = self._resume_batches, 0
        self._batches = start
        return start


# --------------------------------------------------------------------------- stats
@dataclass
class LoaderStats:
    clips: int = 0
    batches: int = 0
    skipped: int = 0
    skip_reasons: list = field(default_factory=list)
    wait_s: float = 0.0
    substituted: int = 0  # training clips yielded in place of lost ones (evaluation never substitutes)

    def skip(self, key: str, reason: str, limit: int = 1000) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < limit:
            self.skip_reasons.append({"key": key, "reason": reason})

    def as_dict(self) -> dict:
        return {"clips": self.clips, "batches": self.batches, "skipped": self.skipped,
                "skip_reasons": list(self.skip_reasons), "wait_s": self.wait_s, "substituted": self.substituted}


class Timer:
    def __init__(self, stats: LoaderStats):
        self.stats = stats

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.stats.wait_s += time.perf_counter() - self.t


# --------------------------------------------------------------------------- batches
class BatchBuffers:
    """CPU batch tensors handed out again once nothing outside holds them.

    A fresh batch (77 MB of float fast + slow clips at 8 x 224^2) is mmap-ed
    anew by malloc and every page faults on its first write: about a third of
    the time the main process spends making a CPU batch. A buffer is reused
    only when its storage has no holder but this pool — no batch, view,
    numpy array or autograd graph (which keeps a conv's input for backward)
    still refers to it; otherwise a new one is made. At most ``keep`` buffers
    of the current shape are kept (a consumer holds the last batch while the
    next is made: two suffice); a new shape drops the others. Without
    torch's storage use count (a private function) nothing is reused."""

    def __init__(self, keep: int = 2):
        import torch
        self.torch, self.keep = torch, keep
        self.bufs: dict[tuple, list] = {}
        self.use_count = getattr(torch._C, "_storage_Use_Count", None)

    def _free(self, buf) -> bool:
        # holders of the storage: ``buf`` itself and the temporary storage object of this call
        # (only pooled buffers are asked, and nothing is pooled without ``use_count``)
        return self.use_count(buf.untyped_storage()._cdata) == 2

    def empty(self, shape: tuple, memory_format):
        torch = self.torch
        key = (tuple(shape), memory_format)
        if key not in self.bufs:
            self.bufs = {key: []}
        bufs = self.bufs[key]
        buf = next((b for b in bufs if self._free(b)), None)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.float32, memory_format=memory_format)
            if len(bufs) < self.keep and self.use_count is not None:
                bufs.append(buf)
            else:
                return buf
        return buf[...]  # a view: the caller's reference counts as a holder


class Normalizer:
    """Finishes a batch of the contract on the device: uint8/float clips ->
    float (normalised or 0..255), slow = fast[:, :, ::alpha] unless given,
    optional channels_last_3d, every tensor on ``device``.

    ``fast``/``slow`` are batch tensors, or lists of per-clip tensors
    [C, T, H, W] (the PyAV backend's worker outputs): on a CPU device each
    clip is converted and normalised straight into the float batch, one clip
    at a time while it is in cache, with no uint8 batch in between, and the
    batches come from :class:`BatchBuffers`; on a GPU the list is stacked
    (into pinned memory with ``pin_memory``), sent as uint8 and converted
    there."""

    def __init__(self, alpha: int, normalize: bool, device, channels_last: bool = False, threads: int | None = None):
        import torch
        self.torch = torch
        self.alpha, self.normalize, self.channels_last = alpha, normalize, channels_last
        self.threads = threads  # intra-op threads while finishing a batch (None: the process's setting)
        self.device = torch.device(device)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1, 1)
        self.format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.buffers = {"fast": BatchBuffers(), "slow": BatchBuffers()}

    def _clips_on_cpu(self, x) -> bool:
        """Per-clip tensors for a CPU device: finished straight into a reused batch buffer."""
        return isinstance(x, (list, tuple)) and self.device.type == "cpu"

    def _prep(self, x, pin_memory: bool, name: str = "fast"):
        torch = self.torch
        if self._clips_on_cpu(x):
            out = self.buffers[name].empty((len(x), *x[0].shape), self.format)
            for o, clip in zip(out, x):
                o.copy_(clip)
                if self.normalize:
                    o.sub_(self.mean[0]).div_(self.std[0])
            return out
        if isinstance(x, (list, tuple)):
            x = torch.stack(x, out=torch.empty((len(x), *x[0].shape), dtype=x[0].dtype, pin_memory=pin_memory))
        x = x.to(self.device, non_blocking=True).float()
        if self.normalize:
            x = x.sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.format)

    def __call__(self, fast, slow, meta: dict, pin_memory: bool = False) -> dict:
        torch = self.torch
        if not self.threads:
            return self._finish(fast, slow, meta, pin_memory)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._finish(fast, slow, meta, pin_memory)
        finally:
            torch.set_num_threads(before)

    def _finish(self, fast, slow, meta: dict, pin_memory: bool) -> dict:
        from_clips = self._clips_on_cpu(fast)
        fast = self._prep(fast, pin_memory)
        if slow is not None:
            slow = self._prep(slow, pin_memory, "slow")
        else:
            slow = fast[:, :, :: self.alpha]
            if from_clips:  # into a reused buffer (the copy ``contiguous`` below would make is a fresh batch)
                slow = self.buffers["slow"].empty(slow.shape, self.format).copy_(slow)
        slow = slow.contiguous(memory_format=self.format)
        out = {"slow": slow, "fast": fast}
        out.update({k: v.to(self.device, non_blocking=True) for k, v in meta.items()})
        return out
