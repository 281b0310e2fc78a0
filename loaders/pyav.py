"""The PyAV backend: a webdataset pipeline decoding clips on CPU workers.

Stages (one readable pipeline, webdataset-style), for a video dataset::

    this rank's samples (contiguous manifest ranges; their byte ranges from
      their rows of the compact index, loaders/index.py)
      -> chunks of consecutive samples, shuffled           (train)
      -> split by DataLoader worker
      -> tar byte ranges -> webdataset tar expander -> group by key
      -> shuffle buffer before decoding                   (train)
      -> the sampler's views (loaders.sampling): frame ids and crops
      -> decode only the window: the member cut to the fragments that hold
         it (KEY.frag_bytes/frag_frames; older shards: a seek to the keyframe
         before it), decoded to its last frame, skipping disposable frames
         it does not keep; convert only the frames kept
      -> RGB at the decoded size (swscale, no scaling) per kept frame, a
         uint8 bilinear resize (torch) of only the window the crop reads,
         crop, flip
         (uint8 to the main process)
    main process: batch -> float, normalised clip by clip (CPU), or
        pinned memory -> device -> float, normalise (GPU); an event
        dataset's fields (loaders.events)

For an event dataset (long videos, one sample per event) the samples are
this rank's events, shuffled in training and split by worker; each reads
from its tar only the json, the fragment table and the bytes its window
needs (``os.pread``, :mod:`loaders.members`), then decodes as above.

Every random choice of a sample (window start, crop, flip) comes from
``(seed, epoch, sample)``, so the same sample gets the same clip in any
worker, rank, backend or run, and a resumed epoch replays exactly.
"""
from __future__ import annotations

import io
import math
import os
import random
import warnings
from dataclasses import dataclass

import av
import numpy as np
import torch
import webdataset as wds
from av.video.reformatter import VideoReformatter
from webdataset import tariterators

from loaders.base import ClipLoader
from loaders.fragments import FRAGMENT_MEMBERS, Fragments
from loaders.index import VIDEO_EXTS, distinct, index_rows
from loaders.members import MemberReader
from loaders.sampling import ClipInfo, ClipSampler, ClipSpec, Crop, sample_rng
from loaders.shards import Shards
from loaders.state import Timer


