"""Convert packed shards (or the videos make_shards takes) into an FFCV dataset.

    python -m shard_tools.make_ffcv SHARDS OUT.beton [--quality 90] [--workers N]
    python -m shard_tools.make_ffcv SRC OUT.beton [make_shards options: --fps, --short-side, --layout, ...]

Each video becomes one sample with three fields (the format is defined with
its reader in :mod:`loaders.ffcv`): ``video``, its frames as JPEGs with an
offset table so a loader decodes only the frames a clip needs; ``label``; and
``index``, the video's position in the shards' manifest (the memory-bank row,
the same number the other backends yield). Frames are those of the shards:
the same constant fps and short side, frame k of the shard = frame k here.

Given a folder of videos instead of shards, make_shards packs them first
(lossless H.264, ``--crf 0``, in a temporary folder beside OUT) with the
options given, so fps, short side, layouts, split files and failure reasons
are make_shards' own.

Videos that cannot be converted are logged and written to
``OUT.failed.jsonl`` (source, key, reason) and never reach the .beton: an
exception inside FFCV's writer workers would hang it. Exit code 0: all
converted, 3: some failed, 2: usage error.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from tqdm import tqdm

from loaders.system import atomic, cores
from shard_tools.make_shards import EXIT_FAILED, EXIT_OK
from shard_tools.make_shards import pack as make_shards_pack
from vthcl import options
from vthcl.options import UsageError

log = logging.getLogger(__name__)

MIN_PAGE = 2 << 20  # FFCV's smallest page; a sample must fit in one page
# make_shards' options that apply to a folder of videos packed on the way (a part of a dataset does not)
PACK_OPTIONS = tuple(n for n in options.PACK.names if n not in ("part", "parts"))

CLI = options.command(
    "shard_tools.make_ffcv", __doc__, ["quality", "workers", "seed", *PACK_OPTIONS],
    positionals=[options.Positional("src", "make_shards output (folder or manifest.json), or a folder of videos",
                                    "SHARDS"),
                 options.Positional("out", "the FFCV dataset to write", "OUT.beton")])


def _is_shards(src: str) -> bool:
    return (src.endswith(".json") and os.path.isfile(src)) or os.path.isfile(os.path.join(src, "manifest.json"))


def _members(shards):
    """Every sample as webdataset's dict (``__key__``, ``__url__``, one entry
    per member), in manifest order."""
    import webdataset as wds
    return wds.DataPipeline(wds.SimpleShardList(shards.tars), wds.tarfile_to_samples())


def _convert(task):
    """One sample -> (info, blob) or (info, reason). Runs in a worker."""
    sample, quality = task
    import av
    import cv2

    from loaders.ffcv import pack_frames
    cv2.setNumThreads(1)
    key = sample.get("__key__", "?")
    info = {"key": key, "source": sample.get("__url__", "")}
    try:
        meta = json.loads(sample["json"])
        info.update(source=meta.get("source", info["source"]), index=int(meta["index"]),
                    label=int(meta.get("label", -1)), fps=float(meta["fps"]))
        want = int(meta["num_frames"])
        member = next((sample[e] for e in ("mp4", "webm", "mkv", "avi", "mov") if e in sample), None)
        if member is None:
            raise ValueError("no video member in the shard sample")
        jpegs = []
        with av.open(io.BytesIO(member)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                       [int(cv2.IMWRITE_JPEG_QUALITY), quality])
                if not ok:
                    raise ValueError(f"JPEG encoding failed at frame {len(jpegs)}")
                jpegs.append(buf.tobytes())
                if len(jpegs) == want:
                    break
        if len(jpegs) < want:
            raise ValueError(f"corrupt: decoded {len(jpegs)} of the {want} frames the shard declares")
        info.update(num_frames=want, height=rgb.shape[0], width=rgb.shape[1])
        return info, pack_frames(jpegs)
    except Exception as e:  # reported and skipped, never fatal to the other videos
        return info, f"{type(e).__name__}: {e}"


class _Spool:
    """The converted blobs on disk, indexable for FFCV's writer workers."""

    def __init__(self, path: str, records: list[dict]):
        self.path, self.records, self.data = path, records, None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if self.data is None:
            self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        r = self.records[i]
        blob = np.asarray(self.data[r["offset"]:r["offset"] + r["size"]])
        return ((blob, r["num_frames"], r["height"], r["width"], r["index"], r["fps"]), r["label"], r["index"])


