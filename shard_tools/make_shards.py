"""Pack Kinetics, UCF101, HMDB51 or any folder of videos into WebDataset shards.

    python shard_tools/make_shards.py SRC OUT [options]
    python -m shard_tools.make_shards SRC OUT [options]

Every input video is transcoded in a worker process to a constant frame rate,
a fixed short side and closed GOPs (or copied as it is with ``--codec copy``)
and written with ``webdataset.TarWriter`` as one sample of ``OUT/{prefix}-NNNNNN.tar``:

=================  ==========================================================
``KEY.mp4``        the video: a fragmented MP4, one fragment per GOP (H.264
                   or VP9; copy: mp4, or webm/mkv for codecs MP4 cannot hold)
``KEY.json``       label, label_name, source, num_frames, fps, width, height
                   (as shown: after the display matrix), codec, duration, key,
                   index, fragments, window_cut (and window_cut_reason where
                   it is false), orientation (what turned the frames upright),
                   sample_aspect_ratio (of the packed pixels)
``KEY.cls``        the label as ASCII (-1: unlabeled)
``KEY.nframes``    int32 little-endian: the exact number of decodable frames
``KEY.ids``        int64 little-endian ``[index, label]``: the video's position
                   in manifest order and its label, readable by DALI as numbers
``KEY.frag_bytes`` int64 little-endian [G + 1]: where each fragment starts in
                   the member, then where the last one ends
``KEY.frag_frames`` int32 little-endian [G + 1]: each fragment's first frame,
                   then num_frames (so a loader decodes a window from the
                   init segment + its fragments; see loaders/fragments.py)
=================  ==========================================================

A member whose fragments do not each decode alone (``--codec copy`` of open
GOPs) gets the one-fragment table [0, size] / [0, num_frames]: decoded
whole, ``window_cut`` false in its json, counted in the summary.

Beside each tar a DALI index ``.idx`` (the format of DALI's ``wds2idx``); in
OUT ``manifest.json``, ``classes.txt``, ``failed.jsonl`` (one line per input
that was not packed, with the reason) and ``index.npy``, the compact index
the manifest names (every sample's members, one row per sample: a rank reads
its own rows, see loaders/index.py). Exit code 0: all packed, 3: some
failed, 2: usage error.

A shard is written as ``*.tmp`` and renamed when complete; a small state file
(``OUT/.make_shards_state.json``) records complete shards and the failures that
belong to them, so ``--resume`` after a killed run keeps the complete shards
and redoes the rest, with no sample missing or duplicated.

One writer per OUT: a run holds an exclusive lock on OUT
(``OUT/.make_shards.lock``; a part its own, ``.make_shards.pIIIIofNNNN.lock``,
so parts still run side by side) from before it touches OUT until it ends. A
second run into the same OUT (or the same part) is refused at once, exit 2,
with a message naming the running one, and changes nothing. The lock is the
kernel's (``flock``, see :mod:`shard_tools.lock`): a killed run leaves none,
so ``--resume`` works after any kill.
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import random
import re
import struct
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import webdataset as wds
from tqdm import tqdm

from loaders.fragments import MEMBER_FORMAT
from loaders.system import atomic_write_text, cores
from shard_tools.lock import lock_name, writer_lock
from shard_tools.reindex import index_fields
from shard_tools.sources import EventVideos, Sample, UsageError, discover, events_layout
from shard_tools.transcode import BadVideo, EncodeSettings, transcode
from shard_tools.wds_index import write_index
from vthcl import options

log = logging.getLogger(__name__)
STATE_FILE = ".make_shards_state.json"
EXIT_OK, EXIT_USAGE, EXIT_FAILED = 0, 2, 3


CLI = options.command(
    "shard_tools.make_shards", __doc__,
    [options.PACK, "labelmap", "exclusions", "workers", "seed", "resume"],
    positionals=[options.Positional("src", "the folder with the videos", "SRC"),
                 options.Positional("out", "the folder for the shards", "OUT")])


def _work(task: tuple[Sample, EncodeSettings]):
    sample, settings = task
    if sample.path is None:
        return sample, None, None, "missing: no such video file under SRC"
    try:
        data, meta = transcode(sample.path, settings, sample.span, settings.frame_rate)
        return sample, data, meta, None
    except BadVideo as e:
        return sample, None, None, str(e)
    except Exception as e:  # anything unexpected is reported, never fatal to the run
        return sample, None, None, f"unexpected error: {type(e).__name__}: {e}"


def _mtime(path: str) -> float:
    try:
        return float(int(os.stat(path).st_mtime))
    except OSError:
        return float(int(time.time()))


@dataclass(frozen=True)
class Names:
    """The files one run writes in OUT. A part (``--part I --parts N``) has
    names of its own, so N parts can write into one OUT at the same time
    without touching each other's files: ``{prefix}-pIIIIofNNNN-000000.tar``,
    ``.make_shards_state.pIIIIofNNNN.json``, ``failed.pIIIIofNNNN.jsonl`` and
    ``manifest.pIIIIofNNNN.json``; ``python -m shard_tools.merge_parts OUT``
    then writes the dataset's own manifest."""
    prefix: str
    part: int | None = None
    parts: int | None = None

    @property
    def tag(self) -> str:
        return "" if self.part is None else f"p{self.part:04d}of{self.parts:04d}"

    @property
    def shard_prefix(self) -> str:
        return f"{self.prefix}-{self.tag}" if self.tag else self.prefix

    def _file(self, stem: str, ext: str) -> str:
        return f"{stem}.{self.tag}.{ext}" if self.tag else f"{stem}.{ext}"

    @property
    def state(self) -> str:
        return self._file(STATE_FILE[:-5], "json")

    @property
    def failed(self) -> str:
        return self._file("failed", "jsonl")

    @property
    def manifest(self) -> str:
        return self._file("manifest", "json")


