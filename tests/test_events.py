"""Event datasets: long videos packed once (make_shards --layout ava|epic), clips anchored at times.

The sources are frame-number-coded (tests.media.xl_coded_frame) at 25 and 50
fps and packed at 30 fps, so every decoded frame says which source frame it
shows: a clip lands on the right source times or the test fails.
"""
from __future__ import annotations

import json
import math
import tarfile
import warnings

import numpy as np
import pytest
import torch

from loaders import build_loader
from loaders.fragments import Fragments
from tests import media

pytest.importorskip("nvidia.dali")

RATES = {"vidA": 25, "vidB": 50}  # source frame rates
FRAMES = 1600  # per source: 64 s at 25 fps, 32 s at 50 fps
PACKED_FPS = 30
ORIGIN_AVA = 900  # the sources start at movie second 900 (the 15-minute cuts)


def _pack(src, out, *args):
    from shard_tools.make_shards import main
    return main([str(src), str(out), "--quiet", "--workers", "2", "--codec", "vp9", "--crf", "10", "--short-side", "48",
                 *args])


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """vidA (25 fps) and vidB (50 fps), 1600 coded frames each, flat and in an EPIC-style participant folder."""
    root = tmp_path_factory.mktemp("long_sources")
    (root / "P01").mkdir()
    for name, fps in RATES.items():
        media.write_coded_video(root / f"{name}.mkv", FRAMES, fps=fps, height=48, width=64, long="xl")
        (root / "P01" / f"P01_{name}.mkv").symlink_to(root / f"{name}.mkv")
    return root


AVA_ROWS = [
    "vidA,0902,0.100,0.200,0.500,0.800,3,0",
    "vidA,0902,0.100,0.200,0.500,0.800,5,0",  # the same box, a second action
    "vidA,0902,0.600,0.100,0.900,0.900,1,1",
    "vidA,0930,0.100,0.100,0.200,0.200,2,0",  # excluded keyframe
    "vidA,0960,0.000,0.000,1.000,1.000,4,2",
    "vidB,0900,0.250,0.250,0.750,0.750,1,0",  # the window reaches before the video's start
    "vidB,0915,0.250,0.250,0.750,0.750,2,0",
    "vidB,0931,0.250,0.250,0.750,0.750,3,0",
    "vidB,0920,1.200,0.100,0.500,0.500,1,0",  # box outside [0, 1]
    "vidB,0921,0.500,0.100,0.400,0.500,1,0",  # x2 <= x1
    "vidB,09x1,0.100,0.100,0.400,0.500,1,0",  # a second that is no number
    "vidZ,0905,0.100,0.100,0.400,0.500,1,0",  # no such video
    "vidZ,0906,0.100,0.100,0.400,0.500,1,0",
]
PROPOSALS = [
    "vidA,0902,0.110,0.210,0.490,0.790,,0.98",
    "vidA,0902,0.000,0.500,0.300,0.900,,0.40",
    "vidA,0945,0.300,0.300,0.600,0.600,,0.95",  # a keyframe only the proposals name
    "vidB,0915,0.250,0.250,0.750,0.750,-1,0.99",
]
LABELMAP = "".join(f'item {{\n  name: "action {i}"\n  id: {i}\n}}\n' for i in range(1, 6))


@pytest.fixture(scope="session")
def ava(sources, tmp_path_factory):
    d = tmp_path_factory.mktemp("ava")
    (d / "gt.csv").write_text("\n".join(AVA_ROWS) + "\n")
    (d / "proposals.csv").write_text("\n".join(PROPOSALS) + "\n")
    (d / "labelmap.pbtxt").write_text(LABELMAP)
    (d / "excluded.csv").write_text("vidA,0930\n")
    rc = _pack(sources, d / "shards", "--layout", "ava", "--annotations", str(d / "gt.csv"), "--proposals",
               str(d / "proposals.csv"), "--labelmap", str(d / "labelmap.pbtxt"), "--exclusions",
               str(d / "excluded.csv"), "--time-offset", str(ORIGIN_AVA))
    assert rc == 3  # some rows failed: reported, the rest packed
    return d


def _epic_csv(path, header: str, rows: list[str]):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


EPIC100 = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
           "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes")
EPIC55 = ("uid,participant_id,video_id,narration,start_timestamp,stop_timestamp,start_frame,stop_frame,verb,"
          "verb_class,noun,noun_class,all_nouns,all_noun_classes")
