"""The decode suite's long-video stage: a 15-minute 256p video packed once, keyframe clips from it.

What AVA needs from a loader, measured side by side in one run:

* the same 15-minute video (the first real video played forwards and
  backwards to 27,000 frames at 30 fps, 256p; ``--quick``: 2 minutes)
  packed by make_shards as an AVA event dataset (``--layout ava
  --time-offset 900``, a keyframe every second, as AVA's annotations have
  them): one member, whole;
* the clip cost at the start of the video against its end: the keyframe
  windows of the first half of the keyframes against those of the second
  half (a loader's rank 0 and rank 1 of 2 read exactly those), for the pyav
  backend (H.264 shards) and the dali backend (VP9 on a CPU, whose decoder
  reads only VP8/VP9; H.264 on cuda) — goal: end/start >= 0.8;
* the bytes a clip reads from the tar (the loader's ``stats.bytes_read``)
  against the member's size;
* the PySlowFast way: the same video as a folder of JPEG frames at 30 fps
  (``{video}/{video}_{frame:06d}.jpg``, as PySlowFast's AVA scripts extract
  them with ``ffmpeg -q:v 1``; here PyAV's MJPEG encoder with its quantiser
  held at 1, ``qmin=qmax=1``) and a DataLoader that reads a keyframe clip's
  16 JPEGs (Pillow) — bytes on disk (goal: shards <= 1/5 of the frames) and
  clips/s beside the pyav workers' on the same windows, the same workers
  (goal on a CPU: >= 1x).

Every rate is of uint8 clips as workers hand them over (the pyav backend's
``clips()``; DALI's whole pipeline), evaluation windows (the whole frame at
its short side 256: no resize on either side).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import av
import numpy as np
import torch

from benchmarks.common import lengthened
from loaders import build_loader
from loaders.sampling import ClipInfo, ClipSpec, KeyframeClips
from vthcl.options import JobError

FPS = 30
ORIGIN = 900  # the video is movie seconds 900.. as AVA's 15-minute cuts are


def long_video(videos: Path, tmp: Path, seconds: int) -> Path:
    """The first real video played to ``seconds`` at 30 fps, 256p, as ``ava_long/ava_long.mp4``."""
    (made,) = lengthened(videos, tmp / "ava_long_src", seconds * FPS, first=1)
    folder = tmp / "ava_long"
    folder.mkdir(exist_ok=True)
    path = folder / "ava_long.mp4"
    if not path.exists():
        os.symlink(made.resolve(), path)
    return path


def keyframes(seconds: int) -> list[int]:
    """AVA's keyframes of a video of ``seconds``: every second but the first and last two."""
    return list(range(ORIGIN + 2, ORIGIN + seconds - 1))


def pack_events(video: Path, tmp: Path, codec: str, seconds: int, workers: int | None) -> Path:
    """``video`` as an AVA event dataset (one box per keyframe), packed with ``codec``."""
    from shard_tools.make_shards import pack
    csv = tmp / "ava_long.csv"
    csv.write_text("".join(f"{video.stem},{s:04d},0.25,0.25,0.75,0.75,1,0\n" for s in keyframes(seconds)))
    out = tmp / f"ava_long_{codec}"
    made = pack(video.parent, out, quiet=True, layout="ava", annotations=str(csv), time_offset=ORIGIN, codec=codec,
                workers=workers, resume=out.exists())
    if made["failed"]:
        raise JobError(f"packing the long video failed (see {made['failed_path']})")
    return out


def jpeg_frames(video: Path, dest: Path) -> int:
    """The video as JPEG frames at its 30 fps, PySlowFast's layout; returns the bytes on disk."""
    folder = dest / video.stem
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    with av.open(str(video)) as c:
        stream = c.streams.video[0]
        enc = av.CodecContext.create("mjpeg", "w")
        enc.width, enc.height, enc.pix_fmt = stream.codec_context.width, stream.codec_context.height, "yuvj420p"
        enc.time_base = stream.time_base or 1 / FPS
        enc.options = {"qmin": "1", "qmax": "1"}  # ffmpeg -q:v 1: the quantiser at its finest
        for k, frame in enumerate(c.decode(stream), start=1):
            path = folder / f"{video.stem}_{k:06d}.jpg"
            if not path.exists():
                (packet,) = enc.encode(frame.reformat(format="yuvj420p"))
                path.write_bytes(bytes(packet))
            total += path.stat().st_size
    return total


class _JpegClips(torch.utils.data.Dataset):
    """A keyframe clip's 16 fast frames read from the JPEG folder (PySlowFast's AVA loading):
    the same frame ids as the loaders', uint8 [3, 16, H, W]."""

    def __init__(self, folder: Path, secs: list[int], num_frames: int):
        self.folder, self.secs, self.num_frames = folder, secs, num_frames
        self.sampler = KeyframeClips(ClipSpec(), 224, train=False)

    def __len__(self):
        return len(self.secs)

    def __getitem__(self, i):
        from PIL import Image
        info = ClipInfo(self.num_frames, 256, 256, FPS, ORIGIN, float(self.secs[i]))
        (ids, _), = self.sampler.windows(info, None)
        frames = [np.asarray(Image.open(self.folder / f"{self.folder.name}_{k + 1:06d}.jpg").convert("RGB"))
                  for k in ids]
        return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)


def rate_jpeg(folder: Path, secs: list[int], num_frames: int, workers: int, max_seconds: float) -> float:
    loader = torch.utils.data.DataLoader(_JpegClips(folder, secs, num_frames), batch_size=None,
                                         num_workers=workers, worker_init_fn=lambda _: torch.set_num_threads(1))
    clips, t = 0, time.perf_counter()
    for _ in loader:
        clips += 1
        if time.perf_counter() - t > max_seconds:
            break
    return clips / (time.perf_counter() - t)


def rate_events(shards: Path, backend: str, half: int, device: str, workers: int, max_seconds: float,
                batch: int = 8) -> tuple[float, float]:
    """clips/s of the keyframe clips of one half of the video (rank ``half`` of 2) and the bytes a
    clip read from the tar."""
    loader = build_loader(str(shards), backend=backend, batch_size=batch, train=False, device=device,
                          rank=half, world_size=2, num_workers=workers, normalize=False)
    clips, read, t = 0, 0, time.perf_counter()
    if backend == "pyav":  # the workers' clips: each says what it read
        items = ((1, c.get("bytes_read", 0)) for c in loader.clips() if "__skip__" not in c)
    else:
        items = ((b["fast"].shape[0], 0) for b in loader)
    for n, nbytes in items:
        clips, read = clips + n, read + nbytes
        if time.perf_counter() - t > max_seconds:
            break
    rate = clips / (time.perf_counter() - t)
    return rate, (read if backend == "pyav" else loader.stats.bytes_read) / max(1, clips)


def shard_bytes(shards: Path) -> int:
    return sum(p.stat().st_size for p in shards.glob("*.tar"))


def member_size(shards: Path) -> int:
    """The long video's member in its shard, in bytes."""
    import tarfile
    with tarfile.open(next(shards.glob("*.tar"))) as t:
        return next(m.size for m in t if m.name.endswith(".mp4"))