# --------------------------------------------------------------------------- byte ranges
class SampleIndex:
    """Per sample asked for (manifest positions; default: all): its tar and
    the byte range of its members — rows of the compact index
    (:mod:`loaders.index`), or of the .idx files of the tars that hold them."""

    def __init__(self, shards: Shards, positions=None):
        self.tars = shards.tars
        self.positions, rows = index_rows(shards, range(shards.total) if positions is None else positions,
                                          ("lo", "hi"))
        self.tar_id = rows["shard"].copy()
        self.lo, self.hi = rows["lo"].copy(), rows["hi"].copy()

    def __len__(self) -> int:
        return len(self.positions)

    def chunks(self, positions, max_len: int) -> list[tuple[str, int, int]]:
        """Runs of consecutive positions in one tar, at most ``max_len`` long, as (tar, byte lo, byte hi)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not len(positions):
            return []
        rows = np.searchsorted(self.positions, positions)
        if (rows >= len(self.positions)).any() or (self.positions[np.minimum(rows, len(self.positions) - 1)]
                                                   != positions).any():
            raise KeyError("positions outside this index")
        tar = self.tar_id[rows]
        starts = np.flatnonzero(np.concatenate([[True], (np.diff(positions) != 1) | (np.diff(tar) != 0)]))
        ends = np.append(starts[1:], len(positions))
        pieces = []
        for a, b in zip(starts.tolist(), ends.tolist()):
            pieces += [(k, min(k + max_len, b)) for k in range(a, b, max_len)]
        return [(self.tars[int(tar[a])], int(self.lo[rows[a]]), int(self.hi[rows[b - 1]])) for a, b in pieces]


class _Range(io.RawIOBase):
    """A read-only window [lo, hi) of a file: a tar stream of whole samples."""

    def __init__(self, path: str, lo: int, hi: int):
        self.f = open(path, "rb", buffering=0)
        self.f.seek(lo)
        self.left = hi - lo

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        got = self.f.readinto(memoryview(b)[:n])
        self.left -= got
        return got

    def close(self):
        self.f.close()
        super().close()


def _open_ranges(chunks):
    for tar, lo, hi in chunks:
        yield {"url": f"{tar}[{lo}:{hi}]", "stream": io.BufferedReader(_Range(tar, lo, hi), 1 << 20)}


# --------------------------------------------------------------------------- decoding
def decode_frames(data: bytes, frame_ids: np.ndarray, fps: float, threads: int = 1,
                  fragments: Fragments | None = None) -> list:
    """The decoded frames ``frame_ids`` (any order, repeats allowed), as PyAV
    frames: with a fragment table, decode the member cut to the fragments
    that hold them (init segment + those fragments, no seek); without one,
    seek to the keyframe before the first; decode up to the last, keep only
    those asked for (no conversion yet). A packet whose frame is not asked
    for is decoded only if other frames need it (the decoder's
    ``skip_frame="NONREF"``: disposable B-frames are skipped, not decoded)."""
    if fragments is not None and fragments.cuttable:
        data, base = fragments.cut(data, int(np.min(frame_ids)), int(np.max(frame_ids)))
        return _decode(data, [int(i) - base for i in frame_ids], fps, threads, seek=False)
    return _decode(data, [int(i) for i in frame_ids], fps, threads, seek=True)


def _decode(data: bytes, frame_ids: list[int], fps: float, threads: int, seek: bool) -> list:
    """Decode ``frame_ids`` (see decode_frames), seeking to the keyframe
    before the first when ``seek``. A seek that lands past the first frame
    is retried further back: FFmpeg's MP4 demuxer seeks fragmented files by
    decode time, and with B-frames the last frame of a GOP is shown at the
    decode time of the next keyframe, which the seek then lands on."""
    first = min(frame_ids)
    target = first if seek else 0
    for _ in range(4):
        got, landed = _decode_from(data, set(frame_ids), target, fps, threads)
        if len(got) == len(set(frame_ids)) or target == 0 or landed is None or landed <= first:
            break
        target = max(0, target - (landed - first) - 1)
    else:
        got, _ = _decode_from(data, set(frame_ids), 0, fps, threads)
    missing = set(frame_ids) - set(got)
    if missing:
        raise ValueError(f"frames {sorted(missing)[:4]}... not in the stream (decoded {len(got)} of "
                         f"{len(set(frame_ids))})")
    return [got[i] for i in frame_ids]


def _decode_from(data: bytes, wanted: set, target: int, fps: float, threads: int) -> tuple[dict, int | None]:
    """The frames ``wanted`` decoded after a seek to frame ``target`` (0: from
    the start), and the number of the first frame the decoder gave back."""
    first, last = min(wanted), max(wanted)
    got: dict = {}
    landed = None
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        ctx.thread_count = threads
        tb = float(stream.time_base)
        t0 = stream.start_time or 0

        def number(pts):
            return int(round((pts - t0) * tb * fps)) if pts is not None else None

        if target > 0:
            container.seek(t0 + int(target / fps / tb), stream=stream, backward=True, any_frame=False)
        for packet in container.demux(stream):
            k = number(packet.pts)
            if k is not None:
                ctx.skip_frame = "DEFAULT" if k in wanted else "NONREF"
            for frame in ctx.decode(packet):
                k = number(frame.pts)
                if landed is None:
                    landed = k
                if k is None or k < first:
                    continue
                if k in wanted:
                    got[k] = frame
                if k >= last:
                    break
            else:
                continue
            break
    return got, landed


_REFORMATTER: tuple[int, VideoReformatter] | None = None


def _rgb(frame) -> np.ndarray:
    """One frame as uint8 RGB [H, W, 3] at its decoded size, through one
    reformatter per process: swscale's context is built once and reused
    (``frame.to_ndarray(format=...)`` builds a new one per frame, which cost
    more than the conversion itself: 6-8 ms instead of 1 ms for 16 frames of
    342x256). One swscale thread: a worker is one core's share (the default,
    a thread pool per context, was slower here, and a pool inherited through
    fork hung the workers); never a context inherited from another process."""
    global _REFORMATTER
    if _REFORMATTER is None or _REFORMATTER[0] != os.getpid():
        _REFORMATTER = (os.getpid(), VideoReformatter())
    return _REFORMATTER[1].reformat(frame, format="rgb24", threads=1).to_ndarray()


def _window(lo: int, size: int, scale: float, extent: int) -> tuple[int, int, int]:
    """The source span [a, b) that output pixels [lo, lo + size) of a resize
    by ``scale`` (align_corners=False) read, with the filter's support as
    margin, and where ``lo`` falls in the resize of that span alone. Of the
    starts up to 8 pixels further out, the one whose own grid lies closest to
    the whole frame's (a * scale nearest an integer; exact at the edge)."""
    support = 1 + int(math.ceil(1 / scale))  # bilinear; antialiased when shrinking: 1/scale wide
    first = max(0, int(math.floor((lo + 0.5) / scale - 0.5)) - support)
    a = min(range(max(0, first - 8), first + 1), key=lambda s: (abs(s * scale - round(s * scale)), -s))
    b = min(extent, int(math.ceil((lo + size - 0.5) / scale - 0.5)) + support + 1)
    return a, b, lo - int(round(a * scale))


