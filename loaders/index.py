"""The compact index of a dataset: where every sample's members lie, in one file.

make_shards (and merge_parts) write ``index.npy`` beside ``manifest.json``,
which names it (``"index_file"``); ``python -m shard_tools.reindex OUT``
writes it for a dataset packed before. It is a NumPy ``.npy`` of one row per
sample in manifest order, little-endian (:data:`INDEX_DTYPE`):

- ``shard`` (int32): the tar's position in the manifest's ``shards``;
- ``lo``, ``hi`` (int64): the sample's bytes in its tar, headers and
  padding included — from where the previous sample's last member ends (0
  for a tar's first sample) to where its own last member ends, rounded up
  to the 512-byte tar block: what a tar reader streams for the sample;
- per member (:data:`MEMBERS`: ``video`` is the mp4/webm/mkv/avi/mov
  member) ``<m>_offset`` (the member's first data byte; -1: the sample has
  no such member) and ``<m>_size``.

A rank reads only its own rows (:func:`index_rows`: a few seek-and-reads of
the file, no ``.idx`` opened), whatever the dataset's size. Without a
compact index the rows come from the ``.idx`` files (see
:mod:`shard_tools.wds_index`) of the tars that hold the samples asked for
(one warning per dataset and process when its manifest names no index).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from loaders.fragments import FRAGMENT_MEMBERS
from loaders.shards import Shards
from loaders.system import atomic

INDEX_FILE = "index.npy"
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
MEMBERS = ("video", "json", *FRAGMENT_MEMBERS, "nframes", "ids", "cls")
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("lo", "<i8"), ("hi", "<i8")]
                       + [(f"{m}_{part}", "<i8") for m in MEMBERS for part in ("offset", "size")])
_CHUNK_ROWS = 1 << 16  # rows read at a time: a rank's rows are copied out, never all held at once
_warned: set[str] = set()


# --------------------------------------------------------------------------- writing
def idx_rows(idx_path: str, shard: int, count: int | None = None) -> np.ndarray:
    """The index rows of one tar from its DALI ``.idx`` (``shard``: the tar's
    manifest position; ``count``: the samples the manifest says it holds)."""
    with open(idx_path, encoding="utf-8") as f:
        head = f.readline().split()
        lines = f.readlines()
    if len(head) != 2 or not head[1].isdigit():
        raise ValueError(f"{idx_path}: line 1 is not a DALI index header ('v1.2 <samples>')")
    if int(head[1]) != len(lines) or (count is not None and count != len(lines)):
        raise ValueError(f"{idx_path}: {len(lines)} sample lines, its header says {head[1]}"
                         + (f" and the manifest {count}" if count is not None else "")
                         + ": the index does not belong to its tar (rewrite it with shard_tools.wds_index)")
    exts, numbers = _parse_uniform(lines) or _parse_lines(idx_path, lines)
    rows = np.empty(len(lines), INDEX_DTYPE)
    rows["shard"] = shard
    for m in MEMBERS:
        rows[f"{m}_offset"], rows[f"{m}_size"] = -1, 0
    for j, ext in enumerate(exts):  # (a sample with two video members: the one listed last)
        m = "video" if ext in VIDEO_EXTS else ext
        if m in MEMBERS:
            has = numbers[:, j, 0] >= 0
            rows[f"{m}_offset"] = np.where(has, numbers[:, j, 0], rows[f"{m}_offset"])
            rows[f"{m}_size"] = np.where(has, numbers[:, j, 1], rows[f"{m}_size"])
    ends = (numbers[:, :, 0] + numbers[:, :, 1]).max(axis=1) if numbers.shape[1] else np.zeros(len(lines), np.int64)
    rows["hi"] = -(-np.maximum.accumulate(ends) // 512) * 512 if len(lines) else ends
    rows["lo"] = np.concatenate([[0], rows["hi"][:-1]]) if len(lines) else ends
    return rows


def _parse_uniform(lines: list[str]) -> tuple[list[str], np.ndarray] | None:
    """The members (ext per column) and [samples, members, (offset, size)]
    of .idx lines that all list the same members in the same order (what
    make_shards writes), parsed in bulk; None for any other file."""
    if not lines or len({line.count(" ") for line in lines}) != 1:
        return None
    width = lines[0].count(" ") + 1
    tokens = "".join(lines).split()
    if width % 4 or len(tokens) != len(lines) * width:
        return None
    exts = tokens[0::4]
    if exts != exts[:width // 4] * len(lines):
        return None
    try:
        offsets, sizes = list(map(int, tokens[1::4])), list(map(int, tokens[2::4]))
    except ValueError:  # (parsed line by line, for the message naming the line)
        return None
    numbers = np.stack([np.array(offsets, np.int64), np.array(sizes, np.int64)], axis=-1)
    return exts[:width // 4], numbers.reshape(len(lines), width // 4, 2)


def _parse_lines(idx_path: str, lines: list[str]) -> tuple[list[str], np.ndarray]:
    """.idx lines parsed one by one: the members any sample has (ext per
    column) and [samples, members, (offset, size)] (offset -1: not in that
    sample); a line that is not ``<ext> <offset> <size> <name>`` entries is
    named in the error."""
    exts: list[str] = []
    parsed = []
    for k, line in enumerate(lines):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ValueError(f"{idx_path}: line {k + 2}: not '<ext> <offset> <size> <name>' entries")
        try:
            entry = {parts[j]: (int(parts[j + 1]), int(parts[j + 2])) for j in range(0, len(parts), 4)}
        except ValueError:
            raise ValueError(f"{idx_path}: line {k + 2}: an offset or size is not a number") from None
        exts += [e for e in entry if e not in exts]
        parsed.append(entry)
    numbers = np.zeros((len(lines), len(exts), 2), np.int64)
    numbers[:, :, 0] = -1
    for k, entry in enumerate(parsed):
        for j, ext in enumerate(exts):
            if ext in entry:
                numbers[k, j] = entry[ext]
    return exts, numbers


def write_compact_index(path: str, shards: Shards) -> dict:
    """Write ``shards``' compact index to ``path`` (atomically: a temporary
    file renamed into place) from their ``.idx`` files, one tar at a time;
    returns ``{"rows": n, "fragment_tables": "all" | "none" | "mixed"}``
    (whether the samples carry KEY.frag_bytes and KEY.frag_frames)."""
    header = {"descr": np.lib.format.dtype_to_descr(INDEX_DTYPE), "fortran_order": False, "shape": (shards.total,)}
    rows, tables = 0, set()
    with atomic(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for t, (tar, count) in enumerate(zip(shards.tars, shards.counts)):
            part = idx_rows(shards.idx(tar), t, count)
            tables.update(bool(x) for x in np.unique(np.all([part[f"{m}_offset"] >= 0 for m in FRAGMENT_MEMBERS],
                                                            axis=0)))
            f.write(part.tobytes())
            rows += len(part)
        f.flush()
        os.fsync(f.fileno())
    return {"rows": rows, "fragment_tables": "mixed" if len(tables) == 2 else "all" if True in tables else "none"}


# --------------------------------------------------------------------------- reading
def distinct(values) -> np.ndarray:
    """The distinct values, sorted, as int64 (a sort, where np.unique hashes:
    several times slower on a rank's million positions)."""
    a = np.asarray(values, dtype=np.int64)
    if len(a) > 1 and not (a[1:] > a[:-1]).all():
        a = np.sort(a)
        a = a[np.concatenate([[True], a[1:] != a[:-1]])]
    return a


def _open(path: str, total: int, tars: int) -> tuple[int, int]:
    """The compact index file checked against its manifest: (data offset, rows)."""
    remedy = f"write it again with python -m shard_tools.reindex {os.path.dirname(path) or '.'}"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            start = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the compact index ({e}): {remedy}") from None
    if dtype != INDEX_DTYPE or fortran or len(shape) != 1:
        raise ValueError(f"{path}: not a compact index of this version (rows {dtype}): {remedy}")
    if shape[0] != total or size != start + total * INDEX_DTYPE.itemsize:
        raise ValueError(f"{path}: {shape[0]} rows ({size - start} bytes) for a manifest of {total} samples "
                         f"in {tars} shards: {remedy}")
    return start, shape[0]


def _read_compact(shards: Shards, positions: np.ndarray, fields: tuple[str, ...]) -> np.ndarray:
    """The rows ``positions`` (sorted, unique) of the compact index, ``fields`` only."""
    start, _ = _open(shards.index, shards.total, len(shards.tars))
    out = np.empty(len(positions), np.dtype([(n, INDEX_DTYPE.fields[n][0]) for n in fields]))
    if not len(positions):
        return out
    done = 0
    buffer = bytearray(_CHUNK_ROWS * INDEX_DTYPE.itemsize)
    with open(shards.index, "rb", buffering=0) as f:
        while done < len(positions):
            lo = int(positions[done])
            hi = min(lo + _CHUNK_ROWS, int(positions[-1]) + 1)
            f.seek(start + lo * INDEX_DTYPE.itemsize)
            view = memoryview(buffer)[:(hi - lo) * INDEX_DTYPE.itemsize]
            if f.readinto(view) != len(view):
                raise ValueError(f"{shards.index}: ends before row {hi}: a truncated file")
            block = np.frombuffer(view, INDEX_DTYPE)
            stop = int(np.searchsorted(positions, hi, side="left"))
            picked = block if stop - done == hi - lo else block[positions[done:stop] - lo]  # (a run: all of it)
            for n in fields:
                out[n][done:stop] = picked[n]
            done = stop
            del block, view
    if (out["shard"] < 0).any() or (out["shard"] >= len(shards.tars)).any():
        raise ValueError(f"{shards.index}: a row names a shard the manifest does not list: write it again with "
                         f"python -m shard_tools.reindex {os.path.dirname(shards.index)}")
    return out


def _check_fresh(shards: Shards, tars: np.ndarray) -> None:
    """Warn (once per index) where a tar's .idx is newer than the compact
    index: a tar rewritten after the index was written has members elsewhere
    (a copy that did not keep modification times looks the same: then the
    warning is the only harm). Stats the tars' .idx files, opens none."""
    if shards.index in _warned:
        return
    written = os.stat(shards.index).st_mtime
    for t in tars.tolist():
        try:
            newer = os.stat(shards.idx(shards.tars[t])).st_mtime > written
        except OSError:
            continue
        if newer:
            _warned.add(shards.index)
            warnings.warn(f"{shards.idx(shards.tars[t])} is newer than the compact index {shards.index}: if its tar "
                          "was rewritten, its members are no longer where the index says. Write the index again "
                          f"with python -m shard_tools.reindex {os.path.dirname(shards.index) or '.'}",
                          RuntimeWarning)
            return


def _read_idx(shards: Shards, positions: np.ndarray, fields: tuple[str, ...]) -> np.ndarray:
    """The rows ``positions`` (sorted, unique) from the .idx of the tars holding them."""
    starts = np.concatenate([[0], np.cumsum(shards.counts)])
    out = np.empty(len(positions), np.dtype([(n, INDEX_DTYPE.fields[n][0]) for n in fields]))
    for t in np.unique(np.searchsorted(starts, positions, side="right") - 1):
        lo, hi = np.searchsorted(positions, [starts[t], starts[t + 1]])
        rows = idx_rows(shards.idx(shards.tars[t]), int(t))
        if len(rows) != shards.counts[t]:
            raise ValueError(f"{shards.idx(shards.tars[t])}: {len(rows)} samples, the manifest says "
                             f"{shards.counts[t]}")
        picked = rows[positions[lo:hi] - starts[t]]
        for n in fields:
            out[n][lo:hi] = picked[n]
    return out


def index_rows(shards: Shards, positions, fields: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted unique ``positions``, their index rows with ``fields``
    (default: all)): from the compact index where the manifest names one,
    else from the .idx of the tars that hold them."""
    positions = distinct(positions)
    if len(positions) and (positions[0] < 0 or positions[-1] >= shards.total):
        raise IndexError(f"sample positions {int(positions[0])}..{int(positions[-1])} are outside the dataset's "
                         f"{shards.total}")
    fields = tuple(INDEX_DTYPE.names) if fields is None else ("shard", *(f for f in fields if f != "shard"))
    if shards.index is not None:
        rows = _read_compact(shards, positions, fields)
        _check_fresh(shards, distinct(rows["shard"]))
        return positions, rows
    if shards.manifest_path is not None and shards.manifest_path not in _warned:
        _warned.add(shards.manifest_path)
        folder = os.path.dirname(shards.manifest_path) or "."
        warnings.warn(f"{shards.manifest_path} names no compact index (index_file): every loader reads the .idx "
                      f"files of its tars at start-up. Write one with python -m shard_tools.reindex {folder}",
                      RuntimeWarning)
    return positions, _read_idx(shards, positions, fields)


__all__ = ["INDEX_FILE", "INDEX_DTYPE", "MEMBERS", "VIDEO_EXTS", "idx_rows", "write_compact_index", "index_rows",
           "distinct"]
