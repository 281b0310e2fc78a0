"""Fragmented MP4 written and read back: the fragment table of a member.

make_shards muxes every member with FFmpeg's mp4 muxer and ``MOVFLAGS``: a
fragment (``moof`` + ``mdat``) starts at every keyframe, the ``moov`` holds no
samples, and each fragment's data offsets are relative to its own ``moof``, so
an init segment followed by any run of fragments is a valid file (see
:mod:`loaders.fragments` for the table and the cut).
"""
from __future__ import annotations

import struct

import numpy as np

from loaders.fragments import Fragments

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


def _boxes(data: bytes, start: int, end: int):
    """(type, offset, size, header size) of the boxes in data[start:end]."""
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, i)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, i + 8)[0], 16
        elif size == 0:
            size = end - i
        if size < header or i + size > end:
            raise ValueError(f"box {kind!r} at byte {i} runs past the end ({size} bytes)")
        yield kind.decode("latin-1"), i, size, header
        i += size


def _trun_samples(data: bytes, moof: int, size: int) -> int:
    """Samples of the video track in one ``moof`` (the sum of its ``trun`` counts)."""
    count = 0
    for kind, off, sz, hdr in _boxes(data, moof + 8, moof + size):
        if kind != "traf":
            continue
        for k, o, _, h in _boxes(data, off + hdr, off + sz):
            if k == "trun":
                count += struct.unpack_from(">I", data, o + h + 4)[0]  # after version + flags
    return count


def parse(data: bytes) -> Fragments:
    """The fragment table of a fragmented MP4 with one video track. The first
    frame of each fragment is the count of samples before it (display order
    equals that for closed GOPs; ``transcode`` decodes each fragment alone
    to check it where GOPs may be open). Raises ValueError if ``data`` is not such a file."""
    top = list(_boxes(data, 0, len(data)))
    kinds = [k for k, *_ in top]
    if "moov" not in kinds or "moof" not in kinds:
        raise ValueError("not a fragmented MP4 (no moov or no moof box)")
    moofs = [(o, s) for k, o, s, _ in top if k == "moof"]
    if kinds.index("moov") > kinds.index("moof"):
        raise ValueError("the moov box comes after the first fragment")
    end = next((o for k, o, _, _ in top if k == "mfra"), len(data))
    counts = [_trun_samples(data, o, s) for o, s in moofs]
    if 0 in counts:
        raise ValueError(f"fragment {counts.index(0)} holds no samples")
    starts = np.concatenate([[0], np.cumsum(counts)])
    return Fragments(np.array([o for o, _ in moofs] + [end], np.int64), starts.astype(np.int32))
