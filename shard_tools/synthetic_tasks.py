"""Synthetic long videos with annotations in the AVA and EPIC-Kitchens formats.

    python -m shard_tools.make_synthetic OUT --task ava
    python -m shard_tools.make_synthetic OUT --task epic [--epic-columns 55|100]

Both reuse the "tempo" renderer's pieces (:func:`make_synthetic._texture`,
:func:`make_synthetic._mask`, :func:`make_synthetic.write_video`): sprites of
the actor families with a random texture, colour and size, drawn with a
position and a rotation per frame over a textured background.

AVA (action detection, ``--task ava``)
--------------------------------------
Each video holds 2-3 actors; every few seconds each one takes up another of
six motion-defined actions: 1 stand (still), 2 walk left, 3 walk right, 4 jump
(vertical hops), 5 spin (rotation in place, either way), 6 wave (a fast
side-to-side swing in place). A single frame cannot tell them apart (a jump's
frame is an actor at another height, a spin's an actor at another angle): the
action is in the motion. Id 7, "near another actor", co-occurs with the
action while an actor's centre is within 1.5 times the two radii of another
one's, so a box can carry two ids. The files are those of PySlowFast's
15-minute cuts: the video's t=0 is movie second 900, the keyframes are the
seconds 902 .. 900 + duration - 2 (written ``0902``) at frame
``(sec - 900) * fps``, so make_shards packs them with ``--time-offset 900``.
A keyframe's box of an actor is the bounding box of the actor's whole mask in
that frame (drawn in full, even where another actor covers part of it). The
proposals are made like a person detector's: every true box jittered (IoU >=
0.7 before rounding) with a score in [0.85, 1), and 0-2 false positives per
keyframe (IoU < 0.3 with every true box) with scores in [0.3, 0.85), so a
threshold of 0.8 as PySlowFast's configs use keeps some of them.

EPIC-Kitchens (action anticipation, ``--task epic``)
----------------------------------------------------
A table (the textured background) holds N objects (the nouns, 4 by default:
jar, pan, cup, bowl, ...) at fixed places on an ellipse, the same places in
every video; their shape, texture, colour and size are drawn per video, so
a noun is known by its place, not its look. One actor (the "hand") performs
actions back to back: it travels to an object in the gap between two
actions (0.3-0.7 s), then moves it for 2.4-3.6 s with one of four verbs,
each a periodic motion with a random phase that fades in and out over 0.25
s, after which the object is back at rest:

========  ==============================================================
open      turns the object: a fast anticlockwise stroke, a slow return
close     the same turn played backwards: fast clockwise, slow return
shake     swings it side to side fast (2.5 Hz)
wash      swings it side to side slowly (0.8 Hz), with the same amplitude
========  ==============================================================

The grammar: with probability ``rule_prob`` (0.9 by default) the next action
is the successor of the current one (otherwise any other action, uniformly)::

    open  X  ->  shake X+1        shake X  ->  close X+1
    close X  ->  wash  X-1        wash  X  ->  open  X

(X+1 is the next place round the ellipse.) The successors form one cycle
through all 4 N (verb, noun) pairs. What comes next depends on the current
verb's direction (open vs close) or speed (shake vs wash), which only the
motion shows: time reversal maps open onto close and a change of speed maps
shake onto wash, and with a uniform phase a single frame of either member of
a pair has the same distribution. A single frame shows the object being
acted on and whether it is turned or swung, which leaves two next actions,
differing in verb and noun; 1 s of motion tells them apart. Anticipating 1 s
ahead from 1 s of observation sees only the current action: the observed
second ends 0.3-0.7 s before the current action does (the gap is shorter than
1 s) and starts at least 0.7 s after it began (an action lasts at least 2.4
s), and the travel to the next object happens in the gap, unobserved.

The annotations are written in both column sets from the same segments:
EPIC-55 (``EPIC_{train,val}_action_labels.csv``, uid, timestamps
``HH:MM:SS.ff``) and EPIC-100 (``EPIC_100_{train,validation}.csv``,
``narration_id`` ``P01_01_17``, a narration timestamp with three decimals).
Frame numbers assume 60 fps as in the released files (``max(1, int(60 t))``
for a start, ``int(60 t)`` for a stop) while the videos are written at
another rate (50 fps by default): address segments by timestamp. Videos are
split into train and val by video: each participant's last ``val_videos``.
"""
from __future__ import annotations

