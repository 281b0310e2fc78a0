"""Find the videos to pack and their labels, for each dataset layout.

Layouts:

* ``kinetics``: the official Kinetics annotation CSV
  (``label,youtube_id,time_start,time_end,split[,is_cc]``; the test CSV has no
  ``label``), videos named ``{youtube_id}_{time_start:06d}_{time_end:06d}.<ext>``
  anywhere under SRC (flat or in per-class folders). A row without its video
  is kept as a sample whose path is missing, so it ends up in failed.jsonl.
* ``folders``: ``SRC/<class>/<video>`` (UCF101, HMDB51), optionally filtered by
  split files; files directly in SRC are unlabeled (label -1).
* ``csv``: a CSV with ``path,label`` (path relative to SRC; an empty label or
  ``-1`` means unlabeled).

Every sample is a :class:`Sample` with a stable, dot-free key.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import os
import re
from dataclasses import dataclass

from vthcl.options import UsageError  # noqa: F401  (bad input: exit code 2)

UNLABELED = -1
# documents and annotations that sit beside videos (README.md, classInd.txt, ...): named, not packed
NOT_VIDEO = {".md", ".txt", ".csv", ".json", ".jsonl", ".xml", ".yaml", ".yml", ".pdf", ".html", ".py", ".sh",
             ".zip", ".tar", ".rar", ".idx"}




@dataclass(frozen=True)
class Sample:
    key: str
    source: str          # path relative to SRC (posix), as written to json/failed.jsonl
    path: str | None     # absolute path, None when the file is missing
    label: int
    label_name: str
    span: tuple[float, float] | None = None  # seconds of the source to pack (long-video layouts), else all


@dataclass
class EventVideos:
    """What the long-video layouts add to their samples: per sample key its
    video id and the events (with their annotation lines) to write into
    events.jsonl once it is packed; the rows that could not be used; and what
    the manifest says of the task."""
    task: str
    videos: dict[str, dict]  # key -> {"video_id", "participant_id", "events", "lines"}
    bad: list[dict]
    info: dict
    time_offset: float = 0.0


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "video"


def make_key(source: str) -> str:
    """Stable, dot-free, unique key: readable stem + hash of the relative path."""
    stem = os.path.splitext(os.path.basename(source))[0]
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
    return f"{_sanitize(stem)[:80]}_{digest}"


def _rel(path: str, src: str) -> str:
    return os.path.relpath(path, src).replace(os.sep, "/")


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def is_frame_folder(dirpath: str, dirnames: list[str], filenames: list[str]) -> bool:
    """A folder of a video's frames: image files, no subfolders, no videos (SSv1, frame copies of UCF101)."""
    exts = {os.path.splitext(f)[1].lower() for f in filenames if not f.startswith(".")}
    return not [d for d in dirnames if not d.startswith(".")] and bool(exts & IMAGE_EXTS) and \
        exts <= IMAGE_EXTS | NOT_VIDEO