def crop_clip(frames: list, crop: Crop, size: int) -> torch.Tensor:
    """PyAV frames -> uint8 [3, T, h, w] of ``crop`` (h x w: its output shape,
    the ``size`` square unless it says otherwise).

    RGB at the decoded size (swscale's unscaled path, one pass per distinct
    frame). Where the crop needs no resize (evaluation at the shards' short
    side) only the square is copied. Otherwise only the source window the
    square reads is resized (uint8 bilinear in torch, antialiased when
    shrinking, as DALI's resize) with the scale of the whole-frame resize;
    its pixel grid starts at the window's corner, chosen (see ``_window``) so
    that it meets the whole-frame grid where it can and otherwise lies at most
    half an output pixel from it (a sub-pixel shift of a random crop). The
    mirror is taken after the layout copy.
    """
    rgb = {}
    for f in frames:
        if id(f) not in rgb:
            rgb[id(f)] = _rgb(f)
    height, width = rgb[id(frames[0])].shape[:2]
    oh, ow = crop.shape(size)
    if (crop.height, crop.width) == (height, width):
        x = torch.from_numpy(np.stack([rgb[id(f)][crop.y0:crop.y0 + oh, crop.x0:crop.x0 + ow]
                                       for f in frames])).permute(3, 0, 1, 2)
    else:
        sy, sx = crop.height / height, crop.width / width
        ya, yb, oy = _window(crop.y0, oh, sy, height)
        xa, xb, ox = _window(crop.x0, ow, sx, width)
        src = torch.from_numpy(np.stack([rgb[id(f)][ya:yb, xa:xb] for f in frames])).permute(0, 3, 1, 2)
        # F.interpolate's op with both the output size and the whole frame's scale (the grid)
        x = torch.ops.aten._upsample_bilinear2d_aa(src, [oy + oh, ox + ow], False, sy, sx)
        x = x[:, :, oy:oy + oh, ox:ox + ow].transpose(0, 1)
    # the [3, T, S, S] layout copy in torch (numpy's transposing copy took twice as long), then the mirror
    x = x.contiguous()
    return x.flip(-1) if crop.flip else x


@dataclass
class ClipMaker:
    """Turns one sample into its clips (one per view of the sampler); runs in the workers."""
    sampler: ClipSampler
    seed: int
    epoch: int
    threads: int = 1
    window_cut: bool = True  # decode a window from its fragments where the shards carry the table

    def __call__(self, sample: dict):
        """All clips of a webdataset sample (a video), or (a member that fails
        in any of its views) one ``__skip__`` item in their place: a video is
        whole or not at all."""
        try:
            clips = list(self._video_clips(sample))
        except Exception as e:  # a corrupt member: reported to the main process, the epoch goes on
            key = sample.get("__key__", "?")
            clips = [{"__skip__": f"{type(e).__name__}: {e}", "__key__": f"{key} ({sample.get('__url__', '')})"}]
        yield from clips

    def _video_clips(self, sample: dict):
        import json
        info = json.loads(sample["json"])
        ext = next((e for e in VIDEO_EXTS if e in sample), None)
        if ext is None:
            raise ValueError(f"no video member (has {sorted(k for k in sample if not k.startswith('__'))})")
        index = int(info["index"])
        fragments = Fragments.from_members(*(sample[m] for m in FRAGMENT_MEMBERS)) \
            if self.window_cut and all(m in sample for m in FRAGMENT_MEMBERS) else None

        def decode(ids):
            return decode_frames(sample[ext], ids, float(info["fps"]), self.threads, fragments)

        meta = {"label": int(info.get("label", -1)), "index": index}
        yield from self.clips(ClipInfo.from_json(info), index, decode, meta)

    def clips(self, info: ClipInfo, sample: int, decode, meta: dict):
        """The clip of each view of a sample: ``decode(frame_ids)`` gives PyAV
        frames (once per window), the crop is taken from them."""
        frames, views = {}, self.sampler.views(info, sample_rng(self.seed, self.epoch, sample))
        size = self.sampler.crop_size
        for v, view in enumerate(views):
            key = id(view.frame_ids)
            if key not in frames:
                frames[key] = decode(view.frame_ids)
            out = {"fast": crop_clip(frames[key], view.crop, size), **meta,
                   # a list: pickled inline (the DataLoader would turn an array into a shared-memory tensor)
                   "frame_ids": view.frame_ids.tolist(), "view": v, "clamped": view.clamped,
                   "crop": view.crop}
            if view.slow_crop is not None:
                out["slow"] = crop_clip(frames[key][:: self.sampler.spec.alpha], view.slow_crop, size)
            yield out


