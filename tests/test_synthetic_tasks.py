"""The synthetic AVA and EPIC-Kitchens data: file formats, boxes, proposals, the grammar, determinism."""
from __future__ import annotations

import ast
import csv
import filecmp
import math
import re
from pathlib import Path

import av
import numpy as np
import pytest

from shard_tools import synthetic_tasks as st
from shard_tools.make_synthetic import main as make_synthetic_main
from shard_tools.make_synthetic import make
from vthcl.ava_eval import iou

AVA = dict(task="ava", videos=2, val_videos=1, duration=8, fps=12, size=72, width=96, workers=1, pack=False)
EPIC = dict(task="epic", participants=2, videos=1, val_videos=1, duration=10, fps=50, size=72, workers=1,
            pack=False)


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _iou(a, b) -> float:
    """The scorer's IoU (vthcl.ava_eval: the official np_box_ops.iou) of two boxes."""
    return float(iou(np.array([a], dtype=float), np.array([b], dtype=float))[0, 0])


def _made(tmp_path_factory, options: dict, train: str, val: str) -> Path:
    """make_synthetic into a fresh folder: its two annotation files, named as the task's own."""
    out = tmp_path_factory.mktemp(options["task"])
    assert make(out, **options) == {"train": str(out / train), "val": str(out / val)}
    return out


@pytest.fixture(scope="module")
def ava(tmp_path_factory) -> Path:
    return _made(tmp_path_factory, AVA, "ava_train_v2.2.csv", "ava_val_v2.2.csv")


@pytest.fixture(scope="module")
def epic(tmp_path_factory) -> Path:
    return _made(tmp_path_factory, EPIC, "EPIC_100_train.csv", "EPIC_100_validation.csv")


# ----------------------------------------------------------------------------- AVA


def test_ava_files_have_the_v22_columns_and_every_keyframe(ava):
    ids = {"train": ["synAVA_000", "synAVA_001"], "val": ["synAVA_002"]}
    keyframes = list(range(902, 907))  # 900 + 2 .. 900 + 8 - 2
    assert st.ava_keyframes(8) == keyframes
    labelmap = {}
    name = None
    for line in (ava / "ava_action_list.pbtxt").read_text().splitlines():  # read as PySlowFast's read_labelmap
        if line.startswith("  name:"):
            name = line.split('"')[1]
        elif line.startswith("  id:"):
            labelmap[int(line.split()[-1])] = name
    assert labelmap == {1: "stand", 2: "walk left", 3: "walk right", 4: "jump", 5: "spin", 6: "wave",
                        7: "near another actor"}
    for split, videos in ids.items():
        rows = _rows(ava / f"ava_{split}_v2.2.csv")
        assert rows[0][0] in videos  # no header
        boxes = {}
        for row in rows:
            assert len(row) == 8 and re.fullmatch(r"\d{4}", row[1]), row
            assert all(re.fullmatch(r"[01]\.\d{3}", v) for v in row[2:6]), row
            x1, y1, x2, y2 = map(float, row[2:6])
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, row
            assert int(row[6]) in labelmap
            boxes.setdefault((row[0], int(row[1]), int(row[7])), []).append((tuple(row[2:6]), int(row[6])))
        # every keyframe of every video, every actor with one motion action (+ maybe "near"), one box each
        assert {(v, s) for v, s, _ in boxes} == {(v, s) for v in videos for s in keyframes}
        for key, entries in boxes.items():
            assert len({b for b, _ in entries}) == 1, key
            actions = sorted(a for _, a in entries)
            assert 1 <= actions[0] <= 6 and actions[1:] in ([], [7]), key
        people = {v: {p for vv, _, p in boxes if vv == v} for v in videos}
        assert all(2 <= len(p) <= 3 for p in people.values())
        assert all({p for vv, s, p in boxes if vv == v} == people[v] for v, s, _ in boxes)
        for video in videos:
            with av.open(str(ava / "videos" / f"{video}.mp4")) as c:
                s = c.streams.video[0]
                assert (s.codec_context.name, s.average_rate, s.width, s.height) == ("h264", 12, 96, 72)
                assert sum(1 for _ in c.decode(video=0)) == 8 * 12
    excluded = _rows(ava / "ava_val_excluded_timestamps.csv")
    assert excluded and all(len(r) == 2 and r[0] in ids["val"] and re.fullmatch(r"\d{4}", r[1]) and
                            int(r[1]) in keyframes for r in excluded)