def _walk_files(root: str, ignored: list[str] | None = None) -> list[str]:
    """Every file under root but hidden ones, a frame folder (see
    :func:`is_frame_folder`) as one item; documents (NOT_VIDEO) go to ``ignored``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if dirpath != root and is_frame_folder(dirpath, dirnames, filenames):
            out.append(dirpath)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            if os.path.splitext(f)[1].lower() in NOT_VIDEO:
                if ignored is not None:
                    ignored.append(_rel(os.path.join(dirpath, f), root))
                continue
            out.append(os.path.join(dirpath, f))
    return out


def _class_ids(names) -> dict[str, int]:
    names = sorted(set(names))
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        names = sorted(names, key=int)  # numeric labels keep their order
    return {n: i for i, n in enumerate(names)}


def _read_csv(path: str) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
            return [(h or "").strip() for h in (reader.fieldnames or [])], rows
    except OSError as e:
        raise UsageError(f"cannot read annotations {path}: {e.strerror or e}") from None


def kinetics(src: str, annotations: str, split: str | None = None) -> tuple[list[Sample], list[str]]:
    header, rows = _read_csv(annotations)
    need = {"youtube_id", "time_start", "time_end"}
    if not need <= set(header):
        raise UsageError(f"{annotations}: not a Kinetics annotation file (needs columns {sorted(need)}, has {header})")
    has_label = "label" in header
    classes = _class_ids(r["label"] for r in rows if has_label and r["label"]) if has_label else {}
    by_stem: dict[str, str] = {}
    for path in _walk_files(src):
        by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    samples, seen = [], set()
    for i, r in enumerate(rows, start=2):
        if split and r.get("split") and r["split"] != split:
            continue
        try:
            stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        except ValueError:
            raise UsageError(f"{annotations}:{i}: bad time_start/time_end {r['time_start']!r}, "
                             f"{r['time_end']!r}") from None
        if stem in seen:
            continue
        seen.add(stem)
        name = r.get("label", "") if has_label else ""
        path = by_stem.get(stem)
        source = _rel(path, src) if path else (f"{name}/{stem}.mp4" if name else f"{stem}.mp4")
        samples.append(Sample(_sanitize(stem), source, path, classes.get(name, UNLABELED), name))
    return samples, sorted(classes, key=classes.get)


def csv_layout(src: str, annotations: str) -> tuple[list[Sample], list[str]]:
    header, rows = _read_csv(annotations)
    if "path" not in header:
        raise UsageError(f"{annotations}: a csv layout needs a 'path' column (and optionally 'label'), has {header}")
    names = [r.get("label", "") for r in rows]
    classes = _class_ids(n for n in names if n and n != str(UNLABELED))
    samples = []
    for r, name in zip(rows, names):
        source = r["path"].replace(os.sep, "/")
        path = os.path.join(src, source)
        labelled = name and name != str(UNLABELED)
        samples.append(Sample(make_key(source), source, path if os.path.exists(path) else None,
                              classes[name] if labelled else UNLABELED, name if labelled else ""))
    return samples, sorted(classes, key=classes.get)


def _split_filter(split_files: list[str], split: str | None) -> set[str]:
    """Relative paths (or bare file names, for HMDB51) selected by the split files."""
    files = []
    for pattern in split_files:
        if os.path.isdir(pattern):
            files += sorted(glob.glob(os.path.join(pattern, "*.txt")))
        else:
            found = sorted(glob.glob(pattern))
            if not found:
                raise UsageError(f"--split-file {pattern}: no such file")
            files += found
    selected = set()
    for path in files:
        hmdb = re.search(r"_test_split\d+\.txt$", os.path.basename(path))
        if hmdb and split not in ("train", "test"):
            raise UsageError(f"{path}: an HMDB51 split file needs --split train|test")
        want = {"train": "1", "test": "2"}.get(split or "")
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if hmdb:
                    if len(parts) >= 2 and parts[1] == want:
                        selected.add(parts[0])
                else:  # UCF101: "Class/v_Class_g08_c01.avi [label]"
                    selected.add(parts[0].replace("\\", "/"))
    return selected


def folders(src: str, split_files: list[str] | None = None, split: str | None = None,
            ignored: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    entries = sorted(e for e in os.listdir(src) if not e.startswith("."))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(src, e))]
    classes = _class_ids(class_dirs)
    wanted = _split_filter(split_files, split) if split_files else None
    samples = []
    for path in _walk_files(src, ignored):
        source = _rel(path, src)
        top = source.split("/", 1)[0]
        if wanted is not None and source not in wanted and os.path.basename(source) not in wanted:
            continue
        if "/" in source:
            samples.append(Sample(make_key(source), source, path, classes[top], top))
        else:
            samples.append(Sample(make_key(source), source, path, UNLABELED, ""))
    if wanted is not None:  # listed in a split file but absent: reported, not dropped
        found = {s.source for s in samples} | {os.path.basename(s.source) for s in samples}
        for rel in sorted(wanted - found):
            top = rel.split("/", 1)[0] if "/" in rel else ""
            samples.append(Sample(make_key(rel), rel, None, classes.get(top, UNLABELED), top if top in classes else ""))
    return samples, sorted(classes, key=classes.get)


VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts"}


def _video_files(src: str) -> dict[str, list[str]]:
    """Video files under SRC by stem (case kept), for finding ``{video_id}.{ext}``."""
    by_stem: dict[str, list[str]] = {}
    for path in _walk_files(src):
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() in VIDEO_EXTS:
            by_stem.setdefault(stem, []).append(path)
    return by_stem


def events_layout(src: str, layout: str, annotations: str, proposals: str | None = None,
                  labelmap: str | None = None, exclusions: str | None = None, time_offset: float = 0.0,
                  margin: float = 32 / 30) -> tuple[list[Sample], EventVideos]:
    """One sample per annotated video, packed over the span its events need
    (AVA: the first keyframe to the last, ``margin`` seconds beyond each;
    EPIC: from the video's start to the last segment's end plus ``margin``),
    and the events of each. ``time_offset``: the annotations' time of the
    sources' first frame (900 for the 15-minute AVA cuts)."""
    from shard_tools import annotations as ann
    if layout == "ava":
        read = ann.read_ava(annotations, proposals, labelmap, exclusions)
    else:
        if proposals or labelmap or exclusions:
            raise UsageError("--proposals, --labelmap and --exclusions are AVA's (--layout ava)")
        read = ann.read_epic(annotations)
    files = _video_files(src)
    samples, videos = [], {}
    for video_id, events in sorted(read.events.items()):
        participant = read.participants.get(video_id, "")
        found = files.get(video_id, [])
        if len(found) > 1 and participant:  # EPIC: {participant_id}/{video_id}.MP4 first
            found = [p for p in found if os.path.basename(os.path.dirname(p)) == participant] or found
        if len(found) > 1:
            raise UsageError(f"two videos for {video_id} under {src}: {_rel(found[0], src)} and {_rel(found[1], src)}")
        path = found[0] if found else None
        source = _rel(path, src) if path else (f"{participant}/{video_id}" if participant else video_id)
        if layout == "ava":
            first, last = min(e["time"] for e in events), max(e["time"] for e in events)
        else:
            first, last = time_offset, max(e["stop"] for e in events)
        span = (max(0.0, first - margin - time_offset), last + margin - time_offset)
        key = make_key(source if path else video_id)
        samples.append(Sample(key, source, path, UNLABELED, "", span))
        videos[key] = {"video_id": video_id, "participant_id": participant, "events": events,
                       "lines": read.lines.get(video_id, [])}
    return samples, EventVideos(layout, videos, read.bad, read.info, time_offset)


