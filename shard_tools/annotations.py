"""The long-video annotation files make_shards reads: AVA and EPIC-Kitchens.

Each reader turns a file into time-anchored events grouped by video, and
every row it cannot use into a report naming the file, the line and the
reason (make_shards writes those to failed.jsonl; the other rows are packed).

AVA v2.2 (``--layout ava``)
    ``ava_{train,val}_v2.2.csv``: no header, ``video_id, sec, x1, y1, x2, y2,
    action_id, person_id``, boxes normalised to [0, 1], one row per (box,
    action). An event is a keyframe (video_id, sec) with its boxes, each with
    its action ids and person id. Person proposals (``--proposals``, as
    PySlowFast ships them) have the same columns with the detector's score in
    column 7 and column 6 empty or -1, or an action id (PySlowFast's
    "include negative" files, which carry labels already): they become the
    keyframe's ``proposals`` with their scores and actions. A keyframe that
    only proposals name is an event too (the validation set is scored on
    every keyframe). ``--exclusions`` (``video_id,sec``) leaves keyframes out.
    The label map (``item { name: "..." id: N }``) names the evaluated classes.
EPIC-Kitchens (``--layout epic``)
    EPIC-55 ``EPIC_train_action_labels.csv`` (``uid, ...``) or EPIC-100
    ``EPIC_100_{train,validation}.csv`` (``narration_id, ...``), told apart
    by the header. An event is a segment: ``start`` and ``stop`` in seconds
    from ``start_timestamp``/``stop_timestamp`` (``HH:MM:SS.ff`` or ``.fff``;
    the CSV's frame numbers assume a 60 fps extraction, so they are not used),
    ``verb_class``, ``noun_class`` (-1 where a test file has none) and the
    row's id.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field

Report = dict  # {"source": "FILE:LINE", "reason": ..., "file": FILE, "line": LINE}


@dataclass
class Annotations:
    """Events per video (in file order) and the rows that could not be used."""
    task: str
    events: dict[str, list[dict]] = field(default_factory=dict)  # video_id -> events
    lines: dict[str, list[int]] = field(default_factory=dict)  # video_id -> annotation lines of its events
    bad: list[Report] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # for the manifest: classes, columns, counts
    participants: dict[str, str] = field(default_factory=dict)  # video_id -> participant (EPIC)


def _report(path: str, line: int, reason: str) -> Report:
    return {"source": f"{path}:{line}", "reason": reason, "file": str(path), "line": line}


def csv_rows(path: str):
    """(line number, cells stripped) of every non-blank row of a CSV file (UsageError if it cannot be read)."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        from shard_tools.sources import UsageError
        raise UsageError(f"cannot read annotations {path}: {e.strerror or e}") from None
    with f:
        reader = csv.reader(f)
        for row in reader:
            if row and any(c.strip() for c in row):
                yield reader.line_num, [c.strip() for c in row]