INDEX_WIDTH = 12  # characters a part reserves for "index" in KEY.json, so merge_parts can renumber in place


def index_json(info: dict, reserve: bool = False) -> bytes:
    """KEY.json; ``reserve``: the "index" number followed by spaces up to
    INDEX_WIDTH characters (valid JSON), room to rewrite it in place."""
    text = json.dumps(info, ensure_ascii=False)
    if reserve:
        number = str(info["index"])
        text = text.replace(f'"index": {number}', f'"index": {number}' + " " * (INDEX_WIDTH - len(number)), 1)
    return text.encode("utf-8")


def brace_pattern(prefix: str, count: int) -> str:
    if count == 1:
        return f"{prefix}-000000.tar"
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


class ShardSet:
    """Writes samples into numbered shards and commits each atomically."""

    def __init__(self, out: str, names: Names, state: dict, max_count: int | None, max_bytes: int | None):
        self.out, self.names, self.prefix, self.state = out, names, names.shard_prefix, state
        self.max_count, self.max_bytes = max_count, max_bytes
        self.writer = None
        self.keys: list[str] = []
        self.bytes = 0
        self.pending_failed: list[dict] = []
        self.next_index = sum(s["num_samples"] for s in state["shards"])

    def _name(self, number: int) -> str:
        return f"{self.prefix}-{number:06d}"

    def _open(self):
        name = self._name(len(self.state["shards"]))
        self.tmp_tar = os.path.join(self.out, name + ".tar.tmp")
        self.writer = wds.TarWriter(self.tmp_tar, encoder=False)
        self.keys, self.bytes, self.first_index, self.whole = [], 0, self.next_index, 0

    def add(self, sample: Sample, data: bytes, meta: dict, extra: dict | None = None) -> None:
        if self.writer is not None and (
            (self.max_count and len(self.keys) >= self.max_count)
            or (self.max_bytes and self.bytes + len(data) > self.max_bytes)
        ):
            self.commit()
        if self.writer is None:
            self._open()
        index = self.next_index
        info = {"label": sample.label, "label_name": sample.label_name, "source": sample.source,
                "num_frames": meta["num_frames"], "fps": meta["fps"], "width": meta["width"],
                "height": meta["height"], "codec": meta["codec"], "duration": meta["duration"],
                "key": sample.key, "index": index, "fragments": meta["fragments"].count,
                "window_cut": meta["window_cut"], "orientation": meta["orientation"],
                "sample_aspect_ratio": meta["sample_aspect_ratio"], **(extra or {})}
        if not meta["window_cut"]:
            info["window_cut_reason"] = meta["window_cut_reason"]
            self.whole += 1
        # members carry the source's mtime, not the clock's: the same input gives the same tar
        self.writer.mtime = _mtime(sample.path)
        self.bytes += self.writer.write({
            "__key__": sample.key,
            meta["ext"]: data,
            "json": index_json(info, reserve=self.names.part is not None),
            "cls": str(sample.label).encode("ascii"),
            "nframes": struct.pack("<i", meta["num_frames"]),
            "ids": struct.pack("<qq", index, sample.label),
            **meta["fragments"].members(),
        })
        self.keys.append(sample.key)
        self.next_index += 1

    def fail(self, sample: Sample, reason: str, extra: dict | None = None) -> None:
        self.pending_failed.append({"source": sample.source, "reason": reason, "key": sample.key, **(extra or {})})

    def commit(self) -> None:
        """Close the open shard (if any), rename it into place, record it."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            name = self._name(len(self.state["shards"]))
            tar = os.path.join(self.out, name + ".tar")
            idx = os.path.join(self.out, name + ".idx")
            write_index(self.tmp_tar, idx + ".tmp")
            os.replace(idx + ".tmp", idx)
            os.replace(self.tmp_tar, tar)
            self.state["shards"].append({"path": name + ".tar", "num_samples": len(self.keys),
                                         "first_index": self.first_index, "keys": self.keys,
                                         "whole_member": self.whole})
        self.state["failed"].extend(self.pending_failed)
        self.pending_failed = []
        save_state(self.out, self.state, self.names)


def save_state(out: str, state: dict, names: Names) -> None:
    atomic_write_text(os.path.join(out, names.state), json.dumps(state))
    atomic_write_text(os.path.join(out, names.failed),
                      "".join(json.dumps({k: v for k, v in f.items() if k != "key"}, ensure_ascii=False) + "\n"
                              for f in state.get("bad_rows", []) + state["failed"]))


def _our_files(out: str, prefix: str) -> list[str]:
    pat = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.(tar|idx)(\.tmp)?$")
    return sorted(f for f in os.listdir(out) if pat.match(f))


def prepare_out(out: str, names: Names, run_config: dict, resume: bool) -> dict:
    """Create OUT, or on --resume load its state and remove incomplete files
    (this run's own: other parts writing into OUT are left alone)."""
    os.makedirs(out, exist_ok=True)
    prefix = names.shard_prefix
    state_path = os.path.join(out, names.state)
    merged = os.path.join(out, "manifest.json")
    if names.part is not None and os.path.exists(merged):
        with open(merged, encoding="utf-8") as f:
            if json.load(f).get("parts"):
                raise UsageError(f"{out} holds a dataset merged from its parts (manifest.json): pack into another "
                                 "folder")
    if not resume:
        if os.path.exists(state_path) or _our_files(out, prefix):
            raise UsageError(f"{out} already holds shards from an earlier run: add --resume to continue it, "
                             "or choose an empty folder")
        return {"version": 1, "config": run_config, "shards": [], "failed": [], "complete": False}
    if not os.path.exists(state_path):
        for f in _our_files(out, prefix):  # a run killed before its first shard
            os.remove(os.path.join(out, f))
        return {"version": 1, "config": run_config, "shards": [], "failed": [], "complete": False}
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    if state["config"] != run_config:
        changed = sorted(k for k in set(state["config"]) | set(run_config)
                         if state["config"].get(k) != run_config.get(k))
        raise UsageError(f"--resume with different settings than the run in {out} ({', '.join(changed)})")
    keep = {s["path"] for s in state["shards"]} | {s["path"][:-4] + ".idx" for s in state["shards"]}
    for f in _our_files(out, prefix):
        if f not in keep:
            os.remove(os.path.join(out, f))
    own = (names.state, names.failed, names.manifest)
    for f in os.listdir(out):
        if f.endswith(".tmp") and f[:-4] in own:
            os.remove(os.path.join(out, f))
    return state


EVENTS_FILE = "events.jsonl"


def events_name(names: Names) -> str:
    """EVENTS_FILE, or a part's own."""
    return names._file("events", "jsonl")


def write_events(out: str, names: Names, state: dict, plan: EventVideos) -> dict:
    """``events.jsonl``: one line per event of a packed video, ordered by the
    video's manifest index, then time, then annotation line; each with its row
    number ``event``, the video's ``index``, ``key`` and ``video_id``. Returns
    what the manifest says of them."""
    packed = {}
    for shard in state["shards"]:
        for k, key in enumerate(shard["keys"]):
            packed[key] = shard["first_index"] + k
    lines = []
    for key in sorted(packed, key=packed.get):
        video = plan.videos.get(key)
        if video is None:
            raise RuntimeError(f"{key} was packed but its events are not in the annotations any more")
        for event in video["events"]:
            row = {"event": len(lines), "index": packed[key], "key": key, "video_id": video["video_id"]}
            if video["participant_id"]:
                row["participant_id"] = video["participant_id"]
            lines.append(json.dumps({**row, **event}, ensure_ascii=False))
    atomic_write_text(os.path.join(out, events_name(names)), "".join(line + "\n" for line in lines))
    return {"task": plan.task, "events": len(lines), "events_file": events_name(names),
            "event_info": {"time_offset": plan.time_offset, **plan.info}}


def write_outputs(out: str, names: Names, state: dict, classes: list[str], settings: dict,
                  plan: EventVideos | None = None) -> None:
    shards = [{"path": s["path"], "num_samples": s["num_samples"], "first_index": s["first_index"]}
              for s in state["shards"]]
    manifest = {
        "shards": shards,
        "total_samples": sum(s["num_samples"] for s in shards),
        "classes": classes,
        "settings": settings,
        "pattern": brace_pattern(names.shard_prefix, len(shards)) if shards else None,
        "failed": len(state["failed"]) + len(state.get("bad_rows", [])),
        "member_format": MEMBER_FORMAT,
        "whole_member_samples": sum(s["whole_member"] for s in state["shards"]),
    }
    if plan is not None:
        manifest.update(write_events(out, names, state, plan))
    if names.part is not None:  # a part's own manifest (indices local to the part) for merge_parts
        manifest.update(part=names.part, parts=names.parts, inputs=state["inputs"], complete=state["complete"])
    else:
        atomic_write_text(os.path.join(out, "classes.txt"), "".join(c + "\n" for c in classes))
        if shards:  # the compact index a rank reads its rows from (a part's rows are merge_parts' to write)
            manifest.update(index_fields(out, manifest))
    atomic_write_text(os.path.join(out, names.manifest), json.dumps(manifest, indent=1, ensure_ascii=False))


def _event_json(plan: EventVideos | None, sample: Sample, meta: dict) -> dict | None:
    """KEY.json's fields of a long-video member: its video id, the span packed
    (seconds of the source) and ``time_start``, the annotations' time of its
    frame 0 (frame k shows time_start + k / fps)."""
    if plan is None:
        return None
    return {"video_id": plan.videos[sample.key]["video_id"], "span": meta["span"],
            "time_start": meta["span"][0] + plan.time_offset}


def _event_failure(plan: EventVideos | None, sample: Sample) -> dict | None:
    """What a failed long video takes down: its annotation file and the lines of its events."""
    if plan is None:
        return None
    video = plan.videos[sample.key]
    return {"video_id": video["video_id"], "annotations": plan.info["annotations"], "lines": video["lines"]}


def pack(src, out, **values) -> dict:
    """Pack the videos under ``src`` into shards in ``out`` with the options
    of ``shard_tools.make_shards`` (``options.resolve`` checks them; bad
    options or input raise UsageError). Returns ``{"packed", "failed",
    "whole", "failed_path", "manifest", "part", "parts"}``; the inputs that
    could not be packed are in ``failed_path``."""
    cfg = options.resolve("shard_tools.make_shards", src=src, out=out, **values)
    with contextlib.ExitStack() as held:  # OUT's writer lock, taken before OUT is touched, until the end
        return _pack(cfg, held)


def _pack(args: options.Config, held: contextlib.ExitStack) -> dict:
    if args.codec == "copy" and (args.fps is not None or args.short_side is not None):
        raise UsageError("--codec copy keeps the stream as it is: it cannot honour --fps or --short-side")
    for name in ("gop", "min_frames", "samples_per_shard", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.fps is not None and args.fps <= 0:
        raise UsageError("--fps must be positive")
    if args.frame_rate is not None and args.frame_rate <= 0:
        raise UsageError("--frame-rate must be positive")
    if args.bframes is not None and (args.codec != "h264" or args.bframes < 0):
        raise UsageError("--bframes is a count (0 or more) for --codec h264")
    if args.b_refs and args.codec != "h264":
        raise UsageError("--b-refs is an x264 option (--codec h264)")
    if args.square_pixels and args.codec == "copy":
        raise UsageError("--codec copy keeps the stream as it is: it cannot honour --square-pixels")
    if (args.part is None) != (args.parts is None) or (args.parts is not None and not 0 <= args.part < args.parts):
        raise UsageError("--part I --parts N go together, with 0 <= I < N")
    if args.samples_per_shard is not None and args.shard_size is not None:
        raise UsageError("--samples-per-shard and --shard-size: give one of them")
    names = Names(args.prefix, args.part, args.parts)
    workers = cores() if args.workers is None else args.workers
    copy = args.codec == "copy"
    settings = EncodeSettings(
        codec=args.codec,
        fps=None if copy else (args.fps or 30.0),
        short_side=None if copy else (256 if args.short_side is None else args.short_side),
        gop=args.gop, crf=args.crf, preset=args.x264_preset, bframes=args.bframes, b_refs=args.b_refs,
        threads=max(1, cores() // max(1, workers)), min_frames=args.min_frames, square_pixels=args.square_pixels,
        frame_rate=args.frame_rate)
    ignored: list[str] = []
    plan = None
    if args.layout in ("ava", "epic"):
        if not args.annotations:
            raise UsageError(f"--layout {args.layout} needs --annotations FILE.csv")
        if copy:
            raise UsageError(f"--layout {args.layout} packs the span its events need, which --codec copy cannot")
        margin = args.margin if args.margin is not None else 32 / settings.fps
        if margin < 0:
            raise UsageError("--margin must be 0 or more")
        samples, plan = events_layout(args.src, args.layout, args.annotations, args.proposals, args.labelmap,
                                      args.exclusions, args.time_offset, margin)
        layout, classes = args.layout, []
    else:
        if args.proposals or args.labelmap or args.exclusions or args.time_offset or args.margin is not None:
            raise UsageError("--proposals, --labelmap, --exclusions, --time-offset and --margin are for "
                             "--layout ava/epic")
        layout, samples, classes = discover(args.src, args.layout, args.annotations, args.split_file, args.split,
                                            ignored)
    if ignored:
        shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        log.warning("not videos, left out: %d file(s) (%s)", len(ignored), shown)
    if args.unlabeled:
        samples = [Sample(s.key, s.source, s.path, -1, "", s.span) for s in samples]
        classes = []
    if not samples and not (plan and plan.bad):
        raise UsageError(f"no videos found under {args.src} (layout {layout})")
    recorded = {k: v for k, v in settings.as_dict().items()  # (unset options are left out, as before they existed)
                if k != "threads" and not (k in ("bframes", "frame_rate") and v is None)
                and not (k == "square_pixels" and not v)}
    max_bytes = args.shard_size or (None if args.samples_per_shard else options.parse_size("1GB"))
    run_config = {**recorded, "member_format": MEMBER_FORMAT, "layout": layout, "src": os.path.abspath(args.src),
                  "seed": args.seed,
                  "samples_per_shard": args.samples_per_shard, "shard_size": max_bytes,
                  "annotations": args.annotations, "split": args.split, "split_file": args.split_file,
                  "unlabeled": args.unlabeled, "prefix": args.prefix}
    if plan is not None:
        run_config.update(proposals=args.proposals, labelmap=args.labelmap, exclusions=args.exclusions,
                          time_offset=args.time_offset, margin=margin)
    if names.part is not None:  # (a single run's config stays what it was before parts)
        run_config.update(parts=args.parts, part=args.part)
    held.enter_context(writer_lock(args.out, lock_name(names.tag)))  # before prepare_out touches OUT
    state = prepare_out(args.out, names, run_config, args.resume)
    if plan is not None and not args.part:  # the rows no video can take: reported once (by part 0)
        state["bad_rows"] = plan.bad

    # every run (every part) orders all inputs the same way; a part takes its contiguous block of that order
    order = sorted(samples, key=lambda s: s.key)
    random.Random(args.seed).shuffle(order)
    if names.part is not None:
        order = order[len(order) * args.part // args.parts:len(order) * (args.part + 1) // args.parts]
    state["inputs"] = len(order)
    done = {k for s in state["shards"] for k in s["keys"]} | {f["key"] for f in state["failed"]}
    todo = [s for s in order if s.key not in done]
    shards = ShardSet(args.out, names, state, args.samples_per_shard, max_bytes)
    failed_before = len(state["failed"])
    bar = tqdm(total=len(todo), unit="video", disable=args.quiet, dynamic_ncols=True, mininterval=0.5)
    tasks = [(s, settings) for s in todo]
    if workers == 0:
        results = map(_work, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_work, tasks, chunksize=1)
    try:
        for sample, data, meta, reason in results:
            if reason is None:
                shards.add(sample, data, meta, _event_json(plan, sample, meta))
                if not meta["window_cut"]:
                    log.warning("decoded whole, not cut to its windows: %s: %s", sample.source,
                                meta["window_cut_reason"])
            else:
                shards.fail(sample, reason, _event_failure(plan, sample))
                log.warning("failed: %s: %s", sample.source, reason)
            bar.update(1)
            bar.set_postfix(failed=len(shards.pending_failed) + len(state["failed"]) - failed_before)
        shards.commit()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    state["complete"] = True
    save_state(args.out, state, names)
    manifest_settings = {**recorded, "layout": layout, "seed": args.seed, "prefix": args.prefix}
    write_outputs(args.out, names, state, classes, manifest_settings, plan)
    return {"packed": sum(s["num_samples"] for s in state["shards"]),
            "failed": len(state["failed"]) + len(state.get("bad_rows", [])),
            "whole": sum(s["whole_member"] for s in state["shards"]),
            "failed_path": os.path.join(args.out, names.failed), "manifest": os.path.join(args.out, names.manifest),
            "part": args.part, "parts": args.parts}


def summary(result: dict) -> str:
    """The one line a run ends with: packed, failed (and where they are said), decoded whole."""
    part = f"part {result['part']} of {result['parts']}: " if result["part"] is not None else ""
    cut = (f"; {result['whole']} of them decoded whole, not cut to their windows (window_cut_reason in their json)"
           if result["whole"] else "")
    return f"{part}{result['packed']} packed, {result['failed']} failed (see {result['failed_path']}){cut}"


def _job(cfg: options.Config) -> int:
    result = pack(**options.kwargs(cfg))
    print(summary(result))
    return EXIT_FAILED if result["failed"] else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return options.cli("shard_tools.make_shards", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