def _worker_share() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers): (0, 1) in the main process. A worker decodes on
    one thread: the workers take the cores between them."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    torch.set_num_threads(1)
    return info.id, info.num_workers


class _Clips(torch.utils.data.IterableDataset):
    """This rank's clips of a video dataset for one epoch, split across DataLoader workers."""

    def __init__(self, chunks, maker: ClipMaker, shuffle_buffer: int, skip: int, seed: int, epoch: int, rank: int):
        self.chunks, self.maker = chunks, maker
        self.shuffle_buffer, self.skip = shuffle_buffer, skip
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __iter__(self):
        wid, nw = _worker_share()
        mine = self.chunks[wid::nw]
        stages = [lambda: iter(mine), _open_ranges, tariterators.tar_file_expander, tariterators.group_by_keys]
        if self.maker.sampler.train and self.shuffle_buffer > 1:
            rng = random.Random(hash((self.seed, self.epoch, self.rank, wid)))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        skip = len(range(wid, self.skip, nw))  # resume: this worker's share of samples already consumed
        if skip:
            stages.append(lambda it, k=skip: (s for i, s in enumerate(it) if i >= k))
        stages.append(lambda it: (clip for s in it for clip in self.maker(s)))
        return iter(wds.DataPipeline(*stages))


class _EventClips(torch.utils.data.IterableDataset):
    """This rank's clips of an event dataset for one epoch: events in reading
    order, split across DataLoader workers; each reads its window's bytes."""

    def __init__(self, events: np.ndarray, videos: np.ndarray, times: np.ndarray, reader: MemberReader,
                 maker: ClipMaker, skip: int):
        self.events, self.videos, self.times = events, videos, times
        self.reader, self.maker, self.skip = reader, maker, skip

    def __iter__(self):
        wid, nw = _worker_share()
        for i in range(self.skip + wid, len(self.events), nw):
            yield from self._clips(int(self.events[i]), int(self.videos[i]), float(self.times[i]))

    def _clips(self, event: int, video: int, time: float):
        reader, maker = self.reader, self.maker
        try:
            before = reader.bytes_read
            info, _ = reader.sample(video)
            meta = {"label": int(info.get("label", -1)), "index": video, "event": event}

            def decode(ids):
                data, base, cut = reader.clip_bytes(video, int(ids.min()), int(ids.max()), maker.window_cut)
                return _decode(data, [int(i) - base for i in ids], float(info["fps"]), maker.threads, seek=not cut)

            clips = list(maker.clips(ClipInfo.from_json(info, time), event, decode, meta))
            clips[0]["bytes_read"] = reader.bytes_read - before
        except Exception as e:  # a corrupt member or range: reported to the main process, the epoch goes on
            clips = [{"__skip__": f"{type(e).__name__}: {e}", "__key__": reader.describe(video, event)}]
        yield from clips


