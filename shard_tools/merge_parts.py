"""Merge the parts of a dataset packed by N machines into one, as if one had packed it.

    python -m shard_tools.merge_parts OUT

``make_shards SRC OUT --part I --parts N`` (I = 0 .. N-1, on any machines,
at the same time, into one shared OUT) orders all inputs the same way in
every part and packs part I's contiguous block of that order into files of
its own (see :class:`shard_tools.make_shards.Names`). When every part is
complete, this writes what a single run writes:

- the shards renamed in part order to ``{prefix}-000000.tar`` ... (their
  ``.idx`` beside them, unchanged: renaming moves no byte);
- every sample's ``index`` (``KEY.ids`` and ``KEY.json``) rewritten in place
  to its position in manifest order: the videos a single run would have
  packed, numbered as it would have numbered them. A failed input gets no
  index (as in a single run), so there are no holes: bank rows 0 .. n-1 are
  all videos, and no negative is ever drawn from a row without one;
- ``manifest.json`` (shards, totals, classes, settings, pattern, ``parts``),
  ``classes.txt``, ``failed.jsonl`` (every part's reports, in order) and
  ``index.npy``, the compact index the manifest names (loaders/index.py).

Each step can be redone: a merge that was killed is finished by running it
again (indices are written, not added; a shard already renamed is found by
its new name). The video members are never touched.

A merge holds every writer's lock of OUT (:func:`shard_tools.lock.dataset_lock`:
each part's and the dataset's own) while it runs, so it is refused (exit 2,
naming the running writer) while any part is still being packed, and a
part run again meanwhile (or a second merge) is refused in turn.
"""
from __future__ import annotations

import glob
import json
import os
import re
import struct
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loaders.system import atomic_write_text
from shard_tools.lock import dataset_lock
from shard_tools.make_shards import (
    EVENTS_FILE,
    EXIT_FAILED,
    EXIT_OK,
    INDEX_WIDTH,
    MEMBER_FORMAT,
    Names,
    brace_pattern,
    events_name,
)
from shard_tools.reindex import index_fields
from shard_tools.sources import UsageError
from vthcl import options

CLI = options.command("shard_tools.merge_parts", __doc__,
                      positionals=[options.Positional("out", "the folder the parts were packed into", "OUT")])
_PART = re.compile(r"^manifest\.p(\d{4})of(\d{4})\.json$")


def _parts(out: str) -> list[dict]:
    """The part manifests in OUT, checked: parts 0 .. N-1 of one run, all complete, with one set of settings."""
    found = {}
    for path in glob.glob(os.path.join(out, "manifest.p*of*.json")):
        m = _PART.match(os.path.basename(path))
        if m:
            with open(path, encoding="utf-8") as f:
                found[(int(m.group(1)), int(m.group(2)))] = json.load(f)
    if not found:
        raise UsageError(f"{out} holds no part manifests (manifest.pIIIIofNNNN.json): nothing to merge")
    counts = {n for _, n in found}
    if len(counts) > 1:
        raise UsageError(f"{out} holds parts of runs with different --parts ({sorted(counts)})")
    n = counts.pop()
    missing = [i for i in range(n) if (i, n) not in found]
    incomplete = [i for i in range(n) if (i, n) in found and not found[(i, n)].get("complete")]
    if missing or incomplete:
        raise UsageError(f"{out}: parts not done yet: {', '.join(map(str, missing + incomplete))} of {n} "
                         "(run make_shards --part I --parts N for each, --resume after a kill)")
    parts = [found[(i, n)] for i in range(n)]
    for p in parts[1:]:
        if p["settings"] != parts[0]["settings"] or p["classes"] != parts[0]["classes"]:
            raise UsageError(f"{out}: part {p['part']} was packed with other settings or classes than part 0")
    return parts


def _members(idx_path: str) -> list[dict[str, tuple[int, int]]]:
    """Per sample of a shard, in order: {ext: (data offset, size)} from its DALI index."""
    with open(idx_path, encoding="utf-8") as f:
        f.readline()
        out = []
        for line in f:
            parts = line.split()
            out.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)})
    return out