def finite(text: str) -> float:
    """``text`` as a finite float (ValueError says why not)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


# ----------------------------------------------------------------------------- AVA
_LABELMAP_FIELD = re.compile(r'^\s*(\w+)\s*:\s*(?:"([^"]*)"|(\S+))\s*$')
_LABELMAP_OPEN = re.compile(r"^\s*(item|label)\s*\{\s*$")


def read_labelmap(path) -> tuple[list[dict], set[int]]:
    """The classes of an AVA label map: ``item {`` or ``label {`` blocks with one
    field a line (``name: "..."``, ``id: N`` or ``label_id: N``; other fields such
    as ``label_type`` are ignored). Returns ``([{"id", "name"}, ...], {ids})``.
    A malformed map is an error naming the file and line."""
    categories, ids, block, opened = [], set(), None, 0
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            where = f"{path}:{line_no}"
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if _LABELMAP_OPEN.match(line):
                if block is not None:
                    raise ValueError(f"{where}: a block opens inside the block opened at line {opened}")
                block, opened = {}, line_no
            elif line.strip() == "}":
                if block is None:
                    raise ValueError(f"{where}: '}}' without an open block")
                if "id" not in block:
                    raise ValueError(f"{path}:{opened}: block has no id or label_id")
                if block["id"] in ids:
                    raise ValueError(f"{path}:{opened}: class id {block['id']} appears twice")
                categories.append({"id": block["id"], "name": block.get("name", "")})
                ids.add(block["id"])
                block = None
            elif m := _LABELMAP_FIELD.match(line):
                if block is None:
                    raise ValueError(f"{where}: field outside an item {{ }} or label {{ }} block")
                key, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
                if key in ("id", "label_id"):
                    try:
                        block["id"] = int(value)
                    except ValueError:
                        raise ValueError(f"{where}: {key} {value!r} is not an integer") from None
                    if block["id"] < 1:
                        raise ValueError(f"{where}: class ids start at 1 (got {block['id']})")
                elif key == "name":
                    block["name"] = value
            else:
                raise ValueError(f"{where}: not a label map line: {line.strip()!r}")
    if block is not None:
        raise ValueError(f"{path}:{opened}: block is not closed")
    if not categories:
        raise ValueError(f"{path}: no classes in the label map")
    return categories, ids


def _ava_row(row: list[str], proposals: bool) -> tuple[str, float, list[float], int, float]:
    """(video_id, sec, box, action or -1, person id or score) of one AVA row; ValueError says why not."""
    if len(row) < 7 or len(row) > 8:
        raise ValueError(f"expected 8 columns (video_id, sec, x1, y1, x2, y2, action_id, "
                         f"{'score' if proposals else 'person_id'}), got {len(row)}")
    if proposals and len(row) < 8:
        raise ValueError("a proposal needs its score in column 8")
    video, sec = row[0], finite(row[1])
    if not video:
        raise ValueError("empty video_id")
    box = [finite(v) for v in row[2:6]]
    if any(not 0.0 <= v <= 1.0 for v in box):
        raise ValueError(f"box {row[2:6]} outside [0, 1] (boxes are normalised to the frame)")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"box {row[2:6]} has x2 <= x1 or y2 <= y1")
    action = -1 if row[6] in ("", "-1") else int(row[6])
    if action == 0 or action < -1:
        raise ValueError(f"action id {row[6]!r} (ids start at 1; empty or -1: none)")
    last = finite(row[7]) if len(row) > 7 and row[7] != "" else -1.0
    return video, sec, box, action, last


def _ava_boxes(path: str, proposals: bool, out: Annotations, keyframes: dict) -> None:
    """Group the rows of one AVA CSV into keyframes: boxes (ground truth) or proposals."""
    kind = "proposals" if proposals else "boxes"
    for line, row in csv_rows(path):
        try:
            video, sec, box, action, last = _ava_row(row, proposals)
        except ValueError as e:
            out.bad.append(_report(path, line, str(e)))
            continue
        frame = keyframes.setdefault((video, sec), {"boxes": {}, "proposals": {}, "lines": []})
        frame["lines"].append(line)
        # one box per distinct coordinates (and person), as PySlowFast groups them
        key = (tuple(row[2:6]), int(last)) if not proposals else tuple(row[2:6])
        entry = frame[kind].setdefault(key, {"box": box, "actions": set()}
                                       if proposals else {"box": box, "actions": set(), "person_id": int(last)})
        if proposals:
            entry["score"] = max(entry.get("score", -math.inf), last)
        if action > 0:
            entry["actions"].add(action)


def _ava_exclusions(path: str, out: Annotations) -> set[tuple[str, float]]:
    excluded = set()
    for line, row in csv_rows(path):
        try:
            if len(row) != 2:
                raise ValueError(f"expected 2 columns (video_id, sec), got {len(row)}")
            excluded.add((row[0], finite(row[1])))
        except ValueError as e:
            out.bad.append(_report(path, line, str(e)))
    return excluded


def read_ava(annotations: str, proposals: str | None = None, labelmap: str | None = None,
             exclusions: str | None = None) -> Annotations:
    """AVA keyframes by video: ``{"time": sec, "boxes": [{"box", "actions", "person_id"}],
    "proposals": [{"box", "score", "actions"}]}``, keyframes in time order."""
    out = Annotations("ava")
    keyframes: dict = {}
    _ava_boxes(annotations, False, out, keyframes)
    if proposals:
        _ava_boxes(proposals, True, out, keyframes)
    excluded = _ava_exclusions(exclusions, out) if exclusions else set()
    actions = sorted({a for f in keyframes.values() for b in f["boxes"].values() for a in b["actions"]})
    labelled = any(p["actions"] for f in keyframes.values() for p in f["proposals"].values())
    dropped = 0
    for (video, sec), frame in sorted(keyframes.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if (video, sec) in excluded:
            dropped += 1
            continue
        out.events.setdefault(video, []).append({
            "time": sec,
            "boxes": [{"box": b["box"], "actions": sorted(b["actions"]), "person_id": b["person_id"]}
                      for b in frame["boxes"].values()],
            "proposals": [{"box": p["box"], "score": p["score"], "actions": sorted(p["actions"])}
                          for p in frame["proposals"].values()]})
        out.lines.setdefault(video, []).extend(frame["lines"])
    out.info = {"excluded_keyframes": dropped, "proposals_labelled": labelled,
                "annotations": str(annotations), "proposals": str(proposals) if proposals else None}
    if labelmap:
        categories, ids = read_labelmap(labelmap)
        out.info["actions"] = categories
        out.info["num_actions"] = max(max(ids), max(actions, default=0))
    else:
        out.info["actions"] = [{"id": a, "name": str(a)} for a in actions]
        out.info["num_actions"] = max(actions, default=0)
    return out


# ----------------------------------------------------------------------------- EPIC
EPIC_COLUMNS = {
    "epic-55": ["uid", "participant_id", "video_id", "start_timestamp", "stop_timestamp"],
    "epic-100": ["narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp"],
}
_TIMESTAMP = re.compile(r"^(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)$")


def parse_timestamp(text: str) -> float:
    """``HH:MM:SS.ff`` (or ``.fff``, or whole seconds) -> seconds."""
    m = _TIMESTAMP.match(text.strip())
    if not m:
        raise ValueError(f"timestamp {text!r} is not HH:MM:SS.ff")
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def _class(row: dict, name: str) -> int:
    text = row.get(name, "")
    if text in ("", None):
        return -1
    value = int(text)
    if value < 0:
        raise ValueError(f"{name} {text!r} is negative")
    return value


def read_epic(annotations: str) -> Annotations:
    """EPIC segments by video: ``{"time": start, "start", "stop", "id", "verb",
    "verb_class", "noun", "noun_class", "narration"}``, in start order."""
    rows = csv_rows(annotations)
    try:
        _, header = next(rows)
    except StopIteration:
        from shard_tools.sources import UsageError
        raise UsageError(f"{annotations}: empty annotation file") from None
    columns = next((name for name, need in EPIC_COLUMNS.items() if set(need) <= set(header)), None)
    if columns is None:
        from shard_tools.sources import UsageError
        raise UsageError(f"{annotations}: not an EPIC-Kitchens action file (EPIC-55 needs {EPIC_COLUMNS['epic-55']}, "
                         f"EPIC-100 {EPIC_COLUMNS['epic-100']}; the header has {header})")
    id_column = EPIC_COLUMNS[columns][0]
    out = Annotations("epic")
    segments: dict[str, list[tuple[float, int, dict]]] = {}
    for line, cells in rows:
        if len(cells) != len(header):
            out.bad.append(_report(annotations, line, f"expected {len(header)} columns, got {len(cells)}"))
            continue
        row = dict(zip(header, cells))
        try:
            start, stop = parse_timestamp(row["start_timestamp"]), parse_timestamp(row["stop_timestamp"])
            if stop < start:
                raise ValueError(f"stop {row['stop_timestamp']} before start {row['start_timestamp']}")
            if not row["video_id"]:
                raise ValueError("empty video_id")
            event = {"time": start, "start": start, "stop": stop, "id": row[id_column],
                     "verb": row.get("verb", ""), "verb_class": _class(row, "verb_class"),
                     "noun": row.get("noun", ""), "noun_class": _class(row, "noun_class"),
                     "narration": row.get("narration", "")}
        except ValueError as e:
            out.bad.append(_report(annotations, line, str(e)))
            continue
        out.participants.setdefault(row["video_id"], row["participant_id"])
        segments.setdefault(row["video_id"], []).append((start, line, event))
    for video, items in sorted(segments.items()):
        items.sort(key=lambda x: (x[0], x[1]))
        out.events[video] = [e for _, _, e in items]
        out.lines[video] = [line for _, line, _ in items]
    every = [e for es in out.events.values() for e in es]
    out.info = {"columns": columns, "annotations": str(annotations),
                "verb_classes": max((e["verb_class"] for e in every), default=-1) + 1,
                "noun_classes": max((e["noun_class"] for e in every), default=-1) + 1}
    return out
