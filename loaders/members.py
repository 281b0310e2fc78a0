"""Reading a sample's members by byte range: the bytes a clip needs, not the member.

A :class:`MemberIndex` holds where the members of the samples one loader
reads lie (their rows of the dataset's compact index, :mod:`loaders.index`;
without one, the DALI ``.idx`` files of their tars), and a
:class:`MemberReader` reads with ``os.pread``: a sample's json and fragment
table, then for a clip only the init segment and the fragments its window
needs (a 256p 15-minute member is about 100 MB; a clip's window is a few
hundred kB of it). ``bytes_read`` counts what was read.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np

from loaders.fragments import FRAGMENT_MEMBERS, Fragments
from loaders.index import index_rows
from loaders.sampling import ClipInfo
from loaders.shards import Shards

MEMBERS = ("video", "json", *FRAGMENT_MEMBERS)


class MemberIndex:
    """Per sample asked for (manifest positions): its tar and each member's (offset, size)."""

    def __init__(self, shards: Shards, positions=None):
        self.tars = shards.tars
        fields = tuple(f"{m}_{part}" for m in MEMBERS for part in ("offset", "size"))
        self.positions, rows = index_rows(shards, range(shards.total) if positions is None else positions, fields)
        self.tar_id = rows["shard"]
        self.offset = {m: rows[f"{m}_offset"] for m in MEMBERS}
        self.size = {m: rows[f"{m}_size"] for m in MEMBERS}

    def row(self, position: int) -> int:
        i = int(np.searchsorted(self.positions, position))
        if i == len(self.positions) or self.positions[i] != position:
            raise KeyError(f"sample {position} is not in this index")
        return i

    def has(self, member: str) -> bool:
        """True if every sample indexed carries ``member``."""
        return bool((self.offset[member] >= 0).all())


class MemberReader:
    """``os.pread`` of members and of a clip's byte ranges. Files open lazily
    (only the tars of the samples indexed: a loader's own range) and the
    ``max_files`` used last stay open: a rank's range of a large dataset
    holds more tars than a process may keep open (``ulimit -n``), and a
    shuffled epoch visits them in any order. Picklable: a copy in another
    process opens its own files."""

    def __init__(self, index: MemberIndex, cache: int = 256, max_files: int = 64):
        self.index, self.cache_size, self.max_files = index, cache, max(1, max_files)
        self._files: OrderedDict[int, int] = OrderedDict()
        self._info: OrderedDict = OrderedDict()
        self.bytes_read = 0

    def __getstate__(self):
        return {**self.__dict__, "_files": OrderedDict(), "_info": OrderedDict()}

    def __del__(self):
        try:
            self.close()
        except Exception:  # (at interpreter exit the modules it calls may be gone; the system closes the files)
            pass

    def close(self) -> None:
        """Close the open files (a later read opens them again)."""
        files, self._files = getattr(self, "_files", {}), OrderedDict()
        for fd in files.values():
            os.close(fd)

    def _pread(self, row: int, offset: int, size: int) -> bytes:
        t = int(self.index.tar_id[row])
        fd = self._files.get(t)
        if fd is None:
            if len(self._files) >= self.max_files:
                os.close(self._files.popitem(last=False)[1])
            fd = self._files[t] = os.open(self.index.tars[t], os.O_RDONLY | os.O_CLOEXEC)
        else:
            self._files.move_to_end(t)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{self.index.tars[t]}: {size} bytes at {offset} run past the end of the file "
                             "(a truncated shard?)")
        self.bytes_read += size
        return data

    def read(self, position: int, member: str) -> bytes:
        row = self.index.row(position)
        offset = int(self.index.offset[member][row])
        if offset < 0:
            raise ValueError(f"sample {position} of {self.index.tars[self.index.tar_id[row]]} has no {member} member")
        return self._pread(row, offset, int(self.index.size[member][row]))

    def describe(self, position: int, event: int | None = None) -> str:
        """A sample for messages: ``[event E of ]KEY (TAR)``."""
        tar = self.index.tars[int(self.index.tar_id[self.index.row(position)])]
        try:
            key = self.sample(position)[0].get("key", f"sample {position}")
        except (ValueError, OSError):
            key = f"sample {position}"
        return f"{'' if event is None else f'event {event} of '}{key} ({tar})"

    def sample(self, position: int) -> tuple[dict, Fragments | None]:
        """The sample's KEY.json and fragment table (None without one), cached."""
        got = self._info.get(position)
        if got is None:
            info = json.loads(self.read(position, "json"))
            frags = None
            if all(self.index.offset[m][self.index.row(position)] >= 0 for m in FRAGMENT_MEMBERS):
                frags = Fragments.from_members(*(self.read(position, m) for m in FRAGMENT_MEMBERS))
            got = self._info[position] = (info, frags)
            if len(self._info) > self.cache_size:
                self._info.popitem(last=False)
        else:
            self._info.move_to_end(position)
        return got

    def clip_info(self, position: int, time: float | None = None) -> ClipInfo:
        return ClipInfo.from_json(self.sample(position)[0], time)

    def clip_bytes(self, position: int, first: int, last: int, window_cut: bool = True) -> tuple[bytes, int, bool]:
        """The bytes that decode frames first..last: the init segment and the
        fragments that hold them (``cut`` True; their frame 0 is member frame
        ``base``), or the whole member (no fragment table, a member that cannot
        be cut, or ``window_cut`` False: ``base`` 0, ``cut`` False)."""
        _, frags = self.sample(position)
        row = self.index.row(position)
        offset, size = int(self.index.offset["video"][row]), int(self.index.size["video"][row])
        if not (window_cut and frags is not None and frags.cuttable):
            return self._pread(row, offset, size), 0, False
        if int(frags.bytes[-1]) > size:
            raise ValueError(f"its fragment table runs to byte {int(frags.bytes[-1])} of a {size}-byte member")
        g0, g1 = frags.span(first, last)
        init = self._pread(row, offset, frags.init_size)
        body = self._pread(row, offset + int(frags.bytes[g0]), int(frags.bytes[g1] - frags.bytes[g0]))
        return init + body, int(frags.frames[g0]), True
