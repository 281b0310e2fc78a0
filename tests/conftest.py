"""Shared fixtures: trees of the real videos in tests/data/videos and their shards."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import media

REPO = Path(__file__).resolve().parents[1]
VIDEOS = Path(os.environ.get("VTHCL_TEST_VIDEOS", REPO / "tests" / "data" / "videos"))
REAL = ["demo.mp4", "test.mp4", "test.avi", "part_0.mp4", "S001C001P001R001A001_rgb.avi"]


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=NPROC ARGS`` on CPU processes (gloo, one thread each,
    a free port), from the repository; fails the test with the tail of stderr unless it exits 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def pytest_collection_modifyitems(config, items):
    """The FFCV tests skip themselves, saying why, where the ffcv extra is not installed (it builds only
    where pkg-config finds OpenCV and libjpeg-turbo: see the README)."""
    if importlib.util.find_spec("ffcv") is not None:
        return
    skip = pytest.mark.skip(reason="FFCV is not installed: the ffcv extra needs OpenCV and libjpeg-turbo found by "
                                   "pkg-config (README, Set-up); ./run installs it where they are")
    for item in items:
        if "ffcv" in item.keywords:
            item.add_marker(skip)


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


def _pack(tree: Path, out: Path, **options) -> Path:
    from shard_tools.make_shards import pack
    made = pack(tree, out, quiet=True, workers=2, **options)
    assert made["failed"] == 0, f"make_shards failed on {made['failed']} input(s) (see {made['failed_path']})"
    return out


def _shards(tree: str, name: str, **options):
    """A session fixture: the tree fixture ``tree`` packed with make_shards ``options``."""
    @pytest.fixture(scope="session")
    def fixture(request, tmp_path_factory) -> Path:
        return _pack(request.getfixturevalue(tree), tmp_path_factory.mktemp(name), **options)
    return fixture


h264_shards = _shards("real_tree", "h264", short_side=128, samples_per_shard=2)
vp9_shards = _shards("real_tree", "vp9", short_side=128, samples_per_shard=2, codec="vp9")
coded_h264 = _shards("coded_tree", "coded_h264", short_side=64, crf=0)
coded_h264_lossy = _shards("coded_tree", "coded_h264_lossy", short_side=64, crf=10)  # NVDEC-decodable
coded_vp9 = _shards("coded_tree", "coded_vp9", short_side=64, codec="vp9", crf=0)


def _beton(shards: str, name: str, **options):
    """A session fixture: the shards fixture ``shards`` converted by make_ffcv."""
    @pytest.fixture(scope="session")
    def fixture(request, tmp_path_factory) -> Path:
        from shard_tools.make_ffcv import make
        out = tmp_path_factory.mktemp(name) / f"{name}.beton"
        done = make(request.getfixturevalue(shards), out, quiet=True, workers=2, **options)
        assert done["written"] and not done["failed"], done
        return out
    return fixture


real_beton = _beton("h264_shards", "real")
coded_beton = _beton("coded_h264", "coded", quality=95)


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


@pytest.fixture(scope="session")
def long_coded_tree(tmp_path_factory) -> Path:
    """Frame-number-coded videos longer than a window (610, 700 frames: windows far from
    frame 0) and one shorter (40: looped), lossless; up to 1023 frames are coded."""
    root = tmp_path_factory.mktemp("long_coded")
    (root / "long").mkdir()
    for n in (610, 700, 40):
        media.write_coded_video(root / "long" / f"long_{n}.mkv", n, height=64, width=96, long=True)
    return root


long_vp9 = _shards("long_coded_tree", "long_vp9", short_side=64, codec="vp9", crf=4)
long_h264 = _shards("long_coded_tree", "long_h264", short_side=64, crf=10)  # NVDEC-decodable


def old_format_copy(src: Path, dst: Path) -> Path:
    """The shards ``src`` as make_shards wrote them before fragment tables:
    each video member re-muxed into a plain (unfragmented) file — WebM for
    VP9, MP4 for H.264 — and no KEY.frag_bytes / KEY.frag_frames."""
    import io
    import tarfile

    import av

    from shard_tools.wds_index import write_index
    dst.mkdir(parents=True)
    for tar in sorted(src.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = [(m, t.extractfile(m).read()) for m in t]
        with tarfile.open(dst / tar.name, "w") as t:
            for m, data in members:
                key, ext = m.name.split(".", 1)
                if ext in ("frag_bytes", "frag_frames"):
                    continue
                if ext == "mp4":
                    with av.open(io.BytesIO(data)) as c:
                        s = c.streams.video[0]
                        fmt = "webm" if s.codec_context.name == "vp9" else "mp4"
                        buf = io.BytesIO()
                        with av.open(buf, "w", format=fmt) as out:
                            o = out.add_stream_from_template(s)
                            for p in c.demux(s):
                                if p.size:
                                    p.stream = o
                                    out.mux(p)
                    data = buf.getvalue()
                    m.name = f"{key}.{fmt}"
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))
        write_index(str(dst / tar.name), str(dst / tar.with_suffix(".idx").name))
    import json
    manifest = json.loads((src / "manifest.json").read_text())
    manifest.pop("member_format")  # (the manifests of that time named no member format and no compact index)
    manifest.pop("index_file")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="session")
def old_long_vp9(long_vp9, tmp_path_factory) -> Path:
    return old_format_copy(long_vp9, tmp_path_factory.mktemp("old") / "shards")


@pytest.fixture(scope="session")
def many_tree(tmp_path_factory) -> Path:
    """21 tiny frame-number-coded videos (20 to 40 frames): more videos than 16 ranks."""
    root = tmp_path_factory.mktemp("many")
    (root / "c").mkdir()
    for i in range(21):
        media.write_coded_video(root / "c" / f"v{i:02d}.mkv", 20 + i, height=32, width=48)
    return root


many_vp9 = _shards("many_tree", "many_vp9", short_side=32, codec="vp9", samples_per_shard=4)
many_beton = _beton("many_vp9", "many")