def _renumber(tar: str, idx: str, first: int) -> int:
    """Write index ``first`` + k into the k-th sample's KEY.ids and KEY.json, in place; returns the count."""
    samples = _members(idx)
    with open(tar, "r+b") as f:
        for k, members in enumerate(samples):
            index = first + k
            offset, size = members["ids"]
            f.seek(offset)
            _, label = struct.unpack("<qq", f.read(size))
            f.seek(offset)
            f.write(struct.pack("<qq", index, label))
            offset, size = members["json"]
            f.seek(offset)
            text = f.read(size).decode("utf-8")
            m = re.search(r'"index": \d+ *', text)
            new = f'"index": {index}'.ljust(len('"index": ') + INDEX_WIDTH)
            if m is None or len(m.group(0)) != len(new):
                raise UsageError(f"{tar}: sample {k}'s json has no room for its index (was it packed by a part?)")
            f.seek(offset)
            f.write((text[:m.start()] + new + text[m.end():]).encode("utf-8"))
    return len(samples)


def _events(out: str, names: Names, first_index: int, first_event: int) -> list[str]:
    """A part's events.jsonl lines with the video indices and event numbers of the merged dataset."""
    lines = []
    with open(os.path.join(out, events_name(names)), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                event = json.loads(line)
                event["event"] = first_event + len(lines)
                event["index"] += first_index
                lines.append(json.dumps(event, ensure_ascii=False))
    return lines


def merge(out: str) -> dict:
    """Merge OUT's parts (holding every writer's lock of OUT); returns the manifest written."""
    with dataset_lock(out):
        return _merge(out)


def _merge(out: str) -> dict:
    parts = _parts(out)
    prefix = parts[0]["settings"]["prefix"]
    shards, failed, events, index = [], [], [], 0
    for p in parts:
        names = Names(prefix, p["part"], p["parts"])
        if "task" in p:
            events += _events(out, names, index, len(events))
        for s in p["shards"]:
            src = os.path.join(out, s["path"])
            dst_name = f"{prefix}-{len(shards):06d}.tar"
            dst = os.path.join(out, dst_name)
            for a, b in ((src, dst), (src[:-4] + ".idx", dst[:-4] + ".idx")):
                if os.path.exists(a):
                    os.replace(a, b)
                elif not os.path.exists(b):
                    raise UsageError(f"{out}: {os.path.basename(a)} is missing (and not yet merged as "
                                     f"{os.path.basename(b)})")
            count = _renumber(dst, dst[:-4] + ".idx", index)
            if count != s["num_samples"]:
                raise UsageError(f"{dst}: {count} samples, its part's manifest says {s['num_samples']}")
            shards.append({"path": dst_name, "num_samples": count, "first_index": index})
            index += count
        with open(os.path.join(out, names.failed), encoding="utf-8") as f:
            failed += [line for line in f.read().splitlines() if line.strip()]
    classes = parts[0]["classes"]
    manifest = {
        "shards": shards, "total_samples": index, "classes": classes, "settings": parts[0]["settings"],
        "pattern": brace_pattern(prefix, len(shards)) if shards else None, "failed": len(failed),
        "member_format": MEMBER_FORMAT, "whole_member_samples": sum(p["whole_member_samples"] for p in parts),
        "parts": len(parts), "inputs": sum(p["inputs"] for p in parts),
    }
    if "task" in parts[0]:
        manifest.update(task=parts[0]["task"], events=len(events), events_file=EVENTS_FILE,
                        event_info=parts[0]["event_info"])
        atomic_write_text(os.path.join(out, EVENTS_FILE), "".join(line + "\n" for line in events))
    atomic_write_text(os.path.join(out, "failed.jsonl"), "".join(line + "\n" for line in failed))
    atomic_write_text(os.path.join(out, "classes.txt"), "".join(c + "\n" for c in classes))
    if shards:
        manifest.update(index_fields(out, manifest))
    atomic_write_text(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def report(manifest: dict, out: str) -> int:
    """A merged dataset's line on stdout (packed, failed, parts) and the exit code it makes."""
    print(f"{manifest['total_samples']} packed, {manifest['failed']} failed, from {manifest['parts']} parts "
          f"(see {os.path.join(out, 'failed.jsonl')})")
    return EXIT_FAILED if manifest["failed"] else EXIT_OK


def _job(cfg: options.Config) -> int:
    return report(merge(cfg.out), cfg.out)


def main(argv: list[str] | None = None) -> int:
    return options.cli("shard_tools.merge_parts", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