import csv
import logging
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shard_tools.make_synthetic import FAMILIES, _mask, _texture, write_video
from vthcl.ava_eval import iou
from vthcl.options import JobError, UsageError

log = logging.getLogger(__name__)

AVA_ACTIONS = ("stand", "walk left", "walk right", "jump", "spin", "wave")
AVA_NEAR = "near another actor"
AVA_TIME_OFFSET = 900  # the 15-minute cuts start at movie second 900

EPIC_VERBS = ("open", "close", "shake", "wash")
EPIC_NOUNS = ("jar", "pan", "cup", "bowl", "bottle", "plate")
EPIC55_HEADER = ["uid", "participant_id", "video_id", "narration", "start_timestamp", "stop_timestamp",
                 "start_frame", "stop_frame", "verb", "verb_class", "noun", "noun_class", "all_nouns",
                 "all_noun_classes"]
EPIC100_HEADER = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                  "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                  "noun_class", "all_nouns", "all_noun_classes"]
EPIC_LABEL_FPS = 60  # the frame numbers of the released files assume frames extracted at 60 fps

# the half-width of a sprite's drawing window in radii: a box's corner turned by 45 degrees reaches 1.2 r
_REACH = 1.25


# ----------------------------------------------------------------------------- sprites and scenes


@dataclass
class Sprite:
    """One drawn object: its look and its pose in every frame."""
    family: str
    radius: float
    texture: np.ndarray  # [T, T, 3] float32 in 0..1, centred on the sprite
    cy: np.ndarray  # [F] float centre row per frame
    cx: np.ndarray  # [F] float centre column per frame
    angle: np.ndarray  # [F] rotation in radians per frame


@dataclass
class Scene:
    """A video before rendering: a background and sprites drawn in order."""
    background: np.ndarray  # [H, W, 3] float32 in 0..1
    sprites: list[Sprite]
    fps: int

    @property
    def num_frames(self) -> int:
        return len(self.sprites[0].cy)

    @property
    def height(self) -> int:
        return self.background.shape[0]

    @property
    def width(self) -> int:
        return self.background.shape[1]