def _page_size(largest: int) -> int:
    """A power of two holding four of the largest videos: a sample never spans
    pages, so the space a page leaves unused stays under a quarter."""
    page = MIN_PAGE
    while page < 4 * largest:
        page *= 2
    return page


def convert(shards_src: str, out: str, quality: int, workers: int, quiet: bool, failed: list[dict]) -> int:
    """Convert packed shards to ``out``; returns the number of videos written."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    from loaders.ffcv import JPEGVideoField
    from loaders.shards import resolve_shards
    shards = resolve_shards(shards_src)
    spool_path, records = out + ".spool", []
    tasks = ((s, quality) for s in _members(shards))
    pool = None if workers == 0 else multiprocessing.get_context("spawn").Pool(workers)
    results = map(_convert, tasks) if pool is None else pool.imap(_convert, tasks, chunksize=1)
    bar = tqdm(total=shards.total, unit="video", disable=quiet, dynamic_ncols=True, mininterval=0.5)
    try:
        with open(spool_path, "wb") as spool:
            for info, blob in results:
                if isinstance(blob, str):
                    failed.append({"source": info["source"], "key": info["key"], "reason": blob})
                    log.warning(f"failed: {info['source']}: {blob}")
                else:
                    records.append({**info, "offset": spool.tell(), "size": int(blob.size)})
                    spool.write(blob.tobytes())
                bar.update(1)
        bar.close()
        if pool is not None:
            pool.close()
        if records:
            fields = {"video": JPEGVideoField(), "label": IntField(), "index": IntField()}
            with atomic(out) as tmp:
                writer = DatasetWriter(str(tmp), fields, page_size=_page_size(max(r["size"] for r in records)),
                                       num_workers=1)
                writer.from_indexed_dataset(_Spool(spool_path, records))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if os.path.exists(spool_path):
            os.remove(spool_path)
    return len(records)


def make(src: str, out: str, **values) -> dict:
    """Convert ``src`` (shards, or a folder of videos that make_shards packs
    first with the pack options given) into the FFCV dataset ``out``
    (``*.beton``); videos that fail go to ``OUT.failed.jsonl``. Options: those
    of ``python -m shard_tools.make_ffcv --help``. Returns ``{"written",
    "failed", "failed_path", "out"}``; nothing is written when no video
    converts."""
    cfg = options.resolve("shard_tools.make_ffcv", src=src, out=out, **values)
    if not 1 <= cfg.quality <= 100:
        raise UsageError("--quality must be in 1..100")
    if not cfg.out.endswith(".beton"):
        raise UsageError(f"{cfg.out}: the output name must end in .beton")
    out = os.path.abspath(cfg.out)
    workers = cores() if cfg.workers is None else cfg.workers
    pack = [n for n in (*PACK_OPTIONS, "seed") if n in cfg.given]
    failed: list[dict] = []
    src, packed = cfg.src, None
    if not _is_shards(src):
        if not os.path.isdir(src):
            raise UsageError(f"{src}: neither shards (no manifest.json) nor a folder of videos")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        packed = src = out + ".shards"
        shutil.rmtree(packed, ignore_errors=True)
        values = {n: getattr(cfg, n) for n in pack}
        values.setdefault("crf", 0)  # the frames become JPEGs next: pack them losslessly unless told
        try:
            make_shards_pack(cfg.src, packed, workers=workers, quiet=cfg.quiet, **values)
        except UsageError:
            shutil.rmtree(packed, ignore_errors=True)
            raise
        with open(os.path.join(packed, "failed.jsonl"), encoding="utf-8") as f:
            failed.extend(json.loads(line) for line in f if line.strip())
    elif pack:
        raise UsageError(f"make_shards options ({', '.join(options.OPTIONS[n].flag for n in pack)}) apply to a "
                         "folder of videos, not to shards")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        written = convert(src, out, cfg.quality, workers, cfg.quiet, failed)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    finally:
        if packed:
            shutil.rmtree(packed, ignore_errors=True)
    failed_path = out[:-len(".beton")] + ".failed.jsonl"
    with open(failed_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in failed)
    return {"written": written, "failed": len(failed), "failed_path": failed_path, "out": out}


def _job(cfg: options.Config) -> int:
    r = make(**options.kwargs(cfg))
    if not r["written"]:
        log.error(f"no video could be converted (see {r['failed_path']}); {r['out']} not written")
        return EXIT_FAILED
    print(f"{r['written']} converted, {r['failed']} failed (see {r['failed_path']})")
    return EXIT_FAILED if r["failed"] else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return options.cli("shard_tools.make_ffcv", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
