"""The FFCV backend and make_ffcv: agreement with PyAV on the real videos, bad videos reported."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from loaders import build_loader
from shard_tools.make_ffcv import main as make_ffcv
from tests.test_loaders import batches, corrupt_copy

pytestmark = pytest.mark.ffcv


def _by_index(out):
    return {int(i): (b["frame_ids"][k], b["fast"][k], int(b["label"][k]))
            for b in out for k, i in enumerate(b["index"])}


def test_ffcv_and_pyav_agree_on_the_real_videos(h264_shards, real_beton):
    got = {}
    for backend, path in (("pyav", h264_shards), ("ffcv", real_beton)):
        _, out = batches(path, backend, train=False, crop_size=64, batch_size=3)
        got[backend] = _by_index(out)
    assert sorted(got["ffcv"]) == sorted(got["pyav"]) == list(range(5))
    for idx, (ids, clip, label) in got["pyav"].items():
        ids_f, clip_f, label_f = got["ffcv"][idx]
        assert torch.equal(ids, ids_f) and label == label_f
        diff = float((clip - clip_f).abs().mean())
        assert diff < 4.0, (idx, diff)  # JPEG (q90) + resampling tolerance, in 0..255 levels
        # and not trivially: another video's clip is far away
        other = got["ffcv"][(idx + 1) % 5][1]
        assert float((clip - other).abs().mean()) > 4 * diff


def test_ffcv_training_clips_follow_frame_ids_and_vary(real_beton):
    loader = build_loader(str(real_beton), backend="ffcv", batch_size=5, device="cpu", crop_size=32,
                          num_workers=2, seed=1)
    starts = set()
    for epoch in range(3):
        loader.set_epoch(epoch)
        (b,) = list(loader)
        assert sorted(b["index"].tolist()) == list(range(5))
        assert torch.equal(b["slow"], b["fast"][:, :, ::2])
        starts |= {(int(i), int(f)) for i, f in zip(b["index"], b["frame_ids"][:, 0])}
    assert len(starts) > 6  # windows are redrawn every epoch
    again = build_loader(str(real_beton), backend="ffcv", batch_size=5, device="cpu", crop_size=32,
                         num_workers=1, seed=1)
    again.set_epoch(2)
    (c,) = list(again)
    assert torch.equal(b["fast"], c["fast"]) and torch.equal(b["frame_ids"], c["frame_ids"])  # any thread count


def test_os_cache_and_orders(real_beton):
    seen = {}
    for order, os_cache in (("random", True), ("sequential", False), ("quasi_random", False)):
        loader = build_loader(str(real_beton), backend="ffcv", batch_size=2, device="cpu", crop_size=32,
                              num_workers=1, os_cache=os_cache, order=order)
        seen[order] = [i for b in loader for i in b["index"].tolist()]
        assert sorted(seen[order]) == list(range(5))
    assert seen["sequential"] == list(range(5))
    with pytest.raises(ValueError, match="QUASI_RANDOM needs os_cache=False"):
        build_loader(str(real_beton), backend="ffcv", batch_size=2, device="cpu", os_cache=True, order="quasi_random")
    with pytest.raises(ValueError, match="not supported"):
        build_loader(str(real_beton), backend="ffcv", batch_size=2, device="cpu", train=False, num_clips=5)


def test_not_a_beton_is_a_clear_error(tmp_path, h264_shards):
    bogus = tmp_path / "x.beton"
    bogus.write_bytes(b"nope" * 10)
    with pytest.raises(FileNotFoundError, match="x.beton"):
        build_loader(str(bogus), backend="ffcv", batch_size=1, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.beton"):
        build_loader(str(tmp_path / "missing.beton"), backend="ffcv", batch_size=1, device="cpu")


def test_make_ffcv_reports_a_corrupt_shard_member(h264_shards, tmp_path):
    bad = tmp_path / "bad"
    victim = corrupt_copy(h264_shards, bad, "mp4")
    out = tmp_path / "out" / "bad.beton"
    assert make_ffcv([str(bad), str(out), "--quiet", "--workers", "0"]) == 3
    failed = [json.loads(line) for line in (tmp_path / "out" / "bad.failed.jsonl").read_text().splitlines()]
    assert [f["key"] for f in failed] == [victim] and failed[0]["reason"] and failed[0]["source"]
    loader = build_loader(str(out), backend="ffcv", batch_size=8, device="cpu", crop_size=32, train=False,
                          num_workers=1)
    idx = [i for b in loader for i in b["index"].tolist()]
    assert len(idx) == 4 and len(set(idx)) == 4 and set(idx) < set(range(5))
    assert loader.num_videos == max(idx) + 1  # bank rows are the manifest's positions


def test_make_ffcv_from_videos_reports_bad_ones(videos, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    shutil.copy(videos / "part_0.mp4", src / "a" / "part_0.mp4")
    shutil.copy(videos / "test.avi", src / "b" / "test.avi")
    (src / "b" / "broken.mp4").write_bytes((videos / "demo.mp4").read_bytes()[:4000])
    out = tmp_path / "o.beton"
    assert make_ffcv([str(src), str(out), "--quiet", "--workers", "1", "--short-side", "64", "--fps", "15"]) == 3
    failed = [json.loads(line) for line in (tmp_path / "o.failed.jsonl").read_text().splitlines()]
    assert len(failed) == 1 and failed[0]["source"].endswith("broken.mp4") and "corrupt" in failed[0]["reason"]
    assert "broken.mp4" in capsys.readouterr().err
    assert not (tmp_path / "o.beton.shards").exists()
    loader = build_loader(str(out), backend="ffcv", batch_size=4, device="cpu", crop_size=32, train=False,
                          num_workers=1)
    (b,) = list(loader)
    assert sorted(b["label"].tolist()) == [0, 1] and b["fast"].shape == (2, 3, 16, 32, 32)
    from ffcv.reader import Reader

    from loaders.ffcv import FIELDS
    meta = Reader(str(out), FIELDS).metadata["f0"]
    assert sorted(meta["height"].tolist()) == [64, 64] and set(meta["fps"].tolist()) == {15.0}


def test_make_ffcv_usage_errors(tmp_path, h264_shards):
    assert make_ffcv([str(h264_shards), str(tmp_path / "x.beton"), "--quality", "0"]) == 2
    assert make_ffcv([str(h264_shards), str(tmp_path / "x.ffcv")]) == 2
    assert make_ffcv([str(tmp_path / "nothing"), str(tmp_path / "x.beton")]) == 2
    assert make_ffcv([str(h264_shards), str(tmp_path / "x.beton"), "--fps", "10"]) == 2  # shards are packed already
    assert not (tmp_path / "x.beton").exists()