def _sprite(rng: np.random.Generator, radius: float, num_frames: int, family: str | None = None) -> Sprite:
    family = family or FAMILIES[int(rng.integers(len(FAMILIES)))]
    size = 2 * math.ceil(radius * _REACH) + 3
    # a strong texture, so that a turning disc or ring shows its rotation
    texture = (_texture(rng, size) * 0.7 + rng.random(3) * 0.3).astype(np.float32)
    zeros = np.zeros(num_frames, np.float64)
    return Sprite(family, float(radius), texture, zeros.copy(), zeros.copy(), zeros.copy())


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth, muted texture: a small one stretched to the frame (with
    blobs of about a third of the height), so that the actors stand out."""
    small = _texture(rng, 24)
    ys, xs = np.linspace(0, 23, height), np.linspace(0, 23 * width / max(height, width), width)
    y0, x0 = np.minimum(ys.astype(int), 22), np.minimum(xs.astype(int), 22)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    tex = ((1 - fy) * (1 - fx) * small[y0][:, x0] + fy * (1 - fx) * small[y0 + 1][:, x0]
           + (1 - fy) * fx * small[y0][:, x0 + 1] + fy * fx * small[y0 + 1][:, x0 + 1])
    grey = tex.mean(2, keepdims=True)
    tint = rng.uniform(0.25, 0.55) + rng.uniform(-0.08, 0.08, 3)
    return (tint + 0.35 * (grey - 0.5) + 0.15 * (tex - grey)).clip(0, 1).astype(np.float32)


def _footprint(sprite: Sprite, frame: int, height: int, width: int):
    """The sprite's mask in ``frame`` within its window clipped to the frame,
    ``(mask, y0, x0, texels)`` with the texture's colour of every mask pixel,
    or None where the window is outside the frame."""
    r, cy, cx, a = sprite.radius, sprite.cy[frame], sprite.cx[frame], sprite.angle[frame]
    reach = math.ceil(r * _REACH) + 1
    y0, y1 = max(0, math.floor(cy) - reach), min(height, math.floor(cy) + reach + 2)
    x0, x1 = max(0, math.floor(cx) - reach), min(width, math.floor(cx) + reach + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
    c, s = np.float32(math.cos(a)), np.float32(math.sin(a))
    u, v = c * dx + s * dy, c * dy - s * dx  # the window in the sprite's own (unrotated) frame
    mask = _mask(sprite.family, v, u, 0.0, 0.0, r)
    # every mask pixel lies within 1.2 radii of the centre, so inside the texture
    half = sprite.texture.shape[0] // 2
    texels = sprite.texture[np.rint(v[mask]).astype(np.intp) + half, np.rint(u[mask]).astype(np.intp) + half]
    return mask, y0, x0, texels


def sprite_box(scene: Scene, index: int, frame: int) -> tuple[int, int, int, int] | None:
    """Pixel extent ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of sprite
    ``index``'s whole mask in ``frame``, clipped to the frame; None if none of
    it is inside."""
    fp = _footprint(scene.sprites[index], frame, scene.height, scene.width)
    if fp is None or not fp[0].any():
        return None
    mask, y0, x0 = fp[:3]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def render_frames(scene: Scene, frames=None, visible=None) -> np.ndarray:
    """uint8 [n, H, W, 3]: the frames ``frames`` (all by default) of the
    scene, drawing only the sprites whose index is in ``visible`` (all by
    default)."""
    frames = range(scene.num_frames) if frames is None else list(frames)
    out = np.empty((len(frames), scene.height, scene.width, 3), np.uint8)
    drawn = [i for i in range(len(scene.sprites)) if visible is None or i in visible]
    cache = {}  # sprite -> (pose, footprint): a sprite at rest keeps its footprint
    for k, f in enumerate(frames):
        img = scene.background.copy()
        for i in drawn:
            sprite = scene.sprites[i]
            pose = (sprite.cy[f], sprite.cx[f], sprite.angle[f])
            if i not in cache or cache[i][0] != pose:
                cache[i] = pose, _footprint(sprite, f, scene.height, scene.width)
            fp = cache[i][1]
            if fp is not None:
                mask, y0, x0, texels = fp
                img[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = texels
        out[k] = (img * 255).astype(np.uint8)
    return out


def _envelope(t: np.ndarray, duration: float, ramp: float = 0.25) -> np.ndarray:
    """1 inside, fading to 0 over ``ramp`` seconds at both ends."""
    return np.clip(np.minimum(t, duration - t) / ramp, 0.0, 1.0)


def _pool_map(fn, jobs: list, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.map(fn, jobs, chunksize=1)


def video_seeds(seed: int, count: int) -> list[int]:
    """The seed of each of ``count`` videos made from ``seed``, in order."""
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2 ** 31, count)]


def _workers(workers: int | None) -> int:
    from loaders.system import cores
    return workers or cores()


def _check_size(height: int, width: int, fps: int, duration: float, least: float) -> None:
    if height < 48 or width < 48 or height % 2 or width % 2:
        raise UsageError(f"frame size {width}x{height}: each side must be even and at least 48 pixels")
    if int(fps) != fps or fps < 10:
        raise UsageError(f"fps {fps}: an integer frame rate of at least 10 is needed")
    if duration < least:
        raise UsageError(f"duration {duration} s: at least {least} s is needed")


# ----------------------------------------------------------------------------- AVA


def ava_label_map(near: bool = True) -> list[tuple[int, str]]:
    """``(id, name)`` of the evaluated classes: the actions 1..6, then 7 "near another actor"."""
    names = list(AVA_ACTIONS) + ([AVA_NEAR] if near else [])
    return [(i + 1, name) for i, name in enumerate(names)]


def ava_keyframes(duration: int) -> list[int]:
    """The keyframe seconds of a ``duration``-second cut, in movie time: 902 .. 900 + duration - 2."""
    return list(range(AVA_TIME_OFFSET + 2, AVA_TIME_OFFSET + int(duration) - 1))


@dataclass
class AvaVideo:
    scene: Scene
    actions: np.ndarray  # [actors, F] int: each actor's action id (1..6) in every frame


def ava_scene(seed: int, duration: int = 40, fps: int = 25, height: int = 96, width: int = 128,
              actors: int | None = None) -> AvaVideo:
    """One AVA-style video: 2-3 actors (``actors`` to fix the count), each
    changing its action every 2-5 s, kept inside the frame."""
    _check_size(height, width, fps, duration, 5)
    rng = np.random.default_rng(seed)
    num_frames = int(duration * fps)
    scale = height / 96
    count = int(actors if actors is not None else rng.integers(2, 4))
    background = _background(rng, height, width)
    hop, swing = 0.16 * height, 0.05 * width
    walk_speed = 12 * scale / fps  # pixels per frame
    sprites, actions = [], np.zeros((count, num_frames), np.int64)
    for a in range(count):
        sp = _sprite(rng, rng.uniform(7, 10) * scale, num_frames)
        edge = sp.radius * _REACH + 1
        lo_x, hi_x = edge + swing, width - edge - swing
        base_y = rng.uniform(edge + hop, height - edge)
        x, angle = rng.uniform(lo_x, hi_x), rng.uniform(0, 2 * math.pi)
        f, previous = 0, 0
        while f < num_frames:
            n = min(int(rng.uniform(2, 5) * fps), num_frames - f)
            room = {2: (x - lo_x) / walk_speed, 3: (hi_x - x) / walk_speed}  # frames of walking that fit
            choices = [k for k in range(1, 7) if k != previous and (k not in room or room[k] >= fps)]
            action = choices[int(rng.integers(len(choices)))]
            if action in room:
                n = min(n, int(room[action]))
            t = np.arange(n) / fps
            env = _envelope(t, n / fps, 0.2)
            xs, ys, angles = np.full(n, x), np.full(n, base_y), np.full(n, angle)
            if action in room:
                xs = x + (1 if action == 3 else -1) * walk_speed * np.arange(n)
                x = float(xs[-1])
            elif action == 4:
                ys = base_y - hop * np.abs(np.sin(math.pi * t / 0.8)) * env
            elif action == 5:
                angles = angle + rng.choice([-1.0, 1.0]) * math.pi * t
                angle = float(angles[-1])
            elif action == 6:
                xs = x + swing * np.sin(2 * math.pi * 2.0 * t) * env
            sp.cx[f:f + n], sp.cy[f:f + n], sp.angle[f:f + n] = xs, ys, angles
            actions[a, f:f + n] = action
            f, previous = f + n, action
        sprites.append(sp)
    return AvaVideo(Scene(background, sprites, int(fps)), actions)


def _near(scene: Scene, frame: int) -> list[bool]:
    sp = scene.sprites
    return [any(j != i and math.hypot(sp[i].cy[frame] - sp[j].cy[frame], sp[i].cx[frame] - sp[j].cx[frame])
                < 1.5 * (sp[i].radius + sp[j].radius) for j in range(len(sp))) for i in range(len(sp))]


def _fmt_box(box) -> list[str]:
    return [f"{v:.3f}" for v in box]


def ava_rows(video_id: str, video: AvaVideo, seed: int, duration: int, near: bool = True):
    """The ground-truth rows and the proposal rows of one video."""
    scene, rng = video.scene, np.random.default_rng([seed, 1])
    w, h = scene.width, scene.height
    gt, proposals = [], []
    for sec in ava_keyframes(duration):
        frame = (sec - AVA_TIME_OFFSET) * scene.fps
        near_flags = _near(scene, frame) if near else [False] * len(scene.sprites)
        boxes = []
        for person in range(len(scene.sprites)):
            px = sprite_box(scene, person, frame)
            if px is None:  # actors stay inside the frame; a bug if not
                raise RuntimeError(f"{video_id}: actor {person} is outside the frame at second {sec}")
            box = (px[0] / w, px[1] / h, px[2] / w, px[3] / h)
            boxes.append(box)
            ids = [int(video.actions[person, frame])] + ([len(AVA_ACTIONS) + 1] if near_flags[person] else [])
            gt += [[video_id, f"{sec:04d}", *_fmt_box(box), str(i), str(person)] for i in ids]
        for box in boxes:  # a detector's box for every person, a little off
            bw, bh = box[2] - box[0], box[3] - box[1]
            for _ in range(100):
                d = rng.normal(0, 0.06, 4) * np.array([bw, bh, bw, bh])
                jit = tuple(np.clip(np.array(box) + d, 0, 1))
                if jit[2] > jit[0] and jit[3] > jit[1] and iou(np.array([jit]), np.array([box]))[0, 0] >= 0.7:
                    break
            else:
                jit = box
            proposals.append([video_id, f"{sec:04d}", *_fmt_box(jit), "", f"{rng.uniform(0.85, 1.0):.6f}"])
        for _ in range(int(rng.integers(0, 3))):  # false positives, with lower scores
            for _ in range(20):
                bw, bh = rng.uniform(0.08, 0.25), rng.uniform(0.1, 0.3)
                x1, y1 = rng.uniform(0, 1 - bw), rng.uniform(0, 1 - bh)
                fp = (x1, y1, x1 + bw, y1 + bh)
                if (iou(np.array([fp]), np.array(boxes).reshape(-1, 4)) < 0.3).all():
                    proposals.append([video_id, f"{sec:04d}", *_fmt_box(fp), "", f"{rng.uniform(0.3, 0.85):.6f}"])
                    break
    return gt, proposals


def _ava_job(job):
    path, video_id, seed, duration, fps, height, width, near = job
    video = ava_scene(seed, duration, fps, height, width)
    write_video(Path(path), render_frames(video.scene), fps=fps)
    return ava_rows(video_id, video, seed, duration, near)


def _write_csv(path: Path, rows, header=None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(rows)


def make_ava(out: Path, seed: int = 0, train_videos: int = 6, val_videos: int = 3, duration: int = 40,
             fps: int = 25, height: int = 96, width: int = 128, near: bool = True,
             workers: int | None = None) -> dict:
    """Write ``OUT/videos/synAVA_NNN.mp4`` and the AVA v2.2 files; returns their paths by name."""
    _check_size(height, width, fps, duration, 5)
    if train_videos < 1 or val_videos < 1:
        raise UsageError("at least one train and one val video are needed")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    total = train_videos + val_videos
    seeds = video_seeds(seed, total)
    ids = [f"synAVA_{i:03d}" for i in range(total)]
    jobs = [(str(out / "videos" / f"{vid}.mp4"), vid, s, int(duration), int(fps), height, width, near)
            for vid, s in zip(ids, seeds)]
    results = _pool_map(_ava_job, jobs, _workers(workers))
    files = {}
    for split, part in (("train", slice(0, train_videos)), ("val", slice(train_videos, total))):
        gt = [row for r in results[part] for row in r[0]]
        props = [row for r in results[part] for row in r[1]]
        files[f"{split}_annotations"] = out / f"ava_{split}_v2.2.csv"
        files[f"{split}_proposals"] = out / f"ava_{split}_predicted_boxes.csv"
        _write_csv(files[f"{split}_annotations"], gt)
        _write_csv(files[f"{split}_proposals"], props)
    files["labelmap"] = out / "ava_action_list.pbtxt"
    files["labelmap"].write_text("".join(f'item {{\n  name: "{name}"\n  id: {i}\n}}\n'
                                         for i, name in ava_label_map(near)))
    excluded, rng = [], np.random.default_rng([seed, 3])
    for vid in ids[train_videos:]:  # a few val keyframes left out of scoring
        secs = ava_keyframes(duration)
        excluded += [[vid, f"{s:04d}"] for s in sorted(rng.choice(secs, min(2, len(secs)), replace=False))]
    files["exclusions"] = out / "ava_val_excluded_timestamps.csv"
    _write_csv(files["exclusions"], excluded)
    return {k: str(v) for k, v in files.items()}


# ----------------------------------------------------------------------------- EPIC-Kitchens


def epic_successor(verb: int, noun: int, nouns: int) -> tuple[int, int]:
    """The grammar's next ``(verb, noun)`` after ``(verb, noun)`` (class ids;
    see the module docstring)."""
    if verb == 0:  # open X -> shake X+1
        return 2, (noun + 1) % nouns
    if verb == 1:  # close X -> wash X-1
        return 3, (noun - 1) % nouns
    if verb == 2:  # shake X -> close X+1
        return 1, (noun + 1) % nouns
    return 0, noun  # wash X -> open X


@dataclass(frozen=True)
class Segment:
    start_cs: int  # start and stop in centiseconds of video time, as the files write them
    stop_cs: int
    verb: int
    noun: int
    phase: float  # the motion's phase at the start, in periods

    @property
    def start(self) -> float:
        return self.start_cs / 100

    @property
    def stop(self) -> float:
        return self.stop_cs / 100


def epic_script(rng: np.random.Generator, duration: float, nouns: int, rule_prob: float) -> list[Segment]:
    """Back-to-back actions following the grammar, within ``duration`` seconds."""
    segments, t = [], int(rng.uniform(50, 100))
    states = [(v, n) for v in range(len(EPIC_VERBS)) for n in range(nouns)]
    state = states[int(rng.integers(len(states)))]
    while True:
        length = int(rng.uniform(240, 360))
        if t + length > duration * 100 - 30:
            return segments
        segments.append(Segment(t, t + length, state[0], state[1], float(rng.random())))
        t += length + int(rng.uniform(30, 70))
        follow = epic_successor(*state, nouns)
        if rng.random() < rule_prob:
            state = follow
        else:
            others = [s for s in states if s != follow]
            state = others[int(rng.integers(len(others)))]


def epic_places(nouns: int, height: int, width: int) -> list[tuple[float, float]]:
    """Each noun's place ``(row, column)``: the same in every video of a size."""
    return [(height * (0.5 + 0.3 * math.sin(a)), width * (0.5 + 0.34 * math.cos(a)))
            for a in (2 * math.pi * k / nouns - 3 * math.pi / 4 for k in range(nouns))]


