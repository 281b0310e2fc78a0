"""Shared fixtures: trees of the real videos in ../shared/data/videos and their shards."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests import media

REPO = Path(__file__).resolve().parents[1]
VIDEOS = Path(os.environ.get("VTHCL_TEST_VIDEOS", REPO.parent / "shared" / "data" / "videos"))
REAL = ["demo.mp4", "test.mp4", "test.avi", "part_0.mp4", "S001C001P001R001A001_rgb.avi"]


@pytest.fixture(scope="session")
def videos() -> Path:
    if not all((VIDEOS / name).exists() for name in REAL):
        pytest.fail(f"the real test videos are not in {VIDEOS} (set VTHCL_TEST_VIDEOS)")
    return VIDEOS


@pytest.fixture(scope="session")
def real_tree(videos, tmp_path_factory) -> Path:
    """SRC/<class>/<video>: the five real videos in two classes."""
    root = tmp_path_factory.mktemp("real_tree")
    for cls, names in {"arm wrestling": REAL[:2], "other": REAL[2:]}.items():
        (root / cls).mkdir()
        for name in names:
            shutil.copy(videos / name, root / cls / name)
    return root


def _pack(tree: Path, out: Path, *args: str) -> Path:
    from shard_tools.make_shards import main
    rc = main([str(tree), str(out), "--quiet", "--workers", "2", *args])
    assert rc == 0, f"make_shards exited {rc}"
    return out


def _shards(tree: str, name: str, *args: str):
    """A session fixture: the tree fixture ``tree`` packed with make_shards ``args``."""
    @pytest.fixture(scope="session")
    def fixture(request, tmp_path_factory) -> Path:
        return _pack(request.getfixturevalue(tree), tmp_path_factory.mktemp(name), *args)
    return fixture


h264_shards = _shards("real_tree", "h264", "--short-side", "128", "--samples-per-shard", "2")
vp9_shards = _shards("real_tree", "vp9", "--short-side", "128", "--samples-per-shard", "2", "--codec", "vp9")
coded_h264 = _shards("coded_tree", "coded_h264", "--short-side", "64", "--crf", "0")
coded_h264_lossy = _shards("coded_tree", "coded_h264_lossy", "--short-side", "64", "--crf", "10")  # NVDEC-decodable
coded_vp9 = _shards("coded_tree", "coded_vp9", "--short-side", "64", "--codec", "vp9", "--crf", "0")


def _beton(shards: str, name: str, *args: str):
    """A session fixture: the shards fixture ``shards`` converted by make_ffcv."""
    @pytest.fixture(scope="session")
    def fixture(request, tmp_path_factory) -> Path:
        from shard_tools.make_ffcv import main
        out = tmp_path_factory.mktemp(name) / f"{name}.beton"
        rc = main([str(request.getfixturevalue(shards)), str(out), "--quiet", "--workers", "2", *args])
        assert rc == 0, f"make_ffcv exited {rc}"
        return out
    return fixture


real_beton = _beton("h264_shards", "real")
coded_beton = _beton("coded_h264", "coded", "--quality", "95")


@pytest.fixture(scope="session")
def coded_tree(tmp_path_factory) -> Path:
    """Frame-number-coded videos (brightness codes the frame number), lossless."""
    root = tmp_path_factory.mktemp("coded")
    (root / "long").mkdir()
    (root / "short").mkdir()
    media.write_coded_video(root / "long" / "coded_150.mkv", 150)
    media.write_coded_video(root / "long" / "coded_90.mkv", 90)
    media.write_coded_video(root / "short" / "coded_40.mkv", 40)
    return root
