"""Epoch bookkeeping (len, set_epoch, exact mid-epoch resume) and loader stats."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


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


@dataclass
class LoaderStats:
    clips: int = 0
    batches: int = 0
    skipped: int = 0
    skip_reasons: list = field(default_factory=list)
    wait_s: float = 0.0
    substituted: int = 0  # training clips yielded in place of lost ones (evaluation never substitutes)
    clamped: int = 0  # clips whose window reached past their member's start or end (held at the edge)
    bytes_read: int = 0  # of the shards, where the backend reads by byte range (event datasets, dali)

    def skip(self, key: str, reason: str, limit: int = 1000) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < limit:
            self.skip_reasons.append({"key": key, "reason": reason})

    def as_dict(self) -> dict:
        return {"clips": self.clips, "batches": self.batches, "skipped": self.skipped,
                "skip_reasons": list(self.skip_reasons), "wait_s": self.wait_s, "substituted": self.substituted,
                "clamped": self.clamped, "bytes_read": self.bytes_read}


class Timer:
    def __init__(self, stats: LoaderStats):
        self.stats = stats

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.stats.wait_s += time.perf_counter() - self.t