def epic_motion(verb: int, t: np.ndarray, duration: float, phase: float):
    """An object's ``(x offset in radii, turn in radians)`` at times ``t``
    (seconds from the action's start) of a ``verb`` lasting ``duration``."""
    env = _envelope(t, duration)
    zero = np.zeros_like(t)
    if verb in (0, 1):  # a ratchet: a fast stroke over 20% of a 0.8 s period, a slow return
        u = (phase + t / 0.8) % 1.0
        wave = np.where(u < 0.2, u / 0.2, (1 - u) / 0.8) - 0.5
        return zero, (-1.0 if verb == 0 else 1.0) * 1.2 * wave * env
    freq = 2.5 if verb == 2 else 0.8
    return 0.7 * np.sin(2 * math.pi * (phase + freq * t)) * env, zero


@dataclass
class EpicVideo:
    scene: Scene  # sprites 0..nouns-1 are the objects, the last one the hand
    segments: list[Segment]


def epic_scene(seed: int, duration: float = 60, fps: int = 50, height: int = 72, width: int = 128,
               nouns: int = 4, rule_prob: float = 0.9) -> EpicVideo:
    """One EPIC-style video: the objects at their places and the hand acting on them."""
    _check_size(height, width, fps, duration, 8)
    if not 3 <= nouns <= len(EPIC_NOUNS):
        raise UsageError(f"nouns {nouns}: between 3 and {len(EPIC_NOUNS)}")
    if not 0 <= rule_prob <= 1:
        raise UsageError(f"rule_prob {rule_prob}: a probability is needed")
    rng = np.random.default_rng(seed)
    num_frames = int(round(duration * fps))
    scale = height / 72
    background = _background(rng, height, width)
    objects = []
    for cy, cx in epic_places(nouns, height, width):
        sp = _sprite(rng, rng.uniform(6, 8) * scale, num_frames)
        sp.cy[:] = cy + rng.uniform(-1.5, 1.5) * scale
        sp.cx[:] = cx + rng.uniform(-1.5, 1.5) * scale
        sp.angle[:] = rng.uniform(0, 2 * math.pi)
        objects.append(sp)
    hand = _sprite(rng, rng.uniform(4, 5) * scale, num_frames)
    segments = epic_script(rng, duration, nouns, rule_prob)
    times = np.arange(num_frames) / fps

    def grip(obj: Sprite, f):
        """Where the hand sits on ``obj`` in frame(s) ``f``: above it, turning with it."""
        lift = obj.radius * 0.8 + hand.radius * 0.6
        a = obj.angle[f] - obj.angle[0]
        return obj.cy[f] - lift * np.cos(a), obj.cx[f] + lift * np.sin(a)

    hand.angle[:] = rng.uniform(0, 2 * math.pi)
    here = (rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width)
    last_end = 0.0
    for seg in segments:
        obj = objects[seg.noun]
        inside = np.flatnonzero((times >= seg.start) & (times < seg.stop))
        x, turn = epic_motion(seg.verb, times[inside] - seg.start, seg.stop - seg.start, seg.phase)
        obj.cx[inside] += x * obj.radius
        obj.angle[inside] += turn
        target = grip(obj, 0)  # at rest when the action starts
        travel = np.flatnonzero((times >= last_end) & (times < seg.start))
        s = (times[travel] - last_end) / max(seg.start - last_end, 1e-6)
        s = s * s * (3 - 2 * s)  # smoothstep: leave and arrive at rest
        hand.cy[travel] = here[0] + (target[0] - here[0]) * s
        hand.cx[travel] = here[1] + (target[1] - here[1]) * s
        hand.cy[inside], hand.cx[inside] = grip(obj, inside)
        hand.angle[inside] += obj.angle[inside] - obj.angle[0]
        here, last_end = grip(obj, 0), seg.stop
    rest = np.flatnonzero(times >= last_end)
    hand.cy[rest], hand.cx[rest] = here
    return EpicVideo(Scene(background, objects + [hand], int(fps)), segments)