def test_ava_proposals_look_like_a_person_detectors(ava):
    for split in ("train", "val"):
        truth = {}
        for row in _rows(ava / f"ava_{split}_v2.2.csv"):
            truth.setdefault((row[0], row[1]), set()).add(tuple(row[2:6]))
        found = {}
        for row in _rows(ava / f"ava_{split}_predicted_boxes.csv"):
            assert len(row) == 8 and row[6] == "" and re.fullmatch(r"\d{4}", row[1]), row
            x1, y1, x2, y2 = map(float, row[2:6])
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            found.setdefault((row[0], row[1]), []).append((row[2:6], float(row[7])))
        assert set(found) == set(truth)
        false_positives = 0
        for key, boxes in truth.items():
            hits = [max((_iou(b, p), s) for p, s in found[key]) for b in boxes]
            assert all(iou >= 0.5 and s >= 0.85 for iou, s in hits), key  # every true box is proposed
            fps = [s for p, s in found[key] if max(_iou(b, p) for b in boxes) < 0.5]
            assert len(found[key]) == len(boxes) + len(fps)
            assert all(s < min(s for _, s in hits) for s in fps), key  # false positives score lower
            false_positives += len(fps)
        assert false_positives >= len(truth) // 2


def test_ava_boxes_are_the_rendered_actors_extent(ava):
    seeds = st.video_seeds(0, 3)
    rows = _rows(ava / "ava_train_v2.2.csv") + _rows(ava / "ava_val_v2.2.csv")
    for i, seed in enumerate(seeds):
        vid = f"synAVA_{i:03d}"
        video = st.ava_scene(seed, 8, 12, 72, 96)
        gt, _ = st.ava_rows(vid, video, seed, 8)
        assert gt == [r for r in rows if r[0] == vid]  # the files hold exactly what the scene gives
        scene = video.scene
        with av.open(str(ava / "videos" / f"{vid}.mp4")) as c:
            decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        for sec in st.ava_keyframes(8):
            frame = (sec - 900) * 12
            rendered = st.render_frames(scene, [frame])[0].astype(int)
            # the written video's frame at the keyframe is this frame (not a neighbour)
            errors = [np.abs(decoded[frame + d].astype(int) - rendered).mean() for d in (-1, 0, 1)]
            assert errors[1] < 6 and errors[1] < min(errors[0], errors[2]), (vid, sec, errors)
            empty = st.render_frames(scene, [frame], visible=set())[0]
            for person in range(len(scene.sprites)):
                alone = st.render_frames(scene, [frame], visible={person})[0]
                ys, xs = np.nonzero((alone != empty).any(-1))
                extent = (xs.min() / 96, ys.min() / 72, (xs.max() + 1) / 96, (ys.max() + 1) / 72)
                box = next(tuple(map(float, r[2:6])) for r in gt if r[1] == f"{sec:04d}" and r[7] == str(person))
                assert np.allclose(box, extent, atol=0.0006), (vid, sec, person, box, extent)


def test_ava_actions_are_motions():
    """Every actor performs every action; only "stand" keeps still."""
    video = st.ava_scene(3, duration=120, fps=12, height=72, width=96, actors=3)
    for person, sp in enumerate(video.scene.sprites):
        acts = video.actions[person]
        for action in (1, 2, 3, 4, 5, 6):
            assert (acts == action).mean() > 0.05, (person, action)  # each action is performed
        still = acts == 1
        moved = np.hypot(np.diff(sp.cx), np.diff(sp.cy)) + np.abs(np.diff(sp.angle))
        assert moved[still[1:] & still[:-1]].max() == 0  # stand is still
        assert np.median(moved[(acts[1:] != 1) & (acts[1:] == acts[:-1])]) > 0.05  # the others move


# ----------------------------------------------------------------------------- EPIC


