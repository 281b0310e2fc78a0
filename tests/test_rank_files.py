"""Every rank opens and indexes only its own range of a dataset: the compact
index (loaders/index.py), its writers (make_shards, shard_tools.reindex) and
the pyav and dali backends over a few hundred one-sample shards."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from webdataset import tariterators

from benchmarks.scale import opened_files
from loaders import build_loader
from loaders.index import INDEX_DTYPE, MEMBERS, index_rows
from loaders.members import MemberIndex, MemberReader
from loaders.shards import resolve_shards
from shard_tools.lock import dataset_lock
from shard_tools.make_shards import main as make_shards
from shard_tools.reindex import main as reindex_main
from shard_tools.wds_index import write_index
from tests import media

pytest.importorskip("nvidia.dali")

TEMPLATES, SHARDS, WORLD = 8, 240, 8
PER_RANK = SHARDS // WORLD
# a short clip of small frames: the tests are about which files are read, not about pixels
SMALL = dict(batch_size=4, device="cpu", crop_size=16, tau=2, alpha=2, slow_frames=2, normalize=False)


@pytest.fixture(scope="session")
def template_shards(tmp_path_factory) -> Path:
    """Eight tiny frame-coded VP9 videos (16..23 frames of 32x32) packed by
    make_shards, one sample per shard: a compact index written at pack time."""
    src = tmp_path_factory.mktemp("one_sample_src")
    (src / "c").mkdir()
    for i in range(TEMPLATES):
        media.write_coded_video(src / "c" / f"t{i}.mkv", 16 + i, height=32, width=32)
    out = tmp_path_factory.mktemp("one_sample_template")
    rc = make_shards([str(src), str(out), "--quiet", "--workers", "2", "--short-side", "32", "--codec", "vp9",
                      "--crf", "10", "--samples-per-shard", "1"])
    assert rc == 0
    return out


def _members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as t:
        return [(m.name, t.extractfile(m).read()) for m in t]


@pytest.fixture(scope="session")
def one_sample_shards(template_shards, tmp_path_factory) -> Path:
    """SHARDS one-sample shards: sample k is template k % 8 renamed c{k:04d},
    with index k in KEY.json and KEY.ids. The tars are written directly
    (tarfile + write_index, members in make_shards' order) from the templates,
    since make_shards takes about 10 s to pack 240 videos here; the manifest
    is the templates' with these shards, and the compact index is written by
    shard_tools.reindex (the function make_shards and merge_parts call)."""
    manifest = json.loads((template_shards / "manifest.json").read_text())
    templates = [_members(template_shards / s["path"]) for s in manifest["shards"]]
    out = tmp_path_factory.mktemp("one_sample_shards")
    shards = []
    for k in range(SHARDS):
        name = f"train-{k:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.GNU_FORMAT) as t:
            for member, data in templates[k % TEMPLATES]:
                ext = member.split(".", 1)[1]
                if ext == "json":
                    data = json.dumps({**json.loads(data), "index": k, "key": f"c{k:04d}"}).encode()
                elif ext == "ids":
                    data = struct.pack("<qq", k, struct.unpack("<qq", data)[1])
                info = tarfile.TarInfo(f"c{k:04d}.{ext}")
                info.size, info.mtime = len(data), 0
                t.addfile(info, io.BytesIO(data))
        write_index(str(out / name), str(out / name.replace(".tar", ".idx")))
        shards.append({"path": name, "num_samples": 1, "first_index": k})
    manifest.update(shards=shards, total_samples=SHARDS, pattern=f"train-{{000000..{SHARDS - 1:06d}}}.tar")
    manifest.pop("index_file")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert reindex_main([str(out)]) == 0
    return out


def shard_files(root: Path, part: int) -> set[str]:
    """The .tar and .idx paths of rank range ``part`` (one sample per shard)."""
    return {str(root / f"train-{k:06d}{ext}") for k in range(part * PER_RANK, (part + 1) * PER_RANK)
            for ext in (".tar", ".idx")}


def data_files(paths: list[str]) -> set[str]:
    return {p for p in paths if p.endswith((".tar", ".idx"))}


def run_epoch(loader) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [i for b in loader for i in b["index"].tolist()]


# --------------------------------------------------------------------------- the index itself
def test_the_packed_index_says_where_every_member_lies(template_shards, one_sample_shards):
    """make_shards names its compact index in the manifest; each row's members
    read at their offsets are the bytes the tar holds, its shard is the tar
    the sample is in, and its [lo, hi) byte range is a tar stream of exactly
    that sample (what pyav reads); the same after reindex of the clones."""
    for root in (template_shards, one_sample_shards):
        manifest = json.loads((root / "manifest.json").read_text())
        assert manifest["index_file"] == "index.npy" and "fragment_tables" not in manifest
        rows = np.load(root / "index.npy")
        assert rows.dtype == INDEX_DTYPE and len(rows) == manifest["total_samples"]
        for k, shard in enumerate(manifest["shards"][:12]):
            row, tar = rows[k], root / shard["path"]
            assert row["shard"] == k
            members = dict(_members(tar))
            data = tar.read_bytes()
            for name, member in members.items():
                ext = name.split(".", 1)[1]
                m = "video" if ext == "mp4" else ext
                assert m in MEMBERS
                assert data[row[f"{m}_offset"]:row[f"{m}_offset"] + row[f"{m}_size"]] == member, (root, k, m)
            assert json.loads(data[row["json_offset"]:row["json_offset"] + row["json_size"]])["index"] == k
            stream = io.BytesIO(data[row["lo"]:row["hi"]])
            got = list(tariterators.group_by_keys(tariterators.tar_file_expander([{"stream": stream, "url": "x"}])))
            assert len(got) == 1 and got[0]["mp4"] == next(v for n, v in members.items() if n.endswith(".mp4"))


def test_index_rows_are_the_same_from_the_index_and_from_the_idx_files(one_sample_shards):
    shards = resolve_shards(str(one_sample_shards))
    positions = [31, 30, 45, 239, 30]
    got, rows = index_rows(shards, positions)
    assert got.tolist() == [30, 31, 45, 239]
    shards.index = None  # the .idx files of the tars holding them (with the warning that names reindex)
    with pytest.warns(RuntimeWarning, match=rf"python -m shard_tools.reindex {one_sample_shards}"):
        _, parsed = index_rows(shards, positions)
    assert rows.tobytes() == parsed.tobytes()
    with pytest.raises(IndexError, match="outside the dataset"):
        index_rows(shards, [240])


def test_idx_files_of_any_member_layout_are_read_line_by_line(tmp_path, one_sample_shards):
    """.idx lines listing different members (a mixed or older tar) give the
    same rows as a tar reader would: a missing member at offset -1, the byte
    ranges running on; a uniform file parsed in bulk gives what the
    line-by-line parse gives; a bad line is named."""
    from loaders.index import _parse_lines, idx_rows
    idx = tmp_path / "mixed.idx"
    idx.write_text("v1.2 3\n"
                   "cls 512 2 a.cls json 1536 30 a.json mp4 2560 1000 a.mp4\n"
                   "json 4096 20 b.json webm 5120 700 b.webm\n"
                   "frag_bytes 6656 16 c.frag_bytes mkv 7680 10 c.mkv\n")
    rows = idx_rows(str(idx), 5)
    assert rows["shard"].tolist() == [5, 5, 5]
    assert rows["video_offset"].tolist() == [2560, 5120, 7680] and rows["video_size"].tolist() == [1000, 700, 10]
    assert rows["cls_offset"].tolist() == [512, -1, -1] and rows["frag_bytes_offset"].tolist() == [-1, -1, 6656]
    assert rows["lo"].tolist() == [0, 3584, 6144] and rows["hi"].tolist() == [3584, 6144, 8192]
    uniform = one_sample_shards / "train-000003.idx"
    lines = uniform.read_text().splitlines(keepends=True)[1:]
    exts, numbers = _parse_lines(str(uniform), lines)
    rows = idx_rows(str(uniform), 3)
    for j, ext in enumerate(exts):
        m = "video" if ext == "mp4" else ext
        assert rows[f"{m}_offset"].tolist() == numbers[:, j, 0].tolist()
    idx.write_text("v1.2 2\ncls 512 2 a.cls\njson x 20 b.json\n")
    with pytest.raises(ValueError, match=rf"{idx}: line 3: an offset or size is not a number"):
        idx_rows(str(idx), 0)


# --------------------------------------------------------------------------- a rank's files
@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_every_rank_reads_its_range_and_opens_no_other_ranks_files(one_sample_shards, backend):
    """WORLD_SIZE 8 over 240 one-sample shards, one epoch on each rank (pyav
    in-process, dali reading in-process): each rank yields exactly its range,
    every video once in all, and opens the compact index and only its own
    range's tars — no .idx, nothing of another range; the next epoch (dali:
    a new source and pipeline) opens only the next range's tars."""
    workers = {"num_workers": 0} if backend == "pyav" else {"num_workers": 1, "source_workers": 0}
    seen = []
    for rank in range(WORLD):
        with opened_files() as opened:
            loader = build_loader(str(one_sample_shards), backend=backend, rank=rank, world_size=WORLD, **SMALL,
                                  **workers)
            got = run_epoch(loader)
        assert sorted(got) == list(range(rank * PER_RANK, (rank + 1) * PER_RANK)), rank
        held = loader._index.positions if backend == "pyav" else loader._members[1].index.positions
        assert held.tolist() == sorted(got)  # the rows of its range only
        assert str(one_sample_shards / "index.npy") in opened
        mine = {p for p in shard_files(one_sample_shards, rank) if p.endswith(".tar")}
        assert data_files(opened) == mine, (rank, sorted(data_files(opened) - mine)[:3])
        seen += got
        if rank == 0:
            loader.set_epoch(1)
            with opened_files() as opened:
                got = run_epoch(loader)
            assert sorted(got) == list(range(PER_RANK, 2 * PER_RANK))
            assert data_files(opened) == {p for p in shard_files(one_sample_shards, 1) if p.endswith(".tar")}
    assert sorted(seen) == list(range(SHARDS))


