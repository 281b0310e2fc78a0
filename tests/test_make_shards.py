"""make_shards on the real videos and on bad inputs."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from av.sidedata.sidedata import Type as SideDataType

from loaders import build_loader
from shard_tools.make_shards import main as make_shards
from shard_tools.wds_index import write_index
from tests import media
from tests.conftest import REAL, REPO


def tar_samples(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every tar of a shard folder (in manifest order)."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        with tarfile.open(shard_dir / shard["path"]) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def decode_count(data: bytes) -> tuple[int, av.video.stream.VideoStream]:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        info = (s.average_rate, s.codec_context.width, s.codec_context.height)
        return sum(1 for _ in c.decode(s)), info


def test_real_videos_packed_exactly(h264_shards, real_tree):
    manifest = json.loads((h264_shards / "manifest.json").read_text())
    samples = tar_samples(h264_shards)
    assert manifest["total_samples"] == len(samples) == len(REAL)
    assert manifest["classes"] == ["arm wrestling", "other"]
    assert (h264_shards / "classes.txt").read_text(encoding="utf-8") == "arm wrestling\nother\n"
    assert (h264_shards / "failed.jsonl").read_text() == ""
    assert manifest["pattern"] == "train-{000000..000002}.tar"
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 2, 1]
    sources = set()
    indices = []
    for key, members in samples.items():
        assert "." not in key and key
        assert set(members) == {"mp4", "json", "cls", "nframes", "ids", "frag_bytes", "frag_frames"}
        info = json.loads(members["json"])
        n, (rate, w, h) = decode_count(members["mp4"])
        assert info["num_frames"] == n == struct.unpack("<i", members["nframes"])[0]
        assert info["window_cut"] is True and info["fragments"] == -(-n // 16)
        assert rate == 30 and info["fps"] == 30.0
        assert min(w, h) == 128 and w % 2 == 0 and h % 2 == 0
        assert (info["width"], info["height"]) == (w, h)
        index, label = struct.unpack("<qq", members["ids"])
        assert label == info["label"] == int(members["cls"]) == manifest["classes"].index(info["label_name"])
        assert index == info["index"]
        indices.append(index)
        assert info["codec"] == "h264" and info["duration"] == pytest.approx(n / 30, abs=1e-5)
        sources.add(info["source"])
    assert indices == list(range(len(REAL)))  # position in manifest order
    assert sources == {str(p.relative_to(real_tree)) for p in real_tree.rglob("*.*")}
    # plain webdataset reads the same keys in the same order
    urls = str(h264_shards / manifest["pattern"])
    assert [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)] == list(samples)


def test_gop_is_exactly_the_requested_one(h264_shards):
    """A keyframe every --gop (16) frames and nowhere else: the source's own
    frame types must not leak into the encoder (they forced extra I-frames)."""
    for members in tar_samples(h264_shards).values():
        with av.open(io.BytesIO(members["mp4"])) as c:
            types = [int(f.pict_type) for f in c.decode(video=0)]
        assert [i for i, t in enumerate(types) if t == 1] == list(range(0, len(types), 16))


def test_index_files_match_dali_wds2idx(h264_shards, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    for tar in sorted(h264_shards.glob("*.tar")):
        ref = tmp_path / (tar.stem + ".ref.idx")
        creator = wds2idx.IndexCreator(str(tar), str(ref), verbose=False)
        creator.create_index()
        creator.close()
        assert ref.read_text() == tar.with_suffix(".idx").read_text()


def test_dali_reader_reads_every_sample_with_the_index(h264_shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types
    manifest = json.loads((h264_shards / "manifest.json").read_text())
    tars = [str(h264_shards / s["path"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        ids = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext="ids",
                                    dtypes=types.INT64, name="reader")
        return ids

    p = pipe()
    p.build()
    n = manifest["total_samples"]
    assert p.reader_meta("reader")["epoch_size"] == n
    seen = [int(np.asarray(p.run()[0][0])[0]) for _ in range(n)]
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("shards", ["h264_shards", "vp9_shards"])
def test_members_are_fragmented_mp4s_cut_at_every_gop(shards, request):
    """Each member is a standard MP4 that PyAV decodes whole to num_frames
    frames, with one fragment per 16-frame GOP; its table (KEY.frag_bytes,
    KEY.frag_frames) is where each fragment starts; the init segment followed
    by any run of fragments decodes to exactly those frames of the whole."""
    from loaders.fragments import Fragments
    from shard_tools import fmp4
    for key, members in tar_samples(request.getfixturevalue(shards)).items():
        info = json.loads(members["json"])
        data = members["mp4"]
        frags = Fragments.from_members(members["frag_bytes"], members["frag_frames"])
        parsed = fmp4.parse(data)
        assert np.array_equal(frags.bytes, parsed.bytes) and np.array_equal(frags.frames, parsed.frames)
        n = info["num_frames"]
        assert frags.frames.tolist() == [*range(0, n, 16), n] and frags.bytes[-1] <= len(data)
        assert data[frags.bytes[0] + 4:frags.bytes[0] + 8] == b"moof"
        with av.open(io.BytesIO(data)) as c:
            whole = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(whole) == n
        for g0, g1 in [(0, 1), (1, 3), (frags.count - 2, frags.count), (frags.count // 2, frags.count // 2 + 1)]:
            if not 0 <= g0 < g1 <= frags.count:
                continue
            first, last = int(frags.frames[g0]), int(frags.frames[g1]) - 1
            cut, base = frags.cut(data, first, last)
            assert base == first and (len(cut) < len(data) or frags.count == 1)
            with av.open(io.BytesIO(cut)) as c:
                part = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert len(part) == last - first + 1 and all(np.array_equal(a, b) for a, b in zip(part, whole[first:]))


def test_vp9_shards_decode_on_dali_cpu(vp9_shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def
    samples = tar_samples(vp9_shards)
    for key, members in samples.items():
        assert set(members) == {"mp4", "json", "cls", "nframes", "ids", "frag_bytes", "frag_frames"}
        info = json.loads(members["json"])
        n, _ = decode_count(members["mp4"])
        assert n == info["num_frames"] and info["codec"] == "vp9"
        data = np.frombuffer(members["mp4"], np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            enc = fn.external_source(source=lambda: [data], batch=True)
            return fn.decoders.video(enc, device="cpu")

        p = pipe()
        p.build()
        frames = np.asarray(p.run()[0][0])
        assert frames.shape == (n, info["height"], info["width"], 3), key


@pytest.fixture()
def bad_tree(videos, tmp_path) -> Path:
    """Good videos beside every kind of bad input."""
    src = tmp_path / "src"
    (src / "good").mkdir(parents=True)
    (src / "bad").mkdir()
    shutil.copy(videos / "part_0.mp4", src / "good" / "part_0.mp4")
    shutil.copy(videos / "test.avi", src / "good" / "test.avi")
    data = (videos / "test.mp4").read_bytes()
    (src / "bad" / "zero.mp4").write_bytes(b"")
    (src / "bad" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    corrupt = bytearray(data)
    corrupt[40000: len(data) // 2] = np.random.default_rng(0).integers(0, 256, len(data) // 2 - 40000,
                                                                         dtype=np.uint8).tobytes()
    (src / "bad" / "corrupt.mp4").write_bytes(bytes(corrupt))
    (src / "bad" / "notes.mp4").write_text("this is not a video\n")
    media.write_audio_only(src / "bad" / "audio.mp4")
    os.symlink(src / "nowhere.mp4", src / "bad" / "dangling.mp4")
    (src / "README.md").write_text("# my videos\n")  # a document beside the videos: named, not packed
    return src


def test_bad_inputs_reported_and_run_goes_on(bad_tree, tmp_path, capsys):
    out = tmp_path / "out"
    rc = make_shards([str(bad_tree), str(out), "--quiet", "--workers", "2", "--short-side", "64",
                      "--min-frames", "40"])
    assert rc == 3
    failed = {json.loads(line)["source"]: json.loads(line)["reason"]
              for line in (out / "failed.jsonl").read_text().splitlines()}
    assert set(failed) == {"bad/zero.mp4", "bad/truncated.mp4", "bad/corrupt.mp4", "bad/notes.mp4",
                           "bad/audio.mp4", "bad/dangling.mp4", "good/part_0.mp4"}
    assert "empty" in failed["bad/zero.mp4"]
    assert "truncated" in failed["bad/truncated.mp4"]
    assert "corrupt" in failed["bad/corrupt.mp4"]
    assert "not a video" in failed["bad/notes.mp4"]
    assert "audio only" in failed["bad/audio.mp4"]
    assert "unreadable" in failed["bad/dangling.mp4"]
    assert "too short" in failed["good/part_0.mp4"] and "33 frames" in failed["good/part_0.mp4"]
    packed = tar_samples(out)
    assert [json.loads(m["json"])["source"] for m in packed.values()] == ["good/test.avi"]
    captured = capsys.readouterr()
    assert "1 packed, 7 failed" in captured.out
    assert "not videos, left out: 1 file(s) (README.md)" in captured.err


def test_kinetics_layout_with_missing_rows(videos, tmp_path):
    src = tmp_path / "kinetics"
    (src / "arm wrestling").mkdir(parents=True)
    shutil.copy(videos / "demo.mp4", src / "arm wrestling" / "abc-DEF_12_000010_000020.mp4")
    shutil.copy(videos / "part_0.mp4", src / "zzz_000001_000011.mp4")  # flat
    ann = tmp_path / "train.csv"
    ann.write_text('label,youtube_id,time_start,time_end,split,is_cc\n'
                   '"arm wrestling",abc-DEF_12,10,20,train,0\n'
                   '"zumba, fast",zzz,1,11,train,0\n'
                   'abseiling,gone,5,15,train,0\n'
                   'abseiling,valrow,5,15,val,0\n')
    out = tmp_path / "out"
    rc = make_shards([str(src), str(out), "--annotations", str(ann), "--split", "train", "--quiet",
                      "--workers", "0", "--short-side", "64"])
    assert rc == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["layout"] == "kinetics"
    assert manifest["classes"] == ["abseiling", "arm wrestling", "zumba, fast"]
    infos = {k: json.loads(m["json"]) for k, m in tar_samples(out).items()}
    assert set(infos) == {"abc-DEF_12_000010_000020", "zzz_000001_000011"}
    assert infos["abc-DEF_12_000010_000020"]["label"] == 1
    assert infos["zzz_000001_000011"]["label"] == 2
    assert infos["zzz_000001_000011"]["source"] == "zzz_000001_000011.mp4"
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["source"] for f in failed] == ["abseiling/gone_000005_000015.mp4"]
    assert failed[0]["reason"].startswith("missing")


def test_unlabeled_kinetics_test_csv_and_csv_layout(videos, tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    shutil.copy(videos / "part_0.mp4", src / "vid_000000_000010.mp4")
    def pack(name: str, annotations: str) -> tuple[dict, dict]:
        (tmp_path / name).write_text(annotations)
        out = tmp_path / f"out_{name}"
        assert make_shards([str(src), str(out), "--annotations", str(tmp_path / name), "--quiet", "--workers",
                            "0", "--short-side", "64"]) == 0
        (info,) = [json.loads(m["json"]) for m in tar_samples(out).values()]
        return info, json.loads((out / "manifest.json").read_text())

    info, manifest = pack("test.csv", "youtube_id,time_start,time_end,split\nvid,0,10,test\n")
    assert info["label"] == -1 and info["label_name"] == "" and manifest["settings"]["layout"] == "kinetics"
    info, manifest = pack("list.csv", "path,label\nvid_000000_000010.mp4,\n")
    assert info["label"] == -1 and manifest["settings"]["layout"] == "csv"


def test_ucf101_and_hmdb51_split_files(videos, tmp_path):
    src = tmp_path / "ucf"
    for cls, name in [("ApplyEyeMakeup", "v_ApplyEyeMakeup_g08_c01.avi"), ("YoYo", "v_YoYo_g01_c01.avi"),
                      ("YoYo", "v_YoYo_g02_c01.avi")]:
        (src / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(videos / "part_0.mp4", src / cls / name)
    trainlist = tmp_path / "trainlist01.txt"
    trainlist.write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g02_c01.avi 2\n")
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--split-file", str(trainlist), "--quiet", "--workers", "0",
                        "--short-side", "64"]) == 0
    infos = sorted((json.loads(m["json"])["source"], json.loads(m["json"])["label"])
                   for m in tar_samples(out).values())
    assert infos == [("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0), ("YoYo/v_YoYo_g02_c01.avi", 1)]

    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "ApplyEyeMakeup_test_split1.txt").write_text("v_ApplyEyeMakeup_g08_c01.avi 2\n")
    (splits / "YoYo_test_split1.txt").write_text("v_YoYo_g01_c01.avi 1 \nv_YoYo_g02_c01.avi 2 \n")
    out2 = tmp_path / "out2"
    assert make_shards([str(src), str(out2), "--split-file", str(splits), "--split", "test", "--quiet",
                        "--workers", "0", "--short-side", "64"]) == 0
    sources = sorted(json.loads(m["json"])["source"] for m in tar_samples(out2).values())
    assert sources == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "YoYo/v_YoYo_g02_c01.avi"]
    # an HMDB split file without --split is a usage error
    assert make_shards([str(src), str(tmp_path / "o3"), "--split-file", str(splits), "--quiet"]) == 2


def test_copy_keeps_the_stream(videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(videos / "test.avi", src / "test.avi")
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--codec", "copy", "--quiet", "--workers", "0"]) == 0
    (members,) = tar_samples(out).values()
    info = json.loads(members["json"])
    n, (rate, w, h) = decode_count(members["mp4"])
    assert info["codec"] == "mpeg4" and (w, h) == (320, 240) and n == info["num_frames"] == 164
    assert info["window_cut"] is True


def test_copy_cuts_where_every_fragment_decodes_alone(tmp_path, capsys):
    """--codec copy keeps the source's GOPs: closed GOPs of any length are cut at
    each keyframe; an open GOP (its leading frames need the GOP before) and a
    codec MP4 cannot hold (VP8) are decoded whole, said in the json and the
    summary. Matroska's first packets carry no decode time: every frame is kept."""
    from loaders.fragments import Fragments
    src = tmp_path / "src"
    src.mkdir()
    x264 = "keyint={}:min-keyint={}:scenecut={}:open-gop={}:bframes=3"
    media.write_coded_video(src / "open.mkv", 120, codec="libx264",
                            options={"x264-params": x264.format(24, 24, 0, 1)})
    media.write_coded_video(src / "gop37.mkv", 120, codec="libx264",
                            options={"x264-params": x264.format(37, 37, 0, 0)})
    media.write_coded_video(src / "vp8.webm", 120, codec="libvpx", options={"g": "30"})
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--codec", "copy", "--quiet", "--workers", "0"]) == 0
    summary = capsys.readouterr()
    assert "3 packed, 0 failed" in summary.out and "2 of them decoded whole" in summary.out
    assert "open.mkv" in summary.err and "vp8.webm" in summary.err
    got = {}
    for members in tar_samples(out).values():
        info = json.loads(members["json"])
        ext = next(e for e in ("mp4", "webm") if e in members)
        n, _ = decode_count(members[ext])
        assert n == info["num_frames"] == 120, info["source"]
        got[info["source"]] = (info, Fragments.from_members(members["frag_bytes"], members["frag_frames"]), ext)
    info, frags, ext = got["gop37.mkv"]
    assert info["window_cut"] is True and ext == "mp4"
    assert frags.frames.tolist() == [0, 37, 74, 111, 120]
    info, frags, ext = got["open.mkv"]
    assert info["window_cut"] is False and "does not decode alone" in info["window_cut_reason"]
    assert frags.frames.tolist() == [0, 120] and frags.bytes[0] == 0 and not frags.cuttable
    info, frags, ext = got["vp8.webm"]
    assert info["window_cut"] is False and ext == "webm" and "vp8" in info["window_cut_reason"]


