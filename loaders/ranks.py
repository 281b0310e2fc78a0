"""Which samples each DDP rank reads in an epoch."""
from __future__ import annotations

import math


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