def test_dali_reads_the_codec_of_copied_shards_from_its_own_range(one_sample_shards, tmp_path):
    """Shards packed with --codec copy name no codec in the manifest: the dali
    backend's CPU check reads the first sample of a tar of the rank's own range."""
    copy = linked_copy(one_sample_shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["settings"]["codec"] = "copy"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with opened_files() as opened:
            build_loader(str(copy), backend="dali", rank=5, world_size=WORLD, num_workers=1, **SMALL)
    assert data_files(opened) == {str(copy / f"train-{5 * PER_RANK:06d}.tar")}


def test_member_reader_keeps_a_bounded_number_of_files_open(one_sample_shards):
    """A range of more tars than ``max_files``: reads stay right, and no more
    than ``max_files`` of them are open at once (a rank's range can hold more
    tars than ``ulimit -n`` allows)."""
    shards = resolve_shards(str(one_sample_shards))
    reader = MemberReader(MemberIndex(shards, range(40, 80)), max_files=4)

    def open_tars():
        return sum(os.readlink(f"/proc/self/fd/{fd}").endswith(".tar") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    before = open_tars()
    for position in list(range(40, 80)) + list(range(79, 39, -3)):
        assert json.loads(reader.read(position, "json"))["index"] == position
        assert open_tars() - before <= 4
    reader.close()
    assert open_tars() == before


# --------------------------------------------------------------------------- older datasets
def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a dataset folder whose tars and .idx are hard links, without its compact index."""
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix in (".tar", ".idx"):
            os.link(p, dst / p.name)
        elif p.is_file() and p.name != "index.npy":
            shutil.copy2(p, dst / p.name)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop("index_file", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_a_dataset_without_the_index_loads_and_loads_after_reindex(one_sample_shards, tmp_path, backend, capsys):
    """A manifest that names no compact index: the loader says so once (naming
    the command) and reads the .idx of its own range's tars only; after
    ``python -m shard_tools.reindex OUT`` it reads the index and no .idx, and
    yields the same."""
    old = linked_copy(one_sample_shards, tmp_path / "old")
    workers = {"num_workers": 0} if backend == "pyav" else {"num_workers": 1, "source_workers": 0}
    opts = dict(backend=backend, rank=3, world_size=WORLD, train=False, **SMALL, **workers)
    with warnings.catch_warnings(record=True) as caught, opened_files() as opened:
        warnings.simplefilter("always")
        before = [i for b in build_loader(str(old), **opts) for i in b["index"].tolist()]
        build_loader(str(old), **opts).set_epoch(0)
        again = [i for b in build_loader(str(old), **opts) for i in b["index"].tolist()]
    told = [str(w.message) for w in caught if "reindex" in str(w.message)]
    assert len(told) == 1 and f"python -m shard_tools.reindex {old}" in told[0]
    assert before == again == list(range(3 * PER_RANK, 4 * PER_RANK))
    assert data_files(opened) == shard_files(old, 3)  # its own tars and their .idx
    assert reindex_main([str(old)]) == 0 and capsys.readouterr().out.strip() == str(old / "index.npy")
    assert json.loads((old / "manifest.json").read_text())["index_file"] == "index.npy"
    with warnings.catch_warnings(record=True) as caught, opened_files() as opened:
        warnings.simplefilter("always")
        after = [i for b in build_loader(str(old), **opts) for i in b["index"].tolist()]
    assert after == before and not [w for w in caught if "index" in str(w.message)]
    assert data_files(opened) == {p for p in shard_files(old, 3) if p.endswith(".tar")}


def test_reindex_records_whether_an_old_dataset_has_fragment_tables(old_long_vp9, tmp_path):
    """A dataset packed before fragment tables (no member_format): reindex
    records ``fragment_tables: none``, and the dali backend then decodes whole
    members (its warning) without reading an .idx; the batches are the ones it
    gave before."""
    old = linked_copy(old_long_vp9, tmp_path / "old")
    opts = dict(backend="dali", batch_size=3, device="cpu", crop_size=48, normalize=False, num_workers=1,
                train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = list(build_loader(str(old), **opts))
    assert reindex_main([str(old)]) == 0
    assert json.loads((old / "manifest.json").read_text())["fragment_tables"] == "none"
    with warnings.catch_warnings(record=True) as caught, opened_files() as opened:
        warnings.simplefilter("always")
        loader = build_loader(str(old), **opts)
        after = list(loader)
    assert loader.window_cut is False and any("Re-pack" in str(w.message) for w in caught)
    assert not [p for p in opened if p.endswith(".idx")]
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in ("fast", "index", "frame_ids"))


def test_bad_or_stale_indices_are_named(one_sample_shards, tmp_path):
    """A truncated index, one of another dataset's size or missing: a clear
    error naming it and the command; an .idx rewritten after the index: a
    warning naming both."""
    copy = linked_copy(one_sample_shards, tmp_path / "copy")
    assert reindex_main([str(copy)]) == 0
    index = copy / "index.npy"
    good = index.read_bytes()
    opts = dict(backend="pyav", num_workers=0, rank=0, world_size=WORLD, **SMALL)
    for bad in (good[:-100], good[:128 + 10 * INDEX_DTYPE.itemsize]):
        index.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"{index}: .*python -m shard_tools.reindex {copy}"):
            run_epoch(build_loader(str(copy), **opts))
    index.unlink()
    with pytest.raises(ValueError, match=rf"{index}: cannot read the compact index"):
        run_epoch(build_loader(str(copy), **opts))
    index.write_bytes(good)
    idx = copy / "train-000002.idx"
    os.utime(idx, (os.stat(index).st_mtime + 10,) * 2)
    with pytest.warns(RuntimeWarning, match=rf"{idx} is newer than the compact index"):
        build_loader(str(copy), **opts)._dataset(0)


def test_reindex_refuses_what_it_cannot_index(one_sample_shards, tmp_path, caplog):
    """Exit 2 with the reason logged: no manifest, an .idx that disagrees with
    the manifest (named), a writer holding the folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reindex_main([str(empty)]) == 2 and f"{empty} has no manifest.json" in caplog.text
    copy = linked_copy(one_sample_shards, tmp_path / "copy")
    idx = copy / "train-000007.idx"
    text = idx.read_text().splitlines()
    idx.unlink()  # (a hard link: the original stays as it is)
    idx.write_text("\n".join(["v1.2 2", text[1], text[1]]) + "\n")
    caplog.clear()
    assert reindex_main([str(copy)]) == 2
    assert f"{idx}: 2 sample lines, its header says 2 and the manifest 1" in caplog.text
    assert "index_file" not in json.loads((copy / "manifest.json").read_text()) and not (copy / "index.npy").exists()
    caplog.clear()
    with dataset_lock(str(one_sample_shards)):
        assert reindex_main([str(one_sample_shards)]) == 2 and "is being written by" in caplog.text