def _cs(ts: str) -> int:
    h, m, s = ts.split(":")
    return (int(h) * 3600 + int(m) * 60) * 100 + round(float(s) * 100)


def test_epic_files_have_both_column_sets(epic):
    splits = {"train": ["P01_01", "P02_01"], "val": ["P01_02", "P02_02"]}
    uid = 0
    for split, videos in splits.items():
        name55 = "EPIC_train_action_labels.csv" if split == "train" else "EPIC_val_action_labels.csv"
        name100 = "EPIC_100_train.csv" if split == "train" else "EPIC_100_validation.csv"
        rows55, rows100 = _rows(epic / name55), _rows(epic / name100)
        assert rows55[0] == ["uid", "participant_id", "video_id", "narration", "start_timestamp", "stop_timestamp",
                             "start_frame", "stop_frame", "verb", "verb_class", "noun", "noun_class", "all_nouns",
                             "all_noun_classes"]
        assert rows100[0] == ["narration_id", "participant_id", "video_id", "narration_timestamp",
                              "start_timestamp", "stop_timestamp", "start_frame", "stop_frame", "narration", "verb",
                              "verb_class", "noun", "noun_class", "all_nouns", "all_noun_classes"]
        assert len(rows55) == len(rows100) > 4
        counter = {}
        for r55, r100 in zip(rows55[1:], rows100[1:]):
            assert int(r55[0]) == uid
            uid += 1
            assert r100[2] in videos and r100[1] == r100[2][:3]
            k = counter.setdefault(r100[2], 0)
            assert r100[0] == f"{r100[2]}_{k}"  # narration ids count the video's segments
            counter[r100[2]] = k + 1
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", r100[3])
            for ts in (r100[4], r100[5]):
                assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d", ts)
            start, stop = _cs(r100[4]), _cs(r100[5])
            assert 0 <= start < stop <= 1000
            assert (int(r100[6]), int(r100[7])) == (max(1, start * 60 // 100), stop * 60 // 100)  # 60 fps frames
            assert r100[8] == f"{r100[9]} {r100[11]}"
            assert r100[9] == st.EPIC_VERBS[int(r100[10])] and r100[11] == st.EPIC_NOUNS[int(r100[12])]
            assert ast.literal_eval(r100[13]) == [r100[11]] and ast.literal_eval(r100[14]) == [int(r100[12])]
            # the same segment in the EPIC-55 columns
            assert r55[1:] == [r100[1], r100[2], r100[8], *r100[4:8], *r100[9:15]]
        assert set(counter) == set(videos)  # split by video
    text = (epic / "EPIC_100_train.csv").read_text()
    assert re.search(r",\['[a-z]+'\],\[\d\]\n", text)  # a one-noun list unquoted, as in the released files


def test_epic_videos_and_segments_agree(epic):
    rows = _rows(epic / "EPIC_100_train.csv")[1:] + _rows(epic / "EPIC_100_validation.csv")[1:]
    seeds = dict(zip(["P01_01", "P01_02", "P02_01", "P02_02"], st.video_seeds(0, 4)))
    for vid, seed in seeds.items():
        path = epic / "videos" / vid[:3] / f"{vid}.MP4"
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            assert (s.average_rate, s.width, s.height) == (50, 128, 72)
            assert sum(1 for _ in c.decode(video=0)) == 500
        video = st.epic_scene(seed, 10, 50, 72, 128)
        _, r100 = st.epic_rows(vid[:3], vid, video.segments, seed)
        assert [r for r in rows if r[2] == vid] == [[str(v) for v in r] for r in r100]
        objects = video.scene.sprites[:-1]
        for seg in video.segments:  # the segment's object moves, the others rest
            f0, f1 = math.ceil(seg.start * 50), math.ceil(seg.stop * 50)
            for n, obj in enumerate(objects):
                pose = np.stack([obj.cx[f0:f1], obj.angle[f0:f1]])
                assert (np.ptp(pose, 1).max() > 0.1) == (n == seg.noun), (vid, seg, n)


def _script_states(seeds, duration, nouns, rule_prob):
    for seed in seeds:
        segs = st.epic_script(np.random.default_rng(seed), duration, nouns, rule_prob)
        yield [(s.verb, s.noun) for s in segs]


@pytest.mark.parametrize("nouns", [3, 4, 6])
def test_epic_grammar_one_successor_per_state(nouns):
    states = [(v, n) for v in range(4) for n in range(nouns)]
    # the successors form one cycle through every (verb, noun)
    x, seen = states[0], []
    while x not in seen:
        seen.append(x)
        x = st.epic_successor(*x, nouns)
    assert len(seen) == len(states) and x == states[0]
    # a frame shows the object and whether it turns (open/close) or swings (shake/wash): the two
    # actions it leaves open lead to different verbs and nouns
    for n in range(nouns):
        for a, b in ((0, 1), (2, 3)):
            (va, na), (vb, nb) = st.epic_successor(a, n, nouns), st.epic_successor(b, n, nouns)
            assert va != vb and na != nb
    table = {}
    for seq in _script_states(range(10), 300, nouns, 1.0):
        for cur, nxt in zip(seq, seq[1:]):
            table.setdefault(cur, set()).add(nxt)
    assert set(table) == set(states) and all(len(s) == 1 for s in table.values())
    assert all(table[s] == {st.epic_successor(*s, nouns)} for s in states)


def test_epic_grammar_follows_the_rule_with_its_probability():
    follow, others = 0, set()
    total = 0
    for seq in _script_states(range(30), 300, 4, 0.9):
        for cur, nxt in zip(seq, seq[1:]):
            total += 1
            if nxt == st.epic_successor(*cur, 4):
                follow += 1
            else:
                others.add(nxt)
    assert total > 2000 and abs(follow / total - 0.9) < 0.02
    assert len(others) == 16  # off the rule, any action


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.concatenate([a, b])
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


def _observations(video, fps, lag=3):
    """For each action with a predecessor: the last frame of 1 s of observation
    ending 1 s before it starts, the context a single frame shows (the object
    acted on, turned or swung) and the next action."""
    out = []
    for cur, nxt in zip(video.segments, video.segments[1:]):
        f = math.ceil((nxt.start - 1.0) * fps) - 1
        assert cur.start + 0.25 <= (f - lag) / fps and f / fps <= cur.stop - 0.25  # inside the current action
        out.append((f, (cur.noun, cur.verb // 2), (nxt.verb, nxt.noun)))
    return out


def test_epic_single_frame_pose_does_not_tell_the_next_action():
    """Everything a frame shows of the grammar is the acted object's pose and
    the hand on it (the other objects rest, the look is drawn per video). At
    the observation time its distribution is the same for the two next
    actions a context leaves open (KS test), while the motion over the
    observed second separates them."""
    fps, samples = 25, {}
    for seed in range(16):
        video = st.epic_scene(seed, duration=300, fps=fps, rule_prob=1.0)
        sprites = video.scene.sprites
        hand = sprites[-1]
        for f, context, nxt in _observations(video, fps):
            obj = sprites[context[0]]
            g = np.arange(f - fps + 1, f + 1)  # the observed second
            pose = np.stack([(obj.cx[g] - obj.cx[0]) / obj.radius, obj.angle[g] - obj.angle[0],
                             hand.cy[g] - obj.cy[g], hand.cx[g] - obj.cx[g]], 1)
            others = [sp for i, sp in enumerate(sprites[:-1]) if i != context[0]]
            assert all(sp.cx[f] == sp.cx[0] and sp.angle[f] == sp.angle[0] for sp in others)
            step = np.diff(pose, axis=0)
            # the turn's direction, the swing's speed
            motion = np.median(step[:, 1]) if context[1] == 0 else np.median(np.abs(step[:, 0]))
            samples.setdefault(context, {}).setdefault(nxt, []).append((pose[-1], motion))
    assert len(samples) == 8
    for context, groups in samples.items():
        assert len(groups) == 2, context
        a, b = groups.values()
        critical = 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))  # alpha = 0.001
        for k in range(4):  # one frame: the same distribution
            assert _ks(np.array([p[k] for p, _ in a]), np.array([p[k] for p, _ in b])) < critical, (context, k)
        # the motion: told apart
        assert _ks(np.array([m for _, m in a]), np.array([m for _, m in b])) > 0.95, context


def test_epic_single_frame_pixels_do_not_tell_the_next_action():
    """Nearest neighbour on the rendered frames of one long video: a frame at
    the observation time finds the context (object, turned or swung) but not
    the next action; two frames 3 apart do better."""
    fps = 25
    video = st.epic_scene(7, duration=600, fps=fps, rule_prob=1.0)
    obs = _observations(video, fps)
    frames = np.array([f for f, _, _ in obs])
    context = np.array([c[0] * 2 + c[1] for _, c, _ in obs])
    nxt = np.array([v * 10 + n for _, _, (v, n) in obs])
    one = st.render_frames(video.scene, frames).reshape(len(obs), -1).astype(np.float32)
    two = np.concatenate([one, 3 * (one - st.render_frames(video.scene, frames - 3).reshape(len(obs), -1))], 1)

    def nearest(x, within=None):
        sq = (x ** 2).sum(1)
        d = sq[:, None] + sq[None, :] - 2 * x @ x.T
        np.fill_diagonal(d, np.inf)
        if within is not None:
            d[within[:, None] != within[None, :]] = np.inf
        return d.argmin(1)

    assert len(obs) > 150
    assert (context[nearest(one)] == context).mean() > 0.8  # a frame shows what is visible
    single = (nxt[nearest(one, context)] == nxt).mean()
    assert single < 0.62  # two next actions per context: chance is 0.5
    assert (nxt[nearest(two, context)] == nxt).mean() > single + 0.15


# ----------------------------------------------------------------------------- make, CLI, determinism


def test_same_seed_same_files(tmp_path, ava, epic):
    for reference, options in ((ava, AVA), (epic, EPIC)):
        out = tmp_path / options["task"]
        make(out, **{**options, "workers": 2})  # in worker processes this time
        names = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(reference, out, [str(n) for n in names], shallow=False)
        assert not mismatch and not errors
        other = tmp_path / (options["task"] + "_seed1")
        make(other, **{**options, "seed": 1})
        for name in names:  # another seed: other videos, other annotations
            if name.parts[0] == "videos" or name.name in ("ava_train_v2.2.csv", "EPIC_100_train.csv"):
                assert not filecmp.cmp(reference / name, other / name, shallow=False), name


def test_both_tasks_pack_into_event_datasets(tmp_path):
    """make() packs what it wrote with make_shards' long-video layouts: every video, every keyframe or
    segment of the annotations an event (less AVA's excluded val keyframes), nothing failed."""
    import json
    for task, extra in (("ava", {"duration": 8}), ("epic", {"duration": 12, "epic_columns": 55})):
        out = tmp_path / task
        manifests = make(out, task=task, seed=3, videos=1, val_videos=1, workers=2, short_side=48, **extra)
        for split, path in manifests.items():
            m = json.loads(open(path).read())
            assert m["task"] == task and m["failed"] == 0 and m["total_samples"] >= 1
            if task == "ava":
                csv_rows = (out / f"ava_{split}_v2.2.csv").read_text().splitlines()
                keyframes = {tuple(r.split(",")[:2]) for r in csv_rows}
                assert m["events"] == len(keyframes) - m["event_info"]["excluded_keyframes"]
            else:
                assert m["event_info"]["columns"] == "epic-55"
                assert m["events"] == len((out / ("EPIC_train_action_labels.csv" if split == "train"
                                                   else "EPIC_val_action_labels.csv")).read_text().splitlines()) - 1


def test_bad_options_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="vp9"):
        make(tmp_path, task="ava", vp9=True, pack=False)
    with pytest.raises(ValueError, match="fps"):
        make(tmp_path, videos=4, fps=25, pack=False)  # tempo has no --fps
    with pytest.raises(ValueError, match="whole seconds"):
        make(tmp_path, task="ava", duration=8.5, pack=False)
    with pytest.raises(ValueError, match="columns 56"):
        make(tmp_path, task="epic", epic_columns=56, pack=False)
    assert make_synthetic_main([str(tmp_path), "--task", "tempo", "--participants", "3"]) == 2
    assert "participants" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