class PyAVLoader(ClipLoader):
    """Iterates batches of the contract; see :func:`loaders.build_loader`."""

    def __init__(self, shards: Shards, spec: ClipSpec, sampler: ClipSampler, *, batch_size: int, crop_size: int,
                 train: bool, normalize: bool, device: str, rank: int, world_size: int, num_workers: int, seed: int,
                 channels_last: bool, shuffle_buffer: int = 256, chunk_size: int = 64, drop_last: bool = False,
                 pin_memory: bool | None = None, decode_threads: int = 1, window_cut: bool | None = None):
        # the workers take the cores: the main process finishes its batches on one thread (OpenMP threads
        # of its own would compete with them and spin)
        self._setup(shards, spec, sampler, batch_size=batch_size, crop_size=crop_size, train=train,
                    normalize=normalize, device=device, rank=rank, world_size=world_size, seed=seed,
                    channels_last=channels_last, drop_last=drop_last, threads=1 if num_workers else None)
        self.num_workers = num_workers
        self.shuffle_buffer, self.chunk_size = shuffle_buffer, chunk_size
        self.decode_threads = decode_threads
        # None/True: cut members to their windows where the shards carry fragment tables; False: seek in
        # the whole member (both measured side by side in the loader benchmark)
        self.window_cut = window_cut is not False
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else pin_memory
        self._index: SampleIndex | None = None  # this epoch's range (ranges rotate across epochs)

    def _maker(self) -> ClipMaker:
        return ClipMaker(self.sampler, self.seed, self.epoch, self.decode_threads, self.window_cut)

    def sample_index(self, samples) -> SampleIndex:
        """The byte ranges of this epoch's samples (their index rows only), kept while the range is the same."""
        key = distinct(samples)
        if self._index is None or not np.array_equal(self._index.positions, key):
            self._index = None  # (the last range's rows go before this one's are read)
            self._index = SampleIndex(self.shards, key)
        return self._index

    def _dataset(self, skip_samples: int):
        if self.events is not None:
            order = self.shuffled(self.rank_sample_array())
            videos, times = self.events.video[order], self.events.time[order]
            return _EventClips(order, videos, times, self.member_reader(videos), self._maker(), skip_samples)
        samples = self.rank_sample_array()
        chunks = self.sample_index(samples).chunks(samples, self.chunk_size if self.train else max(1, len(samples)))
        if self.train:
            random.Random(hash((self.seed, self.epoch, self.rank))).shuffle(chunks)
        return _Clips(chunks, self._maker(), self.shuffle_buffer, skip_samples, self.seed, self.epoch, self.rank)

    def _workers(self, skip_samples: int = 0) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self._dataset(skip_samples), batch_size=None, num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None, persistent_workers=False)

    def clips(self):
        """This epoch's clips as the workers hand them over, before batching:
        dicts with uint8 ``fast`` [3, T, S, S], ``label``, ``index``,
        ``frame_ids`` (a list) (a skipped member: ``__skip__`` and ``__key__``). For
        inspection and for measuring the workers' side alone (the loader
        benchmark); training uses the batches."""
        yield from self._workers()

    def __iter__(self):
        start = self._take_resume()
        total = len(self)
        if start >= total:
            return
        skip = start * self.batch_size // self._views()
        items = self._received(iter(self._workers(skip)))
        yield from (self._train_batches(items, total) if self.train else self._eval_batches(items, total))

    def _received(self, it):
        """The workers' items; a skipped member is counted, warned and passed on as ``None``."""
        while True:
            with Timer(self.stats):
                item = next(it, None)
            if item is None:
                return
            if "__skip__" in item:
                self.stats.skip(item["__key__"], item["__skip__"])
                warnings.warn(f"pyav loader: skipped {item['__key__']}: {item['__skip__']}", RuntimeWarning)
                item = None
            else:
                self.stats.clamped += item.pop("clamped")
                self.stats.bytes_read += item.pop("bytes_read", 0)
            yield item

    def _train_batches(self, items, total: int):
        """Training: a lost clip's place is taken by the last good one (the next
        good one at the start of an epoch), so batch sizes and DDP step counts
        stay; ``stats.substituted`` counts those."""
        batch, owed, last_good = [], 0, None
        for item in items:
            if item is None:
                if last_good is None:
                    owed += 1
                    continue
                item = last_good
                self.stats.substituted += 1
            last_good = item
            self.stats.substituted += owed
            batch.extend([item] * (owed + 1))
            owed = 0
            while len(batch) >= self.batch_size and self._batches < total:
                yield self._emit(batch[: self.batch_size])
                batch = batch[self.batch_size:]
            if self._batches >= total:
                return
        if batch and self._batches < total:
            yield self._emit(batch)

    def _eval_batches(self, items, total: int):
        """Evaluation: every decodable sample exactly once. A lost member's
        clips are left out, not replaced: the batch it fell in is smaller
        (batch boundaries stay where they were, a lost member taking the
        places of all its views), and a batch that lost every clip is not
        yielded."""
        batch, filled = [], 0
        for item in items:
            places = self._views() if item is None else 1
            if item is not None:
                batch.append(item)
            while places:
                take = min(places, self.batch_size - filled)
                filled, places = filled + take, places - take
                if filled == self.batch_size:
                    if batch:
                        yield self._emit(batch)
                    else:
                        self._batches += 1
                    batch, filled = [], 0
            if self._batches >= total:
                return
        if batch and self._batches < total:
            yield self._emit(batch)

    def _emit(self, items: list[dict]) -> dict:
        self._batches += 1
        fast = [i["fast"] for i in items]
        slow = [i["slow"] for i in items] if self.independent_crops else None
        keys = ("label", "index", "view") if self._views() > 1 else ("label", "index")
        meta = {k: torch.as_tensor([i[k] for i in items], dtype=torch.int64) for k in keys}
        meta["frame_ids"] = torch.tensor([i["frame_ids"] for i in items], dtype=torch.int64)
        events = [i["event"] for i in items] if self.events is not None else None
        return self.batch(fast, slow, meta, events, [i["crop"] for i in items], self.pin_memory)
