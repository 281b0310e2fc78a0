"""The synthetic backend: batches of the contract from memory, no decoding.

The upper bound for benchmarks (what the train step does when data costs
nothing) and a data source for tests. A few batches of random pixels are made
once, from the seed, on the device; iteration cycles through them with real
``index``/``label``/``frame_ids`` (the sampler's, for ``num_frames``-frame
videos) for this rank's share of ``num_videos``.
"""
from __future__ import annotations

import numpy as np
import torch

from loaders.base import ClipLoader
from loaders.sampling import ClipInfo, ClipSampler, ClipSpec, sample_rng


class SyntheticLoader(ClipLoader):
    """Random uint8 clips from memory with real indices and labels: the upper
    bound for benchmarks. The slow clip is fast[:, :, ::alpha] either way:
    ``independent_crops`` is taken (as every backend does) and changes nothing."""

    def __init__(self, num_videos: int, spec: ClipSpec, sampler: ClipSampler, *, batch_size: int, crop_size: int,
                 train: bool, normalize: bool, device: str, rank: int, world_size: int, seed: int,
                 channels_last: bool, num_classes: int = 10, pool_batches: int = 2, num_frames: int = 300,
                 drop_last: bool = False):
        self._setup(None, spec, sampler, batch_size=batch_size, crop_size=crop_size, train=train,
                    normalize=normalize, device=device, rank=rank, world_size=world_size, seed=seed,
                    channels_last=channels_last, drop_last=drop_last, num_videos=num_videos)
        self.num_frames, self.num_classes = num_frames, num_classes
        g = torch.Generator().manual_seed(seed)
        shape = (batch_size, 3, spec.fast_frames, crop_size, crop_size)
        self.pool = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)
                     for _ in range(pool_batches)]
        self.labels = torch.randint(0, num_classes, (num_videos,), generator=g)
        self.info = ClipInfo(num_frames, crop_size, crop_size)

    def samples_per_epoch(self) -> int:
        return len(self.rank_samples())

    def __iter__(self):
        order = np.array(self.shuffled(self.rank_samples()))
        for b in range(self._take_resume(), len(self)):
            self._batches = b + 1
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            ids = np.stack([self.sampler.windows(self.info, sample_rng(self.seed, self.epoch, int(i)))[0][0]
                            for i in idx])
            fast = self.pool[b % len(self.pool)][: len(idx)]
            meta = {"label": self.labels[idx], "index": torch.from_numpy(idx).long(),
                    "frame_ids": torch.from_numpy(ids)}
            yield self.batch(fast, None, meta)