def detect_layout(src: str, annotations: str | None) -> str:
    if annotations:
        header, _ = _read_csv(annotations)
        return "kinetics" if "youtube_id" in header else "csv"
    return "folders"


def discover(src: str, layout: str = "auto", annotations: str | None = None,
             split_files: list[str] | None = None, split: str | None = None,
             ignored: list[str] | None = None) -> tuple[str, list[Sample], list[str]]:
    """Return (layout, samples, class names) for SRC; documents found beside the
    videos (README.md, ...) are listed in ``ignored``."""
    if not os.path.isdir(src):
        raise UsageError(f"SRC {src} is not a folder")
    if layout == "auto":
        layout = detect_layout(src, annotations)
    if layout in ("kinetics", "csv") and not annotations:
        raise UsageError(f"--layout {layout} needs --annotations FILE.csv")
    if layout == "kinetics":
        samples, classes = kinetics(src, annotations, split)
    elif layout == "csv":
        samples, classes = csv_layout(src, annotations)
    elif layout == "folders":
        samples, classes = folders(src, split_files, split, ignored)
    else:
        raise UsageError(f"unknown --layout {layout}")
    keys = {}
    for s in samples:
        if s.key in keys:
            raise UsageError(f"two inputs map to the key {s.key}: {keys[s.key]} and {s.source}")
        keys[s.key] = s.source
    return layout, samples, classes
