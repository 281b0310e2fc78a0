"""The synthetic backend: batches of the contract from memory, no decoding.

The upper bound for benchmarks (what the train step does when data costs
nothing) and a data source for tests. A few batches of random pixels are made
once, from the seed, on the device; iteration cycles through them with real
``index``/``label``/``frame_ids`` for this rank's share of ``num_videos``.
"""
from __future__ import annotations

import numpy as np
import torch

from loaders.batching import Normalizer
from loaders.ranks import rank_indices
from loaders.sampling import ClipSpec, sample_rng
from loaders.state import EpochState, LoaderStats


class SyntheticLoader(EpochState):
    """Random uint8 clips from memory with real indices and labels: the upper
    bound for benchmarks. The slow clip is fast[:, :, ::alpha] either way:
    ``independent_crops`` is taken (as every backend does) and changes nothing."""

    def __init__(self, num_videos: int, spec: ClipSpec, *, batch_size: int, crop_size: int, train: bool,
                 normalize: bool, device: str, rank: int, world_size: int, seed: int, channels_last: bool,
                 num_classes: int = 10, pool_batches: int = 2, num_frames: int = 300, drop_last: bool = False,
                 independent_crops: bool = False):
        self.num_videos, self.spec, self.batch_size, self.train = num_videos, spec, batch_size, train
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.num_frames, self.num_classes = num_frames, num_classes
        self.finish = Normalizer(spec.alpha, normalize, device, channels_last)
        g = torch.Generator().manual_seed(seed)
        shape = (batch_size, 3, spec.fast_frames, crop_size, crop_size)
        self.pool = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)
                     for _ in range(pool_batches)]
        self.labels = torch.randint(0, num_classes, (num_videos,), generator=g)
        self.stats = LoaderStats()

    def samples_per_epoch(self) -> int:
        return len(rank_indices(self.num_videos, self.rank, self.world_size, self.epoch)[0])

    def __iter__(self):
        positions, _ = rank_indices(self.num_videos, self.rank, self.world_size, self.epoch)
        order = np.array(positions)
        if self.train:
            order = order[np.random.default_rng([self.seed, self.epoch, self.rank]).permutation(len(order))]
        for b in range(self._take_resume(), len(self)):
            self._batches = b + 1
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            ids = np.stack([self.spec.frame_ids(
                self.spec.starts(self.num_frames, self.train, sample_rng(self.seed, self.epoch, int(i)))[0],
                self.num_frames) for i in idx])
            fast = self.pool[b % len(self.pool)][: len(idx)]
            meta = {"label": self.labels[idx], "index": torch.from_numpy(idx).long(),
                    "frame_ids": torch.from_numpy(ids)}
            self.stats.batches += 1
            self.stats.clips += len(idx)
            yield self.finish(fast, None, meta)