SEGMENTS = [  # video, start, stop, verb, noun
    ("P01_vidA", "00:00:00.50", "00:00:02.00", 3, 7),  # observed window before the video: clamped
    ("P01_vidA", "00:00:12.37", "00:00:14.00", 1, 2),
    ("P01_vidA", "00:00:59.95", "00:01:02.10", 0, 4),
    ("P01_vidB", "00:00:05.29", "00:00:07.00", 2, 1),
    ("P01_vidB", "00:00:31.00", "00:00:31.50", 4, 0),
]


def _epic_rows(columns: str, bad: bool = True) -> list[str]:
    rows = []
    for k, (video, start, stop, verb, noun) in enumerate(SEGMENTS):
        if columns == "100":
            rows.append(f"{video}_{k},P01,{video},{start},{start},{stop},1,2,do it,v{verb},{verb},n{noun},{noun},"
                        f"\"['n{noun}']\",[{noun}]")
        else:
            rows.append(f"{k},P01,{video},do it,{start},{stop},1,2,v{verb},{verb},n{noun},{noun},['n{noun}'],[{noun}]")
    if bad and columns == "100":
        rows.append("P01_vidA_9,P01,P01_vidA,00:00:20.0,00:00:2x.00,00:00:21.00,1,2,x,v,1,n,1,[],[]")
        rows.append("P01_vidA_10,P01,P01_vidA,00:00:20.0,00:00:22.00,00:00:21.00,1,2,x,v,1,n,1,[],[]")
    return rows


@pytest.fixture(scope="session")
def epic(sources, tmp_path_factory):
    d = tmp_path_factory.mktemp("epic")
    csv = _epic_csv(d / "EPIC_100_train.csv", EPIC100, _epic_rows("100"))
    assert _pack(sources / "P01", d / "shards", "--layout", "epic", "--annotations", str(csv)) == 3
    return d


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _members(shards) -> dict[str, dict]:
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def source_frame(packed: int, fps: int, origin: float) -> int:
    """The source frame a member frame shows: make_shards' nearest-slot rule (the latest source frame
    whose time rounds to that slot or an earlier one), worked out again here."""
    slots = [round((j / fps - origin) * PACKED_FPS) for j in range(FRAMES)]
    return max(j for j, s in enumerate(slots) if s <= max(packed, min(slots)))


def check_clip(clip, ids, info, want_times):
    """Every fast frame shows the source frame of its member frame, which lies at the time asked for
    (within a source frame and half a packed frame); clamped frames sit at the member's edge."""
    fps = RATES[info["video_id"].split("_")[-1]]
    origin = info["span"][0]
    for k, packed in enumerate(ids):
        got = media.read_xl_frame_number(clip[:, k].numpy())
        assert got == source_frame(packed, fps, origin), (info["video_id"], k, packed)
        t = want_times[k]
        member = (t - info["time_start"]) * PACKED_FPS
        if 0 <= member <= info["num_frames"] - 1:
            assert abs(got / fps - (t - info["time_start"] + origin)) <= 1 / fps + 0.5 / PACKED_FPS + 1e-6, (k, t)
        else:
            assert packed == (0 if member < 0 else info["num_frames"] - 1)