@pytest.mark.parametrize("extra", [["--codec", "copy", "--fps", "30"], ["--codec", "copy", "--short-side", "128"],
                                   ["--gop", "0"], ["--codec", "vp9", "--bframes", "0"], ["--bframes", "-1"]])
def test_usage_errors(real_tree, tmp_path, extra, capsys):
    assert make_shards([str(real_tree), str(tmp_path / "o"), "--quiet", *extra]) == 2
    assert "error" in capsys.readouterr().err


def test_missing_src_and_reused_out_are_usage_errors(tmp_path, h264_shards, real_tree, capsys):
    assert make_shards([str(tmp_path / "nope"), str(tmp_path / "o"), "--quiet"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_shards([str(empty), str(tmp_path / "o2"), "--quiet"]) == 2
    assert "no videos found" in capsys.readouterr().err
    assert make_shards([str(real_tree), str(h264_shards), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bframes_option_sets_the_decode_order(videos, tmp_path):
    import io

    import av
    from av.video.frame import PictureType
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(videos / "test.mp4", src / "test.mp4")
    kinds = {}
    for bframes in ("0", None):
        out = tmp_path / f"out{bframes}"
        args = [str(src), str(out), "--short-side", "64", "--quiet", "--workers", "0"]
        assert make_shards(args + (["--bframes", bframes] if bframes else [])) == 0
        (members,) = tar_samples(out).values()
        with av.open(io.BytesIO(members["mp4"])) as c:
            kinds[bframes] = {PictureType(f.pict_type).name for f in c.decode(video=0)}
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["settings"].get("bframes") == (0 if bframes else None)
    assert "B" not in kinds["0"] and "B" in kinds[None]  # veryfast's default has B-frames


def test_b_frames_are_disposable_unless_b_refs(videos, tmp_path):
    """By default no B-frame is a reference, so a decoder told to skip
    non-reference frames (as the pyav loader is, for frames a clip does not
    keep) skips every B-frame; with --b-refs x264's B-pyramid makes some of
    them references."""
    import io

    import av
    from av.video.frame import PictureType
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(videos / "test.mp4", src / "test.mp4")
    kept = {}
    for flag in ([], ["--b-refs"]):
        out = tmp_path / f"out{len(flag)}"
        assert make_shards([str(src), str(out), "--short-side", "64", "--quiet", "--workers", "0", *flag]) == 0
        (members,) = tar_samples(out).values()
        with av.open(io.BytesIO(members["mp4"])) as c:
            all_kinds = [PictureType(f.pict_type).name for f in c.decode(video=0)]
        with av.open(io.BytesIO(members["mp4"])) as c:
            c.streams.video[0].codec_context.skip_frame = "NONREF"
            kept[bool(flag)] = [PictureType(f.pict_type).name for f in c.decode(video=0)]
        assert all_kinds.count("B") > len(all_kinds) // 3, all_kinds
        assert json.loads((out / "manifest.json").read_text())["settings"]["b_refs"] is bool(flag)
    assert "B" not in kept[False] and "B" in kept[True]
    assert make_shards([str(src), str(tmp_path / "vp9"), "--codec", "vp9", "--b-refs", "--quiet"]) == 2


def test_x264_output_is_the_same_every_time(tmp_path):
    """The same input and settings give the same bytes. On CPUs with AVX-512,
    x264's AVX-512 path made this synthetic video encode differently from run
    to run (without the fix, 10 of 10 trials of 10 transcodes each gave 2 or
    more distinct outputs); ``x264_asm`` turns that path off."""
    import hashlib

    from shard_tools.make_synthetic import render, write_video
    from shard_tools.transcode import EncodeSettings, transcode, x264_asm
    with open("/proc/cpuinfo") as f:
        avx512 = " avx512f" in f.read()
    assert ("asm=" in x264_asm()) is avx512  # asked of the libx264 PyAV loaded
    src = tmp_path / "ring.mp4"
    write_video(src, render("ring_swing_fast", 47463575, 96, 96))
    held, outputs = [], set()
    for i in range(12):
        held.append(bytearray(4096 * (i + 1)))  # a different heap for each run
        outputs.add(hashlib.md5(transcode(str(src), EncodeSettings(short_side=96))[0]).hexdigest())
    assert len(outputs) == 1


def test_same_input_gives_the_same_shards(videos, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for name in ("part_0.mp4", "test.avi"):
        shutil.copy(videos / name, src / "a" / name)
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        assert make_shards([str(src), str(out), "--short-side", "64", "--quiet", "--workers", "2"]) == 0
        outs.append(sorted((p.name, p.read_bytes()) for p in out.glob("train-*")))
        time.sleep(1.1)  # a member time from the clock would differ
    assert [n for n, _ in outs[0]] == ["train-000000.idx", "train-000000.tar"]
    assert outs[0] == outs[1]


def test_fps_and_short_side_as_asked(videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(videos / "S001C001P001R001A001_rgb.avi", src / "hd.avi")  # 1920x1080 30 fps
    shutil.copy(videos / "test.avi", src / "test.avi")  # 320x240 25 fps
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--fps", "12", "--short-side", "96", "--quiet", "--workers", "0"]) == 0
    for members in tar_samples(out).values():
        info = json.loads(members["json"])
        n, (rate, w, h) = decode_count(members["mp4"])
        assert rate == 12 and min(w, h) == 96 and n == info["num_frames"]
        src_seconds = {"hd.avi": 103 / 30, "test.avi": 164 / 25}[info["source"]]
        assert abs(n - src_seconds * 12) <= 1


def test_script_resume_after_kill(videos, tmp_path):
    """kill -9 of the whole run, then --resume: complete shards kept, nothing missing or duplicated."""
    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    for i in range(24):
        shutil.copy(videos / ("test.mp4" if i % 2 else "demo.mp4"), src / "c" / f"clip{i:02d}.mp4")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "shard_tools" / "make_shards.py"), str(src), str(out), "--quiet",
           "--workers", "2", "--samples-per-shard", "2", "--short-side", "64", "--codec", "vp9"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob("train-*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((out / ".make_shards_state.json").read_text())
    kept = {s["path"]: (out / s["path"]).stat().st_mtime_ns for s in state["shards"]}
    assert 0 < len(kept) < 12, "the run was not killed midway"

    rc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert "24 packed, 0 failed" in rc.stdout
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for path, mtime in kept.items():  # complete shards were kept as they were
        assert (out / path).stat().st_mtime_ns == mtime
    samples = tar_samples(out)
    sources = sorted(json.loads(m["json"])["source"] for m in samples.values())
    assert sources == [f"c/clip{i:02d}.mp4" for i in range(24)]
    indices = sorted(json.loads(m["json"])["index"] for m in samples.values())
    assert indices == list(range(24))
    assert len(list(out.glob("train-*.tar"))) == len(list(out.glob("train-*.idx"))) == 12
    # a resume of a complete run packs nothing more
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "24 packed, 0 failed" in again.stdout


def test_write_index_rejects_empty_tar(tmp_path):
    path = tmp_path / "empty.tar"
    tarfile.open(path, "w").close()
    with pytest.raises(ValueError, match="no samples"):
        write_index(str(path), str(tmp_path / "empty.idx"))


def test_resume_refuses_a_run_with_another_member_format(videos, tmp_path, capsys):
    """A --resume of a run begun by an older make_shards (members without
    fragment tables) would mix two member formats in one dataset: refused."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(videos / "part_0.mp4", src / "part_0.mp4")
    out = tmp_path / "out"
    args = [str(src), str(out), "--short-side", "64", "--quiet", "--workers", "0"]
    assert make_shards(args) == 0
    state_path = out / ".make_shards_state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["member_format"]  # as the state of a run before fragment tables
    state_path.write_text(json.dumps(state))
    assert make_shards(args + ["--resume"]) == 2
    assert "member_format" in capsys.readouterr().err


# (degrees counter-clockwise, hflip, vflip) as set_display_rotation writes them: the eight orientations
ORIENTED = {"r0": (0, False, False), "r0_hflip": (0, True, False), "r0_vflip": (0, False, True),
            "r90": (90, False, False), "r90_hflip": (90, True, False), "r90_vflip": (90, False, True),
            "r180": (180, False, False), "r270": (-90, False, False)}


def _decoded_first_frame(data: bytes):
    with av.open(io.BytesIO(data)) as c:
        return next(c.decode(video=0))


def test_display_orientations_are_packed_upright(tmp_path):
    """Phone-style videos stored sideways or mirrored with a display matrix
    (all eight orientations) are packed as a player shows them: checked on
    content (the quadrants' colours), width/height the displayed ones, and
    the packed member carries no display matrix. --codec copy refuses them."""
    src = tmp_path / "src"
    src.mkdir()
    upright = media.quadrant_frame(64, 96)
    for name, (deg, hflip, vflip) in ORIENTED.items():
        stored = media.stored_for_display(upright, deg % 360, hflip, vflip)
        media.write_video(src / f"{name}.mp4", [stored] * 4, options={"crf": "10"}, rotation=(deg, hflip, vflip))
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--short-side", "64", "--quiet", "--workers", "2"]) == 0
    samples = {json.loads(m["json"])["source"]: m for m in tar_samples(out).values()}
    assert sorted(samples) == sorted(f"{n}.mp4" for n in ORIENTED)
    ops = set()
    for source, members in samples.items():
        info = json.loads(members["json"])
        frame = _decoded_first_frame(members["mp4"])
        assert (info["width"], info["height"]) == (frame.width, frame.height) == (96, 64), source
        assert media.read_quadrants(frame.to_ndarray(format="rgb24")) == list(media.QUADRANTS), source
        assert frame.rotation == 0 and SideDataType.DISPLAYMATRIX not in frame.side_data, source
        ops.add(info["orientation"])
    assert len(ops) == 8
    copy = tmp_path / "copy"
    assert make_shards([str(src), str(copy), "--codec", "copy", "--quiet", "--workers", "0"]) == 3
    failed = [json.loads(line) for line in (copy / "failed.jsonl").read_text().splitlines()]
    assert sorted(f["source"] for f in failed) == sorted(f"{n}.mp4" for n in ORIENTED if n != "r0")
    assert all("display matrix" in f["reason"] and "transcode" in f["reason"] for f in failed)


def test_real_world_oddities_are_packed_right_or_reported(videos, tmp_path):
    """Inputs real datasets hold — other codecs, 10-bit and 4:4:4, odd, tiny
    and 4K sizes, non-square pixels, variable frame rate, one frame, a long
    GOP, a picture track before the video, damage in the middle, no moov — are each
    packed correctly (frames, fps, size) or reported with a reason; never
    both, never lost."""
    src = tmp_path / "src"
    src.mkdir()
    code = media.coded_frame

    def frames(n, h=64, w=96):
        return [code(i, h, w) for i in range(n)]

    good = {}  # source -> (frames at 30 fps, width, height) expected at --short-side 64

    def make(name, n_out, size, *args, **kw):
        media.write_video(src / name, *args, **kw)
        good[name] = (n_out, *size)

    make("hevc.mp4", 30, (96, 64), frames(30), codec="libx265", options={"x265-params": "log-level=error"})
    make("av1.mp4", 30, (96, 64), frames(30), codec="libsvtav1", options={"preset": "12"})
    make("vp8.webm", 30, (96, 64), frames(30), codec="libvpx")
    make("mpeg2.mpg", 30, (96, 64), frames(25), fps=25, codec="mpeg2video", fmt="mpeg")
    make("mjpeg.avi", 30, (96, 64), frames(15), fps=15, codec="mjpeg", pix_fmt="yuvj420p")
    make("prores_422_10bit.mov", 30, (96, 64), frames(24), fps=24, codec="prores", pix_fmt="yuv422p10le")
    make("h264_10bit.mkv", 30, (96, 64), frames(30), pix_fmt="yuv420p10le")
    make("h264_444.mp4", 30, (96, 64), frames(30), pix_fmt="yuv444p")
    make("odd_127x95.mkv", 10, (86, 64), frames(10, 95, 127), codec="ffv1", pix_fmt="bgr0")
    make("tiny_8x6.mkv", 10, (86, 64), frames(10, 6, 8), codec="ffv1", pix_fmt="bgr0")
    make("uhd_3840x2160.mp4", 3, (114, 64), frames(3, 2160, 3840), options={"preset": "ultrafast"})
    make("one_frame.mp4", 1, (96, 64), frames(1))
    make("long_gop.mp4", 90, (96, 64), frames(90), options={"x264-params": "keyint=300:min-keyint=300"})
    vfr = [0.0, 0.033, 0.1, 0.133, 0.3, 0.333, 0.4, 0.7, 0.733, 1.0]
    make("vfr.mkv", 31, (96, 64), frames(len(vfr)), times=vfr)  # 1.0 s + the last frame's 1/30 s
    make("anamorphic_sar2.mp4", 10, (64, 64), frames(10, 64, 64), sar=Fraction(2, 1))  # the grid kept, see below
    cover = src / "cover_art.mkv"  # a one-picture track (Matroska keeps it as stream 0) before the video
    with av.open(str(cover), "w") as out:
        pic = out.add_stream("mjpeg")
        pic.width, pic.height, pic.pix_fmt = 32, 32, "yuvj420p"
        pic.disposition = av.stream.Disposition.attached_pic
        video = out.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        for p in pic.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
            out.mux(p)
        for p in pic.encode():
            out.mux(p)
        for i, img in enumerate(frames(20)):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 30)
            for p in video.encode(f):
                out.mux(p)
        for p in video.encode():
            out.mux(p)
    good["cover_art.mkv"] = (20, 96, 64)
    real = bytearray((videos / "test.mp4").read_bytes())
    damaged = bytearray(real)
    damaged[len(real) // 2:len(real) // 2 + 1000] = bytes(1000)
    (src / "damaged_middle.mp4").write_bytes(bytes(damaged))
    (src / "no_moov.mp4").write_bytes((src / "long_gop.mp4").read_bytes()[:-2000])  # its moov is at the end
    bad = {"damaged_middle.mp4": "corrupt: the decoder reported", "no_moov.mp4": "cannot open it as a video"}

    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--short-side", "64", "--quiet", "--workers", "2"]) == 3
    failed = {f["source"]: f["reason"] for f in map(json.loads, (out / "failed.jsonl").read_text().splitlines())}
    packed = {json.loads(m["json"])["source"]: m for m in tar_samples(out).values()}
    assert sorted(failed) == sorted(bad) and sorted(packed) == sorted(good)  # never both, never lost
    for name, reason in bad.items():
        assert reason in failed[name], (name, failed[name])
    for name, (n, w, h) in good.items():
        info = json.loads(packed[name]["json"])
        decoded, (rate, dw, dh) = decode_count(packed[name]["mp4"])
        assert (info["num_frames"], info["width"], info["height"]) == (decoded, dw, dh) == (n, w, h), name
        assert rate == 30 and info["fps"] == 30.0, name
    frame = _decoded_first_frame(packed["cover_art.mkv"]["mp4"]).to_ndarray(format="rgb24").transpose(2, 0, 1)
    assert media.read_frame_number(frame) == 0  # the video, not the cover picture
    # non-square pixels: the stored grid is kept and its aspect written into the member and the json
    info = json.loads(packed["anamorphic_sar2.mp4"]["json"])
    with av.open(io.BytesIO(packed["anamorphic_sar2.mp4"]["mp4"])) as c:
        assert info["sample_aspect_ratio"] == "2" and c.streams.video[0].sample_aspect_ratio == 2
    loader = build_loader(str(out), backend="pyav", batch_size=4, device="cpu", crop_size=32, num_workers=0,
                          train=False)
    assert sorted(i for b in loader for i in b["index"].tolist()) == list(range(len(good)))
    assert loader.stats.skipped == 0


def test_square_pixels_stretches_to_the_display_aspect(tmp_path):
    """--square-pixels: 64x64 pixels twice as wide as tall are packed 128x64 with square pixels."""
    src = tmp_path / "src"
    src.mkdir()
    media.write_video(src / "anamorphic.mp4", [media.quadrant_frame(64, 64)] * 5, sar=Fraction(2, 1))
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--short-side", "64", "--quiet", "--workers", "0", "--square-pixels"]) == 0
    (members,) = tar_samples(out).values()
    info = json.loads(members["json"])
    frame = _decoded_first_frame(members["mp4"])
    assert (info["width"], info["height"], info["sample_aspect_ratio"]) == (frame.width, frame.height, "1") == \
        (128, 64, "1")
    assert media.read_quadrants(frame.to_ndarray(format="rgb24")) == list(media.QUADRANTS)
    assert json.loads((out / "manifest.json").read_text())["settings"]["square_pixels"] is True


def test_copy_refuses_what_nvdec_cannot_decode(tmp_path):
    """--codec copy keeps the stream: 10-bit and 4:4:4 (which DALI's NVDEC
    path does not decode) are refused with the reason; 8-bit 4:2:0 is kept."""
    src = tmp_path / "src"
    src.mkdir()
    for name, pix in (("h264_10bit.mkv", "yuv420p10le"), ("h264_444.mp4", "yuv444p"), ("h264_420.mp4", "yuv420p")):
        media.write_coded_video(src / name, 20, codec="libx264", pix_fmt=pix)
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--codec", "copy", "--quiet", "--workers", "0"]) == 3
    failed = {f["source"]: f["reason"] for f in map(json.loads, (out / "failed.jsonl").read_text().splitlines())}
    assert sorted(failed) == ["h264_10bit.mkv", "h264_444.mp4"]
    assert "yuv420p10le" in failed["h264_10bit.mkv"] and "8-bit 4:2:0" in failed["h264_444.mp4"]
    assert [json.loads(m["json"])["source"] for m in tar_samples(out).values()] == ["h264_420.mp4"]


def test_parts_packed_apart_and_merged_equal_one_run(videos, tmp_path):
    """make_shards --part I --parts 2 twice into one OUT (their own files), then
    merge_parts: the same samples as one run over all inputs — sources,
    labels, byte-identical video members, totals, classes, one report per
    failed input — numbered as that run numbers them (0..n-1 in manifest
    order, no holes), and a single brace pattern."""
    from shard_tools.merge_parts import main as merge_parts
    src = tmp_path / "src"
    classes = {"a": ["test.mp4", "part_0.mp4", "test.avi"], "b": ["demo.mp4", "S001C001P001R001A001_rgb.avi"]}
    for cls, names in classes.items():
        (src / cls).mkdir(parents=True)
        for name in names:
            shutil.copy(videos / name, src / cls / name)
    (src / "b" / "broken.mp4").write_bytes(b"not a video")
    common = ["--short-side", "64", "--quiet", "--workers", "0", "--samples-per-shard", "2"]
    one = tmp_path / "one"
    assert make_shards([str(src), str(one), *common]) == 3
    parted = tmp_path / "parted"  # two processes writing into it at the same time
    procs = [subprocess.Popen([sys.executable, "-m", "shard_tools.make_shards", str(src), str(parted), *common,
                               "--part", str(i), "--parts", "2"], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for i in (1, 0)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 3], outs
    assert any(o.startswith("part 0 of 2: ") for o in outs) and not (parted / "manifest.json").exists()
    assert merge_parts([str(parted)]) == 3
    a, b = tar_samples(one), tar_samples(parted)
    assert sorted(a) == sorted(b)  # the same keys
    for key in a:
        ja, jb = json.loads(a[key]["json"]), json.loads(b[key]["json"])
        assert (jb["source"], jb["label"], jb["index"]) == (ja["source"], ja["label"], ja["index"])
        assert a[key]["mp4"] == b[key]["mp4"] and a[key]["ids"] == b[key]["ids"]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (one, parted))
    assert (mb["total_samples"], mb["classes"], mb["failed"]) == (ma["total_samples"], ma["classes"], ma["failed"]) == \
        (5, ["a", "b"], 1)
    assert sorted(json.loads(m["json"])["index"] for m in b.values()) == list(range(5))
    assert mb["parts"] == 2 and mb["pattern"] == f"train-{{000000..{len(mb['shards']) - 1:06d}}}.tar"
    assert [json.loads(line)["source"] for line in (parted / "failed.jsonl").read_text().splitlines()] == \
        ["b/broken.mp4"]
    assert sorted(p.name for p in parted.glob("*.tar")) == [s["path"] for s in mb["shards"]]
    rows = np.load(parted / mb["index_file"])  # the compact index of the merged shards: row k is sample k
    for k, row in enumerate(rows):
        tar = (parted / mb["shards"][row["shard"]]["path"]).read_bytes()
        assert json.loads(tar[row["json_offset"]:row["json_offset"] + row["json_size"]])["index"] == k
    assert len(rows) == 5
    urls = str(parted / mb["pattern"])  # plain webdataset and the loaders read the merged dataset
    assert len([s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]) == 5
    assert sorted(i for batch in build_loader(str(parted), backend="pyav", batch_size=4, device="cpu",
                                              crop_size=32, num_workers=0, train=False)
                  for i in batch["index"].tolist()) == list(range(5))
    assert merge_parts([str(parted)]) == 3 and tar_samples(parted) == b  # a second merge changes nothing
    assert make_shards([str(src), str(parted), *common, "--part", "0", "--parts", "2", "--resume"]) == 2


def test_merge_refuses_parts_not_done(videos, tmp_path, capsys):
    from shard_tools.merge_parts import main as merge_parts
    src = tmp_path / "src"
    src.mkdir()
    for name in ("part_0.mp4", "test.avi"):
        shutil.copy(videos / name, src / name)
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--short-side", "64", "--quiet", "--workers", "0", "--part", "1",
                        "--parts", "3"]) == 0
    assert merge_parts([str(out)]) == 2
    assert "parts not done yet: 0, 2 of 3" in capsys.readouterr().err
    assert make_shards([str(src), str(tmp_path / "x"), "--quiet", "--part", "3", "--parts", "3"]) == 2


def test_ray_driver_packs_in_parts_and_resumes_after_a_kill(videos, tmp_path):
    """shard_tools.ray_pack on a local Ray instance: killed once a part has
    written a shard, then run again, it resumes and merges: every input
    packed once, indexed 0..n-1, as one make_shards run would pack them."""
    pytest.importorskip("ray")
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    for i in range(9):
        shutil.copy(videos / "test.mp4", src / f"v{i}.mp4")
    out = tmp_path / "out"
    args = ["--short-side", "96", "--workers", "0", "--samples-per-shard", "1"]
    cmd = [sys.executable, "-m", "shard_tools.ray_pack", str(src.parent), str(out), "--parts", "3", "--quiet", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob("train-p*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob("train-p*.tar")) and not (out / "manifest.json").exists(), "not killed midway"
    rc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert "9 packed, 0 failed, from 3 parts" in rc.stdout
    one = tmp_path / "one"
    assert make_shards([str(src.parent), str(one), "--quiet", *args]) == 0
    packed, single = tar_samples(out), tar_samples(one)
    assert {k: json.loads(m["json"])["index"] for k, m in packed.items()} == \
        {k: json.loads(m["json"])["index"] for k, m in single.items()}
    assert all(packed[k]["mp4"] == single[k]["mp4"] for k in single)


def test_a_frame_folder_packs_to_the_frames_of_the_same_video_file(tmp_path):
    """A video given as a folder of numbered frames (Something-Something V1's layout) at --frame-rate
    packs to the same frames as the same video given as a file at that rate."""
    import av
    src = tmp_path / "src"
    (src / "cls" / "clip_frames").mkdir(parents=True)
    # the file holds PNG pictures too (the same RGB frames on both sides, so the same encoder input)
    media.write_coded_video(src / "cls" / "clip.mov", 30, fps=12, height=48, width=64, codec="png", pix_fmt="rgb24")
    enc = av.CodecContext.create("png", "w")
    enc.width, enc.height, enc.pix_fmt = 64, 48, "rgb24"
    for i in range(30):  # numbered from 1, as SSv1's 00001.jpg, in no particular listing order
        frame = av.VideoFrame.from_ndarray(media.coded_frame(i, 48, 64), format="rgb24")
        (packet,) = enc.encode(frame)
        (src / "cls" / "clip_frames" / f"{i + 1:05d}.png").write_bytes(bytes(packet))
    (src / "cls" / "clip_frames" / "README.txt").write_text("frames of clip.mkv")
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--quiet", "--workers", "0", "--frame-rate", "12"]) == 0
    samples = {json.loads(m["json"])["source"]: m for m in tar_samples(out).values()}
    assert set(samples) == {"cls/clip.mov", "cls/clip_frames"}
    frames = {}
    for source, m in samples.items():
        info = json.loads(m["json"])
        assert info["num_frames"] == 75 and info["fps"] == 30 and info["label_name"] == "cls"  # 2.5 s at 30 fps
        with av.open(io.BytesIO(m["mp4"])) as c:
            frames[source] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert all(np.array_equal(a, b) for a, b in zip(frames["cls/clip.mov"], frames["cls/clip_frames"]))
    assert samples["cls/clip.mov"]["mp4"] == samples["cls/clip_frames"]["mp4"]  # the same member, byte for byte
    assert [media.read_frame_number(f.transpose(2, 0, 1)) for f in frames["cls/clip_frames"]][:6] == [0, 0, 1, 1, 1, 2]
    # without its rate a frame folder is reported, not guessed
    assert make_shards([str(src), str(tmp_path / "norate"), "--quiet", "--workers", "0"]) == 3
    (failed,) = [json.loads(line) for line in (tmp_path / "norate" / "failed.jsonl").read_text().splitlines()]
    assert failed["source"] == "cls/clip_frames" and "--frame-rate" in failed["reason"]
