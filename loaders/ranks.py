"""Which samples each DDP rank reads in an epoch."""
from __future__ import annotations

import math

import numpy as np


def rank_range(total: int, rank: int, world_size: int, epoch: int = 0) -> tuple[int, int]:
    """[lo, hi): the contiguous part of the manifest order this rank reads in
    an epoch (empty where there are more ranks than samples); see rank_indices."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    part = (rank + epoch) % world_size
    return (total * part) // world_size, (total * (part + 1)) // world_size


def rank_array(total: int, rank: int, world_size: int, epoch: int = 0) -> np.ndarray:
    """:func:`rank_indices`' positions as an int64 array: no Python object per
    sample (a rank's share of a 10M-video dataset is over a million)."""
    lo, hi = rank_range(total, rank, world_size, epoch)
    idx = np.arange(lo, hi, dtype=np.int64) if hi > lo else np.array([lo % total], np.int64)
    return np.concatenate([idx, np.repeat(idx[:1], math.ceil(total / world_size) - len(idx))])


def rank_indices(total: int, rank: int, world_size: int, epoch: int = 0) -> tuple[list[int], int]:
    """Global sample positions this rank reads in an epoch, and how many padded repeats.

    The manifest order is cut into ``world_size`` contiguous ranges (sequential
    reads) that rotate across epochs; every rank reads ceil(total/world_size)
    samples, so a shorter range repeats its first sample once: equal steps
    for DDP, every video seen, at most one padded repeat per rank.
    """
    lo, hi = rank_range(total, rank, world_size, epoch)
    idx = rank_array(total, rank, world_size, epoch)
    return idx.tolist(), len(idx) - max(hi - lo, 1)  # (more ranks than videos: one is read, then repeated)