def _batches(shards, backend, **kw):
    opts = dict(backend=backend, batch_size=3, device="cpu", crop_size=32, normalize=False, train=False,
                num_workers=0 if backend == "pyav" else 1)
    opts.update(kw)
    loader = build_loader(str(shards / "manifest.json"), **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loader, list(loader)


# ----------------------------------------------------------------------------- packing
def test_ava_layout_packs_each_video_once_with_its_events(ava):
    shards = ava / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["task"] == "ava" and manifest["total_samples"] == 2
    events = _jsonl(shards / "events.jsonl")
    assert manifest["events"] == len(events) == 6  # 902, 945, 960 of vidA (930 excluded); 900, 915, 931 of vidB
    assert [e["event"] for e in events] == list(range(6))
    assert [(e["index"], e["time"]) for e in events] == sorted((e["index"], e["time"]) for e in events)
    by_time = {(e["video_id"], e["time"]): e for e in events}
    first = by_time[("vidA", 902)]
    assert first["boxes"] == [{"box": [0.1, 0.2, 0.5, 0.8], "actions": [3, 5], "person_id": 0},
                              {"box": [0.6, 0.1, 0.9, 0.9], "actions": [1], "person_id": 1}]
    assert [p["score"] for p in first["proposals"]] == [0.98, 0.4]
    assert by_time[("vidA", 945)]["boxes"] == [] and len(by_time[("vidA", 945)]["proposals"]) == 1
    info = manifest["event_info"]
    assert info["excluded_keyframes"] == 1 and info["num_actions"] == 5 and len(info["actions"]) == 5
    assert info["time_offset"] == ORIGIN_AVA
    members = _members(shards)
    for e in events:  # a member is the span its events need, on the annotations' clock
        meta = json.loads(members[e["key"]]["json"])
        assert meta["video_id"] == e["video_id"] and meta["fps"] == PACKED_FPS
        assert meta["time_start"] == pytest.approx(meta["span"][0] + ORIGIN_AVA)
    vid_a = json.loads(members[first["key"]]["json"])
    assert vid_a["span"][0] == pytest.approx(2 - 32 / 30)  # the first keyframe less half a 64-frame window
    assert vid_a["num_frames"] == math.ceil((60 + 64 / 30 - 2) * 30 - 1e-6)  # to the last one plus half a window
    failed = _jsonl(shards / "failed.jsonl")
    bad_rows = {f["line"]: f["reason"] for f in failed if "line" in f}
    assert set(bad_rows) == {9, 10, 11}
    assert "outside [0, 1]" in bad_rows[9] and "x2 <= x1" in bad_rows[10] and "09x1" in bad_rows[11]
    assert all(f["source"] == f"{ava / 'gt.csv'}:{f['line']}" for f in failed if "line" in f)
    (missing,) = [f for f in failed if "lines" in f]
    assert missing["video_id"] == "vidZ" and missing["lines"] == [12, 13] and "missing" in missing["reason"]
    assert manifest["failed"] == 4


def test_epic_layout_reads_both_column_sets_by_header(epic, sources, tmp_path):
    shards = epic / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["task"] == "epic" and manifest["event_info"]["columns"] == "epic-100"
    assert manifest["event_info"]["verb_classes"] == 5 and manifest["event_info"]["noun_classes"] == 8
    events = _jsonl(shards / "events.jsonl")
    assert len(events) == 5 and all(e["participant_id"] == "P01" for e in events)
    seg = {e["id"]: e for e in events}["P01_vidA_1"]
    assert (seg["start"], seg["stop"], seg["verb_class"], seg["noun_class"]) == (12.37, 14.0, 1, 2)
    members = _members(shards)
    for e in events:  # packed from the video's start to its last segment's end (and half a window)
        meta = json.loads(members[e["key"]]["json"])
        assert meta["time_start"] == 0 and meta["span"][0] == 0
    failed = {f["line"]: f["reason"] for f in _jsonl(shards / "failed.jsonl")}
    assert set(failed) == {7, 8} and "HH:MM:SS" in failed[7] and "before start" in failed[8]
    csv = _epic_csv(tmp_path / "EPIC_train_action_labels.csv", EPIC55, _epic_rows("55"))
    # the same segments under EPIC-55's columns: only the header tells them apart
    assert _pack(sources / "P01", tmp_path / "shards", "--layout", "epic", "--annotations", str(csv)) == 0
    old = _jsonl(tmp_path / "shards" / "events.jsonl")
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["event_info"]["columns"] == "epic-55"
    assert [(e["start"], e["verb_class"], e["id"]) for e in old] == [(e["start"], e["verb_class"], str(k))
                                                                      for k, e in enumerate(events)]


def test_a_span_far_into_a_video_is_reached_by_a_seek(sources, tmp_path):
    """Keyframes 40 s into a video (no time offset): make_shards seeks to the keyframe before the span
    instead of decoding up to it, and the frames are those a decode from the start gives."""
    (tmp_path / "gt.csv").write_text("vidA,40,0.1,0.1,0.5,0.5,1,0\nvidA,55,0.1,0.1,0.5,0.5,2,0\n")
    assert _pack(sources, tmp_path / "shards", "--layout", "ava", "--annotations", str(tmp_path / "gt.csv")) == 0
    events = _jsonl(tmp_path / "shards" / "events.jsonl")
    (info,) = [json.loads(m["json"]) for m in _members(tmp_path / "shards").values()]
    assert info["span"][0] == pytest.approx(40 - 32 / 30) and info["time_start"] == info["span"][0]
    _, out = _batches(tmp_path / "shards", "pyav")
    for b in out:
        for i, e in enumerate(b["event"].tolist()):
            want = [events[e]["time"] + (4 * k - 32) / PACKED_FPS for k in range(16)]
            check_clip(b["fast"][i], b["frame_ids"][i].tolist(), info, want)


def test_layout_usage_errors(sources, tmp_path):
    from shard_tools.make_shards import main
    csv = _epic_csv(tmp_path / "e.csv", EPIC100, _epic_rows("100", bad=False))
    assert main([str(sources), str(tmp_path / "a"), "--layout", "epic"]) == 2  # no annotations
    assert main([str(sources), str(tmp_path / "b"), "--layout", "epic", "--annotations", str(csv),
                 "--codec", "copy"]) == 2
    assert main([str(sources), str(tmp_path / "c"), "--time-offset", "900"]) == 2  # not a long-video layout
    (tmp_path / "k.csv").write_text("a,b,c\n1,2,3\n")
    assert main([str(sources), str(tmp_path / "d"), "--layout", "epic", "--annotations",
                 str(tmp_path / "k.csv")]) == 2


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_ava_keyframe_windows_land_on_the_source_times(ava, backend):
    shards = ava / "shards"
    events = _jsonl(shards / "events.jsonl")
    members = {k: json.loads(m["json"]) for k, m in _members(shards).items()}
    loader, out = _batches(shards, backend)
    seen = []
    for b in out:
        assert {"event", "time", "size", "boxes", "box_labels", "box_batch", "proposals", "proposal_scores",
                "proposal_labels", "proposal_batch"} <= set(b)
        for i, e in enumerate(b["event"].tolist()):
            event = events[e]
            info = members[event["key"]]
            assert b["time"][i].item() == event["time"] and b["index"][i].item() == event["index"]
            want = [event["time"] + (4 * k - 32) / PACKED_FPS for k in range(16)]  # c - T*tau/2 + k*tau/alpha
            check_clip(b["fast"][i], b["frame_ids"][i].tolist(), info, want)
            # evaluation: the whole frame, its short side 256 (the member is 48x64)
            assert b["size"][i].tolist() == [256, 341]
            seen.append(e)
    assert sorted(seen) == list(range(len(events)))
    assert loader.stats.clamped == 1  # vidB at 900: the window starts before the video


@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_ava_boxes_and_labels_follow_the_crop(ava, backend):
    shards = ava / "shards"
    events = _jsonl(shards / "events.jsonl")
    _, out = _batches(shards, backend, train=True, crop_size=32, seed=3)
    checked = 0
    for b in out:
        for i, e in enumerate(b["event"].tolist()):
            mine = b["box_batch"] == i
            event = events[e]
            assert int(mine.sum()) == len(event["boxes"])
            for box, labels, truth in zip(b["boxes"][mine], b["box_labels"][mine], event["boxes"]):
                assert sorted((torch.nonzero(labels).flatten() + 1).tolist()) == truth["actions"]
                x1, y1, x2, y2 = box.tolist()
                assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1
                checked += 1
            assert int((b["proposal_batch"] == i).sum()) == len(event["proposals"])
    assert checked == sum(len(e["boxes"]) for e in events)
    # in evaluation the whole frame is kept: boxes are the annotations' own
    _, out = _batches(shards, backend)
    for b in out:
        for i, e in enumerate(b["event"].tolist()):
            got = b["boxes"][b["box_batch"] == i].tolist()
            assert np.allclose(got, [t["box"] for t in events[e]["boxes"]], atol=1e-6)


@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_epic_observed_windows_land_on_the_source_times(epic, backend):
    shards = epic / "shards"
    events = _jsonl(shards / "events.jsonl")
    members = {k: json.loads(m["json"]) for k, m in _members(shards).items()}
    for tau_a, tau_o in ((1.0, 1.0), (2.0, 0.5)):
        loader, out = _batches(shards, backend, tau_a=tau_a, tau_o=tau_o)
        seen = []
        for b in out:
            for i, e in enumerate(b["event"].tolist()):
                event = events[e]
                assert b["verb"][i].item() == event["verb_class"] and b["noun"][i].item() == event["noun_class"]
                begin = event["start"] - tau_a - tau_o
                want = [begin + k * tau_o / 16 for k in range(16)]
                check_clip(b["fast"][i], b["frame_ids"][i].tolist(), members[event["key"]], want)
                seen.append(e)
        assert sorted(seen) == list(range(len(events)))
        assert loader.stats.clamped == 1  # the segment at 0.5 s: its observed window starts before the video


@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_a_clip_reads_its_window_not_its_member(ava, backend):
    """bytes read = per video its json and fragment table, per clip its init segment and the
    fragments that hold its window: a small part of the member."""
    shards = ava / "shards"
    events = _jsonl(shards / "events.jsonl")
    members = _members(shards)
    loader, out = _batches(shards, backend, batch_size=2)
    want = 0
    for key in {e["key"] for e in events}:
        want += sum(len(members[key][m]) for m in ("json", "frag_bytes", "frag_frames"))
    clips = 0
    for b in out:
        for e, ids in zip(b["event"].tolist(), b["frame_ids"].tolist()):
            m = members[events[e]["key"]]
            frags = Fragments.from_members(m["frag_bytes"], m["frag_frames"])
            g0, g1 = frags.span(min(ids), max(ids))
            window = frags.init_size + int(frags.bytes[g1] - frags.bytes[g0])
            assert window < len(m["mp4"]) / 4
            want += window
            clips += 1
    assert clips == len(events) and loader.stats.bytes_read == want


def test_training_shuffles_events_and_draws_crops_per_event(ava):
    """Training: every event once per epoch in a seeded order; pyav and dali take the same views."""
    shards = ava / "shards"
    got = {}
    for backend in ("pyav", "dali"):
        _, out = _batches(shards, backend, train=True, seed=5, batch_size=6)
        (b,) = out
        got[backend] = b
    assert sorted(got["pyav"]["event"].tolist()) == list(range(6))
    assert got["pyav"]["event"].tolist() == got["dali"]["event"].tolist()
    assert torch.equal(got["pyav"]["frame_ids"], got["dali"]["frame_ids"])
    assert torch.allclose(got["pyav"]["boxes"], got["dali"]["boxes"])
    assert float((got["pyav"]["fast"] - got["dali"]["fast"]).abs().mean()) < 4  # decoder/resampling tolerance


def test_event_loaders_split_ranks_and_resume(ava):
    shards = ava / "shards"
    seen = []
    for rank in range(2):
        loader = build_loader(str(shards), backend="pyav", batch_size=2, device="cpu", crop_size=16, rank=rank,
                              world_size=2, num_workers=0)
        out = list(loader)
        assert len(out) == len(loader) == 2
        seen += [e for b in out for e in b["event"].tolist()]
    assert sorted(seen) == list(range(6))
    loader = build_loader(str(shards), backend="dali", batch_size=2, device="cpu", crop_size=16, num_workers=1)
    full = [b["event"].tolist() for b in loader]
    loader.load_state_dict({"epoch": 0, "batches": 1})
    assert [b["event"].tolist() for b in loader] == full[1:]


def test_parts_and_merge_give_the_single_run_events(ava, sources, tmp_path):
    """Two parts of one AVA dataset, merged, are the dataset one run packs: the same events, numbered
    the same, and the bad rows reported once."""
    from shard_tools.merge_parts import main as merge
    args = ["--layout", "ava", "--annotations", str(ava / "gt.csv"), "--proposals", str(ava / "proposals.csv"),
            "--labelmap", str(ava / "labelmap.pbtxt"), "--exclusions", str(ava / "excluded.csv"), "--time-offset",
            str(ORIGIN_AVA)]
    out = tmp_path / "parts"
    codes = [_pack(sources, out, *args, "--part", str(part), "--parts", "2") for part in range(2)]
    assert codes[0] == 3 and codes[1] in (0, 3)  # part 0 reports the bad rows
    assert merge([str(out)]) == 3
    single = ava / "shards"
    assert (out / "events.jsonl").read_text() == (single / "events.jsonl").read_text()
    merged, one = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    assert (merged["events"], merged["event_info"], merged["failed"]) == (one["events"], one["event_info"],
                                                                         one["failed"])
    assert sorted(map(json.dumps, _jsonl(out / "failed.jsonl"))) == sorted(map(json.dumps,
                                                                               _jsonl(single / "failed.jsonl")))