def _timestamp(cs: int) -> str:
    """Centiseconds as ``HH:MM:SS.ff``."""
    return f"{cs // 360000:02d}:{cs // 6000 % 60:02d}:{cs // 100 % 60:02d}.{cs % 100:02d}"


def _timestamp_ms(ms: int) -> str:
    """Milliseconds as ``HH:MM:SS.fff``."""
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def epic_frames(start_cs: int, stop_cs: int) -> tuple[int, int]:
    """The released files' 60 fps frame numbers of a segment: ``max(1, int(60 t))`` and ``int(60 t)``."""
    return max(1, start_cs * EPIC_LABEL_FPS // 100), stop_cs * EPIC_LABEL_FPS // 100


def epic_rows(participant: str, video_id: str, segments: list[Segment], seed: int):
    """``(EPIC-55 rows without the uid, EPIC-100 rows)`` of one video's segments."""
    rng = np.random.default_rng([seed, 2])
    rows55, rows100 = [], []
    for k, seg in enumerate(segments):
        verb, noun = EPIC_VERBS[seg.verb], EPIC_NOUNS[seg.noun]
        start, stop = epic_frames(seg.start_cs, seg.stop_cs)
        common = [_timestamp(seg.start_cs), _timestamp(seg.stop_cs), start, stop]
        labels = [verb, seg.verb, noun, seg.noun, str([noun]), str([seg.noun])]
        narration = f"{verb} {noun}"
        said = max(0, seg.start_cs * 10 + int(rng.integers(-300, 500)))  # narrations are spoken near the start
        rows55.append([participant, video_id, narration, *common, *labels])
        rows100.append([f"{video_id}_{k}", participant, video_id, _timestamp_ms(said), *common, narration, *labels])
    return rows55, rows100


def _epic_job(job):
    path, participant, video_id, seed, duration, fps, height, width, nouns, rule_prob = job
    video = epic_scene(seed, duration, fps, height, width, nouns, rule_prob)
    write_video(Path(path), render_frames(video.scene), fps=fps)
    return epic_rows(participant, video_id, video.segments, seed)


def epic_files(columns: int) -> dict:
    """The annotation file names of each split for EPIC-55 or EPIC-100 columns."""
    if columns == 55:
        return {"train": "EPIC_train_action_labels.csv", "val": "EPIC_val_action_labels.csv"}
    if columns == 100:
        return {"train": "EPIC_100_train.csv", "val": "EPIC_100_validation.csv"}
    raise UsageError(f"epic columns {columns}: 55 or 100")


def make_epic(out: Path, seed: int = 0, participants: int = 2, train_videos: int = 2, val_videos: int = 1,
              duration: float = 60, fps: int = 50, height: int = 72, width: int = 128, nouns: int = 4,
              rule_prob: float = 0.9, workers: int | None = None) -> dict:
    """Write ``OUT/videos/PNN/PNN_MM.MP4`` and both EPIC column sets (train
    and val videos per participant); returns the files' paths by name."""
    _check_size(height, width, fps, duration, 8)
    if participants < 1 or train_videos < 1 or val_videos < 1:
        raise UsageError("at least one participant with one train and one val video is needed")
    out = Path(out)
    seeds = iter(video_seeds(seed, participants * (train_videos + val_videos)))
    jobs, split_of = [], []
    for p in range(participants):
        pid = f"P{p + 1:02d}"
        (out / "videos" / pid).mkdir(parents=True, exist_ok=True)
        for v in range(train_videos + val_videos):
            vid = f"{pid}_{v + 1:02d}"
            jobs.append((str(out / "videos" / pid / f"{vid}.MP4"), pid, vid, next(seeds),
                         duration, int(fps), height, width, nouns, rule_prob))
            split_of.append("train" if v < train_videos else "val")
    results = _pool_map(_epic_job, jobs, _workers(workers))
    files, uid = {}, 0
    for split in ("train", "val"):
        rows55, rows100 = [], []
        for (r55, r100), s in zip(results, split_of):
            if s == split:
                rows55 += [[uid + i, *row] for i, row in enumerate(r55)]
                uid += len(r55)
                rows100 += r100
        for columns, rows, header in ((55, rows55, EPIC55_HEADER), (100, rows100, EPIC100_HEADER)):
            path = out / epic_files(columns)[split]
            _write_csv(path, rows, header)
            files[f"{split}_epic{columns}"] = str(path)
    return files


# ----------------------------------------------------------------------------- packing


def pack(task: str, out: Path, files: dict, short_side: int = 64, workers: int | None = None, seed: int = 0,
         quiet: bool = True, epic_columns: int = 100) -> dict:
    """Pack OUT/train and OUT/val with make_shards' long-video layouts; returns their manifests."""
    from shard_tools.make_shards import pack as make_shards
    out, result = Path(out), {}
    for split in ("train", "val"):
        if task == "ava":
            layout = {"layout": "ava", "annotations": files[f"{split}_annotations"],
                      "proposals": files[f"{split}_proposals"], "labelmap": files["labelmap"],
                      "time_offset": AVA_TIME_OFFSET}
            if split == "val":
                layout["exclusions"] = files["exclusions"]
        elif task == "epic":
            layout = {"layout": "epic", "annotations": files[f"{split}_epic{epic_columns}"]}
        else:
            raise UsageError(f"task {task!r}: ava or epic")
        made = make_shards(out / "videos", out / split, **layout, prefix=split, seed=seed, short_side=short_side,
                           workers=_workers(workers), quiet=quiet, resume=(out / split / "manifest.json").exists())
        if made["failed"]:
            raise JobError(f"make_shards could not pack {made['failed']} of the {task} {split} videos or rows "
                           f"(see {made['failed_path']})")
        result[split] = made["manifest"]
    return result


def make_task(task: str, out: Path, seed: int = 0, videos: int | None = None, val_videos: int | None = None,
              duration: float | None = None, fps: int | None = None, height: int | None = None,
              width: int | None = None, participants: int | None = None, epic_columns: int = 100,
              workers: int | None = None, short_side: int = 64, quiet: bool = True, pack_shards: bool = True) -> dict:
    """``make_synthetic --task ava|epic``: write the videos and annotations
    (None takes the task's default), then pack OUT/train and OUT/val.
    Returns the manifests' paths by split, or without ``pack_shards`` the
    annotation files make_shards would read."""
    def pick(value, default):
        return default if value is None else value

    if task == "ava":
        if participants is not None:
            raise UsageError("participants: only for --task epic")
        duration = pick(duration, 40)
        if int(duration) != duration:
            raise UsageError(f"duration {duration}: whole seconds for ava (its keyframes are integer seconds)")
        height = pick(height, 96)
        files = make_ava(out, seed, pick(videos, 6), pick(val_videos, 3), int(duration), pick(fps, 25), height,
                         pick(width, round(height * 4 / 3 / 2) * 2), workers=workers)
        annotations = {s: files[f"{s}_annotations"] for s in ("train", "val")}
    elif task == "epic":
        epic_files(epic_columns)  # refuses a column set other than 55 or 100 before any work
        height = pick(height, 72)
        files = make_epic(out, seed, pick(participants, 2), pick(videos, 2), pick(val_videos, 1), pick(duration, 60),
                          pick(fps, 50), height, pick(width, round(height * 16 / 9 / 2) * 2), workers=workers)
        annotations = {s: files[f"{s}_epic{epic_columns}"] for s in ("train", "val")}
    else:
        raise UsageError(f"task {task!r}: ava or epic")
    if not pack_shards:
        return annotations
    return pack(task, out, files, short_side, workers, seed, quiet, epic_columns)
