"""What the machine gives a process, and files written whole or not at all."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cores() -> int:
    """The CPU cores this process may run on (its affinity, else the count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def atomic(path: str | os.PathLike):
    """Write to the yielded temporary path; it replaces ``path`` only when the
    block ends without an error (a killed or failed write leaves the old file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` written (and flushed to disk) under a temporary name, then renamed into place."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
