"""What every backend shares: the samples of an epoch, the sampling policy,
the finishing of a batch and the fields of event datasets.

A backend adds only its engine (how bytes become pixels): it asks
``self.sampler`` for a sample's views (:mod:`loaders.sampling`), decodes and
crops them, and hands the uint8 clips with their metadata to
:meth:`ClipLoader.batch`, which finishes them (float, normalised, slow =
fast[::alpha], channels_last_3d, on the device) and adds an event dataset's
fields (:mod:`loaders.events`).

A sample is a video of the manifest (video datasets) or an event of
``events.jsonl`` (event datasets); :meth:`ClipLoader.rank_samples` are this
rank's samples of the epoch (contiguous ranges that rotate across epochs,
see :func:`loaders.ranks.rank_indices`) and :meth:`ClipLoader.sample_video`
names a sample's video and time.
"""
from __future__ import annotations

import gc

import numpy as np
import torch

from loaders.batching import Normalizer
from loaders.events import EventTable
from loaders.index import distinct
from loaders.members import MemberIndex, MemberReader
from loaders.ranks import rank_array, rank_indices
from loaders.sampling import SAMPLERS, ClipSampler, ClipSpec, Crop
from loaders.shards import Shards
from loaders.state import EpochState, LoaderStats


def make_sampler(shards: Shards | None, spec: ClipSpec, crop_size: int, train: bool, num_clips: int = 1,
                 num_crops: int = 1, independent_crops: bool = False, **task_options) -> ClipSampler:
    """The sampler of a dataset's kind (its manifest's ``task``; whole videos
    otherwise) with the task's options (``eval_short_side`` for ava, ``tau_a``
    and ``tau_o`` for epic)."""
    task = (shards.manifest.get("task") if shards is not None else None) or "video"
    cls = SAMPLERS[task]
    known = {"ava": {"eval_short_side"}, "epic": {"tau_a", "tau_o"}}.get(task, set())
    given = {k: v for k, v in task_options.items() if v is not None}
    if set(given) - known:
        raise TypeError(f"options {sorted(set(given) - known)} are for another kind of dataset than "
                        f"{task!r} (it takes {sorted(known) or 'none'})")
    return cls(spec, crop_size, train, num_clips, num_crops, independent_crops, **given)


class ClipLoader(EpochState):
    """The shared part of the backends (see the module docstring)."""

    def _setup(self, shards: Shards | None, spec: ClipSpec, sampler: ClipSampler, *, batch_size: int,
               crop_size: int, train: bool, normalize: bool, device: str, rank: int, world_size: int, seed: int,
               channels_last: bool, drop_last: bool = False, threads: int | None = None,
               num_videos: int | None = None) -> None:
        self.shards, self.spec, self.sampler = shards, spec, sampler
        self.batch_size, self.crop_size, self.train = batch_size, crop_size, train
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.device = torch.device(device)
        self.finish = Normalizer(spec.alpha, normalize, self.device, channels_last, threads)
        self.events = EventTable(shards) if shards is not None and shards.manifest.get("task") else None
        self.num_videos = shards.total if num_videos is None else num_videos
        self.total = len(self.events) if self.events is not None else self.num_videos
        self.stats = LoaderStats()
        self._members: tuple[np.ndarray, MemberReader] | None = None

    @property
    def num_clips(self) -> int:
        return self.sampler.num_clips

    @property
    def num_crops(self) -> int:
        return self.sampler.num_crops

    @property
    def independent_crops(self) -> bool:
        return self.sampler.independent_crops

    def _views(self) -> int:
        return self.sampler.num_views

    def rank_samples(self, epoch: int | None = None) -> list[int]:
        """This rank's samples of the epoch (with the padding repeat of a short range)."""
        return rank_indices(self.total, self.rank, self.world_size, self.epoch if epoch is None else epoch)[0]

    def rank_sample_array(self, epoch: int | None = None) -> np.ndarray:
        """:meth:`rank_samples` as an int64 array (no Python object per sample)."""
        return rank_array(self.total, self.rank, self.world_size, self.epoch if epoch is None else epoch)

    def samples_per_epoch(self) -> int:
        return -(-self.total // self.world_size) * self._views()  # (every rank reads as many: rank_indices)

    def sample_video(self, sample: int) -> tuple[int, float | None]:
        """(the video's manifest position, the event's time or None) of a sample."""
        if self.events is None:
            return sample, None
        return int(self.events.video[sample]), float(self.events.time[sample])

    def member_reader(self, videos) -> MemberReader:
        """A byte-range reader over ``videos`` (manifest positions; their index rows only), kept while an
        epoch asks for the same videos. The last one's rows go before the next one's are read: it is closed
        and collected first (a DALI pipeline holds its source, and so its reader, in a reference cycle)."""
        wanted = distinct(videos)
        if self._members is None or not np.array_equal(self._members[0], wanted):
            if self._members is not None:
                self._members[1].close()
                self._members = None
                gc.collect()
            self._members = (wanted, MemberReader(MemberIndex(self.shards, wanted)))
        return self._members[1]

    def shuffled(self, samples):
        """``samples`` (a list, or an array) in this epoch's training order (a
        seeded permutation; as given in evaluation), as the same type."""
        array = isinstance(samples, np.ndarray)
        if not self.train:
            return samples.copy() if array else list(samples)
        order = np.random.default_rng([self.seed, self.epoch, self.rank]).permutation(len(samples))
        return np.asarray(samples)[order] if array else np.asarray(samples, dtype=np.int64)[order].tolist()

    def batch(self, fast, slow, meta: dict, events: list[int] | None = None, crops: list[Crop] | None = None,
              pin_memory: bool = False) -> dict:
        """A finished batch of the contract from uint8 (or float) clips: ``fast``
        and ``slow`` (None: fast[::alpha]) as batch tensors or lists of
        [3, T, H, W] clips (clips of different sizes are padded to the largest,
        bottom and right), ``meta`` tensors, and for an event dataset the
        events and crops of the clips."""
        self.stats.batches += 1
        self.stats.clips += len(fast)
        if isinstance(fast, (list, tuple)) and len({tuple(c.shape) for c in fast}) > 1:
            fast = _padded(fast)
            slow = _padded(slow) if slow is not None else None
        out = self.finish(fast, slow, meta, pin_memory)
        if self.events is not None:
            out.update(self.event_fields(events, crops))
        return out

    def event_fields(self, events: list[int], crops: list[Crop]) -> dict:
        """An event dataset's fields of a batch (:mod:`loaders.events`), on the device."""
        return {k: v.to(self.device, non_blocking=True)
                for k, v in self.events.fields(events, crops, self.crop_size).items()}


def _padded(clips: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clips [C, T, h, w] zero-padded to the largest h and w among them."""
    h = max(c.shape[-2] for c in clips)
    w = max(c.shape[-1] for c in clips)
    return [torch.nn.functional.pad(c, (0, w - c.shape[-1], 0, h - c.shape[-2])) for c in clips]


def crop_from_params(params) -> Crop:
    """A :class:`Crop` back from :meth:`Crop.params` (what a graph engine echoes)."""
    p = [float(v) for v in params]
    return Crop(int(p[2]), int(p[3]), int(p[4]), int(p[5]), bool(p[8]), int(p[6]), int(p[7]))


__all__ = ["ClipLoader", "LoaderStats", "make_sampler", "crop_from_params"]
