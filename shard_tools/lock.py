"""One writer per output folder: an exclusive lock the operating system holds.

    with writer_lock(out, lock_name()):          # make_shards OUT
        ...
    with writer_lock(out, lock_name("p0000of0004")):   # make_shards --part 0 --parts 4
        ...
    with dataset_lock(out):                      # merge_parts, reindex: the whole dataset
        ...

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a file in OUT
(``.make_shards.lock``, ``.make_shards.pIIIIofNNNN.lock`` for a part). The
kernel drops it when its holder's file is closed, so a writer killed with
SIGKILL (or any other way) leaves no lock behind: the file stays, and stays
harmless. What the file holds (pid, host, command, start time) only names the
holder in the refusal message; it is never the lock. A second writer is
refused at once with :class:`~shard_tools.sources.UsageError` (exit code 2),
having created at most OUT and the lock file. Locks are per open file, so a
second writer in the same process is refused too. The lock file is never
removed: a writer that opened it just before a removal would lock a file no
one else sees.

On a shared filesystem the lock is as good as the filesystem's ``flock``: the
Linux NFS client (v4) maps it to a lock the server holds for every client.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator

from shard_tools.sources import UsageError

log = logging.getLogger(__name__)

LOCK_STEM = ".make_shards"
_PART_LOCK = re.compile(r"^\.make_shards\.p\d{4}of\d{4}\.lock$")
_COMMAND_CHARS = 300  # the holder's command line as the message shows it, at most


def lock_name(tag: str = "") -> str:
    """The lock file of a run: ``.make_shards.lock`` (a single run, and the
    dataset's own), ``.make_shards.{tag}.lock`` for a part (``Names.tag``)."""
    return f"{LOCK_STEM}.{tag}.lock" if tag else f"{LOCK_STEM}.lock"


def _holder_text() -> bytes:
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}).encode()


def _alive_here(info: dict) -> bool:
    """False for a pid of this host that no longer runs (what a killed holder left in the file)."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        pass
    return True


def _holder(fd: int) -> str:
    """Who holds the lock, from the file's content. The holder writes it just
    after taking the lock, so an empty file or the pid of a process that has
    ended (a killed holder's) is read again for a moment."""
    info: dict = {}
    for _ in range(10):
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info.get("pid") is not None and _alive_here(info):
            break
        time.sleep(0.05)
    if not isinstance(info, dict) or info.get("pid") is None:
        return "another process (it has not written its details yet)"
    command = str(info.get("command", "?"))
    if len(command) > _COMMAND_CHARS:
        command = command[:_COMMAND_CHARS] + " ..."
    return f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')} ({command})"


@contextlib.contextmanager
def writer_lock(out: str | os.PathLike, name: str = lock_name()) -> Iterator[str]:
    """Hold the exclusive lock ``OUT/name`` for the block; yields its path.
    Creates OUT if needed. Raises UsageError naming OUT and the holder when
    another writer (process or open file) holds it; then nothing else in OUT
    is touched. A filesystem without ``flock`` gives a warning and no lock."""
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # never O_TRUNC: the holder's details stay
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log.warning("cannot lock %s (%s): another writer into %s would not be noticed", path, e, out)
                yield path
                return
            raise UsageError(f"{out} is being written by {_holder(fd)}, which holds {name}: one writer per "
                             "folder at a time; wait for it to end or stop it (a killed writer leaves no lock)"
                             ) from None
        text = _holder_text()
        os.pwrite(fd, text, 0)  # written before it is cut to length: a reader sees no empty file in between
        os.ftruncate(fd, len(text))
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a finished writer names no holder
    finally:
        os.close(fd)  # drops the lock


@contextlib.contextmanager
def dataset_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold every writer's lock of OUT for the block: the dataset's own
    (``.make_shards.lock``, also a single make_shards run's) and each part's
    lock file present, so no make_shards run, part, merge or reindex writes
    into OUT meanwhile. For tools that rewrite a finished dataset
    (``merge_parts``, ``reindex``). OUT must exist."""
    out = os.fspath(out)
    if not os.path.isdir(out):
        raise UsageError(f"{out}: no such folder")
    with contextlib.ExitStack() as held:
        # the parts' lock files first: they exist already, so a refusal there leaves OUT exactly as it was
        for name in sorted(f for f in os.listdir(out) if _PART_LOCK.match(f)):
            held.enter_context(writer_lock(out, name))
        held.enter_context(writer_lock(out, lock_name()))
        yield
