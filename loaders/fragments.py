"""Window cuts: the fragment table of a packed member, and the bytes a window needs.

make_shards writes every video member as a fragmented MP4 with one fragment
per GOP (FFmpeg's mp4 muxer with ``movflags=frag_keyframe+empty_moov+default_base_moof``)::

    ftyp moov | moof mdat | moof mdat | ... | mfra
    init      | fragment 0| fragment 1| ... | (random-access index)

The init segment (everything before the first ``moof``) followed by any run
of consecutive fragments is itself a valid MP4. When every fragment starts
with a keyframe that decodes alone (closed GOPs: make_shards' transcodes do),
the frames of fragments g0..g1-1 decode from
``data[:bytes[0]] + data[bytes[g0]:bytes[g1]]`` as frames
``frames[g0]..frames[g1]-1`` of the whole member, numbered from 0 in the cut.

The table make_shards stores beside each member (little-endian, G fragments):

* ``KEY.frag_bytes``  int64 [G + 1]: where each fragment's ``moof`` starts,
  then where the last one ends (the ``mfra`` or the end of the file);
* ``KEY.frag_frames`` int32 [G + 1]: the first frame (display order) of each
  fragment, then the member's frame count.

A member that cannot be cut (see :func:`whole_member`) gets the one-fragment
table ``[0, size]`` / ``[0, num_frames]``: an empty init segment and the
whole file, so one graph serves both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAGMENT_MEMBERS = ("frag_bytes", "frag_frames")
# the member layout make_shards writes (fragmented MP4 + fragment tables), as its manifests name it
MEMBER_FORMAT = "fmp4-fragments-v1"


@dataclass(frozen=True)
class Fragments:
    """``bytes``: G + 1 byte offsets; ``frames``: G + 1 frame numbers (see the module docstring)."""
    bytes: np.ndarray
    frames: np.ndarray

    @property
    def count(self) -> int:
        return len(self.bytes) - 1

    @property
    def init_size(self) -> int:
        return int(self.bytes[0])

    @property
    def cuttable(self) -> bool:
        """False for the whole-member table (no init segment: the member is not cut)."""
        return self.init_size > 0

    def members(self) -> dict[str, bytes]:
        """The two shard members, little-endian."""
        return dict(zip(FRAGMENT_MEMBERS, (self.bytes.astype("<i8").tobytes(), self.frames.astype("<i4").tobytes())))

    @classmethod
    def from_members(cls, frag_bytes: bytes, frag_frames: bytes) -> "Fragments":
        return cls(np.frombuffer(frag_bytes, "<i8"), np.frombuffer(frag_frames, "<i4"))

    def span(self, first: int, last: int) -> tuple[int, int]:
        """The fragments [g0, g1) holding frames first..last."""
        g0 = int(np.searchsorted(self.frames, first, side="right")) - 1
        g1 = int(np.searchsorted(self.frames, last, side="right"))
        return max(g0, 0), min(max(g1, g0 + 1), self.count)

    def cut(self, data: bytes, first: int, last: int) -> tuple[bytes, int]:
        """The bytes that decode frames first..last (init segment + their
        fragments) and the number of the cut's frame 0 in the whole member."""
        g0, g1 = self.span(first, last)
        init = data[:self.init_size]
        return init + data[int(self.bytes[g0]):int(self.bytes[g1])], int(self.frames[g0])


def whole_member(size: int, num_frames: int) -> Fragments:
    """The table of a member decoded whole: no init segment, one fragment."""
    return Fragments(np.array([0, size], np.int64), np.array([0, num_frames], np.int32))
