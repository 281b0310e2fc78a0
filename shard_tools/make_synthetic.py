"""A synthetic "tempo" action dataset: real video files made from scratch, then sharded.

    python -m shard_tools.make_synthetic OUT --num-videos 480 --classes 8 --seed 0 [--vp9]
    python -m shard_tools.make_synthetic OUT --task ava|epic   (long videos: shard_tools.synthetic_tasks)

Each class is an actor family (the shape and texture of the moving object)
combined with a motion pattern (direction, speed, periodicity, pace). Per
video the nuisance varies: colours, a textured background, the actor's size,
start position, a speed jitter, and distractor objects drifting slowly.
Videos are written as H.264 (``--vp9`` for VP9) MP4/WebM files under
``OUT/videos/<class>/``, then packed by make_shards into ``OUT/train`` and
``OUT/val`` (``--val-fraction``), each with a manifest.

The actor family alone decides half of the class: appearance can solve part
of the task, motion the rest. A probe on single frames (no motion) measures
how much appearance alone gives.
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from shard_tools.transcode import x264_params
from vthcl import options

CLI = options.command(
    "shard_tools.make_synthetic", __doc__, ["num_videos", options.SYNTHETIC, "short_side", "seed", "workers"],
    positionals=[options.Positional("out", "the folder to write: OUT/videos, OUT/train and OUT/val", "OUT")],
    recipe={"num_videos": 480, "short_side": 64})

FAMILIES = ["disc", "box", "ring", "cross"]
MOTIONS = [
    # name, direction (radians), speed (px/frame at 64 px), kind
    ("slide_right", 0.0, 0.9, "linear"),
    ("slide_up", -math.pi / 2, 0.9, "linear"),
    ("swing_fast", 0.0, 2.4, "oscillate"),
    ("orbit", 0.0, 0.12, "circle"),
    ("swing_slow", math.pi / 2, 0.8, "oscillate"),
    ("hop", 0.0, 0.0, "bounce"),
]


def class_names(num_classes: int) -> list[str]:
    """Family x motion pairs, staggered: the first 8 use each family with two
    motions and most motions with two families, so neither alone names a class."""
    pairs = [(FAMILIES[i], MOTIONS[(i + k) % len(MOTIONS)][0])
             for k in range(len(MOTIONS)) for i in range(len(FAMILIES))]
    if num_classes > len(pairs):
        raise options.UsageError(f"at most {len(pairs)} classes ({len(FAMILIES)} families x {len(MOTIONS)} motions)")
    return [f"{f}_{m}" for f, m in pairs[:num_classes]]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour texture, [size, size, 3] float 0..1."""
    coarse = rng.random((size // 8 + 2, size // 8 + 2, 3))
    y = np.linspace(0, coarse.shape[0] - 1.001, size)
    x = np.linspace(0, coarse.shape[1] - 1.001, size)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    c = coarse
    tex = ((1 - fy) * (1 - fx) * c[y0][:, x0] + fy * (1 - fx) * c[y0 + 1][:, x0]
           + (1 - fy) * fx * c[y0][:, x0 + 1] + fy * fx * c[y0 + 1][:, x0 + 1])
    return tex


def _mask(family: str, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    if family == "disc":
        return dy ** 2 + dx ** 2 <= r ** 2
    if family == "box":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if family == "ring":
        d = np.sqrt(dy ** 2 + dx ** 2)
        return (d <= r) & (d >= r * 0.55)
    return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))


def _position(kind: str, angle: float, speed: float, t: float, start, size: int, phase: float):
    cy, cx = start
    if kind == "linear":
        cy, cx = cy + math.sin(angle) * speed * t, cx + math.cos(angle) * speed * t
    elif kind == "oscillate":
        amp = size * 0.28
        s = math.sin(speed * t / amp + phase) * amp
        cy, cx = cy + math.sin(angle) * s, cx + math.cos(angle) * s
    elif kind == "circle":
        rad = size * 0.22
        cy, cx = cy + rad * math.sin(speed * t + phase), cx + rad * math.cos(speed * t + phase)
    else:  # bounce: a periodic hop
        cy = cy - abs(math.sin(0.16 * t + phase)) * size * 0.35
    return cy % size, cx % size  # wrap around the frame


def render(cls: str, seed: int, num_frames: int = 96, size: int = 96, with_mask: bool = False):
    """uint8 [num_frames, size, size, 3] for one video of class ``cls``; with
    ``with_mask`` also the actor's bool mask [num_frames, size, size] (where
    the moving object is, for scoring Instance Correspondence Maps)."""
    family, motion = cls.split("_", 1)
    _, angle, speed, kind = next(m for m in MOTIONS if m[0] == motion)
    rng = np.random.default_rng(seed)
    scale = size / 64
    speed *= scale * rng.uniform(0.8, 1.25) if kind != "circle" else rng.uniform(0.8, 1.25)
    bg = _texture(rng, size) * rng.uniform(0.3, 0.8) + rng.random(3) * 0.3
    actor_tex = _texture(rng, size) * 0.4 + rng.random(3) * 0.6
    r = rng.uniform(6, 11) * scale
    start = (rng.uniform(0.25, 0.75) * size, rng.uniform(0.25, 0.75) * size)
    phase = rng.uniform(0, 2 * math.pi)
    distractors = [(rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 6) * scale, rng.random(3),
                    rng.uniform(-0.2, 0.2, 2)) for _ in range(int(rng.integers(1, 4)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    masks = np.empty((num_frames, size, size), bool)
    for t in range(num_frames):
        img = bg.copy()
        for dy0, dx0, dr, col, vel in distractors:
            m = _mask("box", yy, xx, (dy0 + vel[0] * t) % size, (dx0 + vel[1] * t) % size, dr)
            img[m] = col
        cy, cx = _position(kind, angle, speed, t, start, size, phase)
        m = _mask(family, yy, xx, cy, cx, r)
        img[m] = actor_tex[m]
        masks[t] = m
        frames[t] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return (frames, masks) if with_mask else frames


def write_video(path: Path, frames: np.ndarray, fps: int = 30, vp9: bool = False) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9" if vp9 else "libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"} if vp9 else \
            {"crf": "20", "preset": "veryfast", "x264-params": x264_params()}
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _make_one(job) -> str:
    path, cls, seed, frames, size, vp9 = job
    write_video(Path(path), render(cls, seed, frames, size), vp9=vp9)
    return path


def make(out: Path, videos: int | None = None, classes: int = 8, seed: int = 0, vp9: bool = False,
         frames: int = 96, size: int | None = None, val_fraction: float = 0.25, workers: int | None = None,
         short_side: int = 64, quiet: bool = True, task: str = "tempo", pack: bool = True,
         val_videos: int | None = None, duration: float | None = None, fps: int | None = None,
         width: int | None = None, participants: int | None = None, epic_columns: int = 100) -> dict:
    """Write the videos, then pack OUT/train and OUT/val. Returns their manifest paths.

    ``task`` "tempo" (the default) makes ``videos`` short clips (480 by
    default) of ``classes`` classes; "ava" and "epic" make long videos with
    AVA or EPIC-Kitchens annotations (:mod:`shard_tools.synthetic_tasks`):
    ``videos`` train and ``val_videos`` val videos (per participant for
    epic) of ``duration`` seconds at ``fps``, ``size`` pixels high and
    ``width`` wide. With ``pack`` false nothing is packed and the paths
    returned are those of the annotation files make_shards would read."""
    if task in ("ava", "epic"):
        from shard_tools.synthetic_tasks import make_task
        if vp9:
            raise options.UsageError(f"vp9: the {task} videos are written as H.264 only")
        return make_task(task, Path(out), seed, videos, val_videos, duration, fps, size, width, participants,
                         epic_columns, workers, short_side, quiet, pack)
    if task != "tempo":
        raise options.UsageError(f"task {task!r}: tempo, ava or epic")
    given = {"val_videos": val_videos, "duration": duration, "fps": fps, "width": width,
             "participants": participants}
    if any(v is not None for v in given.values()):
        named = ", ".join(k for k, v in given.items() if v is not None)
        raise options.UsageError(f"{named}: only for --task ava or epic")
    videos = 480 if videos is None else videos
    size = 96 if size is None else size
    from loaders.system import cores
    from shard_tools.make_shards import pack as make_shards
    names = class_names(classes)
    ext = "webm" if vp9 else "mp4"
    rng = np.random.default_rng(seed)
    jobs, rows = [], {"train": [], "val": []}
    for i in range(videos):
        cls = names[i % classes]
        rel = f"{cls}/{cls}_{i:05d}.{ext}"
        (out / "videos" / cls).mkdir(parents=True, exist_ok=True)
        jobs.append((str(out / "videos" / rel), cls, int(rng.integers(0, 2 ** 31)), frames, size, vp9))
        split = "val" if (i // classes) % round(1 / val_fraction) == 0 else "train"
        rows[split].append((rel, cls))
    workers = workers or cores()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_make_one, jobs, chunksize=4)
    result = {}
    for split, items in rows.items():
        ann = out / f"{split}.csv"
        with open(ann, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(items)
        if not pack:
            result[split] = str(ann)
            continue
        made = make_shards(out / "videos", out / split, annotations=str(ann), prefix=split, short_side=short_side,
                           samples_per_shard=64, seed=seed, workers=workers, quiet=quiet,
                           codec="vp9" if vp9 else "h264", resume=(out / split / "manifest.json").exists())
        if made["failed"]:
            raise options.JobError(f"make_shards could not pack {made['failed']} of the videos for {split} "
                                   f"(see {made['failed_path']})")
        result[split] = str(out / split / "manifest.json")
    return result


def _job(cfg: options.Config) -> None:
    videos = cfg.num_videos if cfg.task == "tempo" or "num_videos" in cfg.given else None
    paths = make(Path(cfg.out), videos, cfg.classes, cfg.seed, cfg.vp9, cfg.frames, cfg.size, cfg.val_fraction,
                 cfg.workers, cfg.short_side, quiet=cfg.quiet, task=cfg.task, pack=cfg.pack,
                 val_videos=cfg.val_videos, duration=cfg.duration, fps=cfg.video_fps, width=cfg.frame_width,
                 participants=cfg.participants, epic_columns=cfg.epic_columns)
    for split, path in paths.items():
        print(f"{split}: {path}")


def main(argv=None) -> int:
    return options.cli("shard_tools.make_synthetic", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
