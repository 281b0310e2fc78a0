"""The DALI backend: DALI decodes, resizes, crops and normalises; what to take
is the sampling policy's (:mod:`loaders.sampling`), as in every backend.

    _Source (an external source, batch by batch: in this process, or in
    DALI's Python workers with ``source_workers``)
      this rank's samples of the epoch (videos, or events of long videos),
      shuffled in training
      -> the sampler's views of each sample: frame ids and crops
      -> the bytes the views need, read by byte range (os.pread): the init
         segment and the fragments holding the window (KEY.frag_bytes /
         KEY.frag_frames; the whole member where a sample has no table),
         and the frame ids relative to them (see loaders/fragments.py);
         where they lie comes from this epoch's rows of the compact index
         (loaders/index.py), so a rank opens only its own range's tars, a
         bounded number at a time, and a new range's rows are read when
         the next epoch builds its source and pipeline
    fn.decoders.video: the fast sequence decoded from those bytes (device
      "mixed" = NVDEC on a GPU; "cpu" = VP8/VP9/MJPEG only); one cut per
      temporal view ("each") or one covering them all ("cover")
      -> fn.resize of only the source window the crop reads, with the scale
         of the whole frame's resize; fn.crop_mirror_normalize flips,
         normalises, FHWC -> CFHW (whole frames of different sizes, AVA's
         evaluation, are padded to the largest)
    DALIGenericIterator -> torch tensors on the device
      -> slow = fast[:, :, ::alpha] (with independent crops the slow frames
         get their own crop in the graph); an event dataset's fields

Why the cut: DALI 2.4's ``fn.decoders.video`` decodes every sample from its
first frame (it builds no index to seek with), so on a whole member a clip's
cost grows with its window's position. Cut to its fragments, a window costs
the same anywhere. Shards packed before make_shards wrote fragment tables
are decoded whole (one warning); a dataset mixing both is refused.

The source is stateless per batch (batch b of the epoch is a function of
the seed, epoch, rank and b), so a resumed epoch replays exactly from its
batch. A member DALI cannot decode fails its whole batch (DALI cannot skip
inside one): its sample is found by decoding the failed batches' samples
one by one, left out, and the epoch goes on from the failed batch —
training puts the previous good sample in its place, evaluation leaves it
out (every decodable sample exactly once).
"""
from __future__ import annotations

import json
import os
import tarfile
import warnings

import numpy as np
import torch

from loaders.base import ClipLoader, crop_from_params
from loaders.contract import MEAN, STD
from loaders.fragments import FRAGMENT_MEMBERS, MEMBER_FORMAT
from loaders.members import MemberReader
from loaders.sampling import ClipSampler, ClipSpec, KeyframeClips, sample_rng
from loaders.shards import Shards
from loaders.state import Timer

VIEW_CUTS = ("each", "cover")
# codecs DALI's CPU video decoder cannot read (it reads VP8, VP9 and MJPEG): NVDEC only
H264_LIKE = {"h264", "hevc", "h265", "mpeg4", "av1"}
# how the source names a sample it could not read, so the loader leaves it out
_SAMPLE_ERROR = "vthcl-sample"


def _first_codec(tar_path: str) -> str | None:
    """The codec of a tar's first sample (for shards without a manifest, or codec=copy)."""
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                return json.loads(tar.extractfile(member).read()).get("codec")
    return None


def check_decodable(shards: Shards, device: str, shard: int = 0) -> None:
    """Refuse codecs DALI's CPU decoder cannot read, as the manifest names
    them, or else as the first sample of tar ``shard`` (a rank's own) says."""
    if device != "cpu":
        return
    codec, tar = shards.codec, shards.tars[shard]
    if codec in (None, "copy"):
        codec = _first_codec(tar)
    if codec in H264_LIKE:
        raise ValueError(
            f"dali backend on a machine without a GPU: DALI's CPU video decoder reads only VP8/VP9/MJPEG, "
            f"and these shards are {codec} ({tar}). Use backend=\"pyav\", or pack the shards "
            f"with make_shards --codec vp9.")


def has_fragment_tables(shards: Shards) -> bool:
    """True if every sample of ``shards`` carries its fragment table, False if
    none does (shards packed before make_shards wrote them). The manifest says
    so (``member_format``, or the ``fragment_tables`` shard_tools.reindex
    records for an older dataset); without a manifest the .idx files are
    read (each line names its sample's members). A mix is refused: one graph
    decodes every sample the same way."""
    if shards.manifest.get("member_format") == MEMBER_FORMAT:
        return True
    recorded = shards.manifest.get("fragment_tables")
    if recorded in ("all", "none"):
        return recorded == "all"
    if recorded == "mixed":
        raise ValueError(
            f"dali backend: {shards.manifest_path} says some of its shards carry fragment tables (KEY.frag_bytes, "
            "KEY.frag_frames) and some do not (packed before make_shards wrote them): one DALI graph decodes "
            "every sample the same way. Re-pack the older shards with make_shards.")
    found = {}
    for tar in shards.tars:
        with open(shards.idx(tar)) as f:
            f.readline()
            for line in f:
                exts = set(line.split()[0::4])
                found.setdefault(all(m in exts for m in FRAGMENT_MEMBERS), tar)
        if len(found) == 2:
            raise ValueError(
                f"dali backend: {found[True]} carries fragment tables (KEY.frag_bytes, KEY.frag_frames) and "
                f"{found[False]} does not (packed before make_shards wrote them): one DALI graph decodes every "
                "sample the same way. Re-pack the older shards with make_shards.")
    return bool(found) and next(iter(found))


def resized_crop(frames, h, w, sh, sw, y0, x0, size, fn, types, size_w=None):
    """The ``size`` x ``size_w`` (default: square) window at (y0, x0) of the
    frames resized from (h, w) to (sh, sw) (bilinear, antialiased when
    shrinking), in DALI ops. Only the source window the output reads is
    resized, with the whole frame's scale: the same sample positions and
    filter as resizing whole frames and then cropping, for a fraction of the
    work (the whole-frame resize was the CPU graph's costliest op)."""
    ch = size
    cw = size if size_w is None else size_w
    sy, sx = sh / h, sw / w
    out_size = [float(ch), float(cw)] if size_w is None else fn.stack(ch, cw)
    return fn.resize(frames, size=out_size, roi_start=fn.stack(y0 / sy, x0 / sx),
                     roi_end=fn.stack((y0 + ch) / sy, (x0 + cw) / sx), roi_relative=False,
                     antialias=True, interp_type=types.INTERP_LINEAR)


class _Source:
    """The graph's input for one epoch of one rank (see the module docstring):
    called with DALI's BatchInfo, it returns per output a list over the batch's
    samples. ``batches``: the epoch's sample batches (excluded samples already
    replaced or left out); the first ``first_batch`` are skipped (resume).
    ``videos`` and ``times``: every event's video and time (an event
    dataset), or None (a sample is its video)."""

    def __init__(self, batches: list[list[int]], first_batch: int, videos: np.ndarray | None,
                 times: np.ndarray | None, reader: MemberReader, sampler: ClipSampler, seed: int, epoch: int,
                 window_cut: bool, view_cut: str):
        self.batches, self.first_batch = batches, first_batch
        self.videos, self.times, self.reader, self.sampler = videos, times, reader, sampler
        self.seed, self.epoch, self.window_cut, self.view_cut = seed, epoch, window_cut, view_cut

    def __call__(self, info):
        b = self.first_batch + info.iteration
        if info.epoch_idx > 0 or b >= len(self.batches):
            raise StopIteration
        rows = []
        for sample in map(int, self.batches[b]):
            try:
                rows.append(self.sample(sample))
            except Exception as e:  # named for the loader, which leaves the sample out and goes on
                raise RuntimeError(f"{_SAMPLE_ERROR} {sample}: {type(e).__name__}: {e}") from None
        return tuple(list(column) for column in zip(*rows))

    def sample(self, sample: int) -> tuple:
        """The outputs of one sample: per cut its bytes and relative frame ids,
        per view its crop parameters and frame ids, the slow clip's crop
        parameters (with independent crops), and [sample, video, label,
        bytes read, clamped views]."""
        reader = self.reader
        video, time = (sample, None) if self.videos is None else (int(self.videos[sample]), float(self.times[sample]))
        before = reader.bytes_read
        info, _ = reader.sample(video)
        views = self.sampler.views(reader.clip_info(video, time),
                                   sample_rng(self.seed, self.epoch, sample))
        windows = list({id(v.frame_ids): v.frame_ids for v in views}.values())
        groups = [windows] if self.view_cut == "cover" else [[w] for w in windows]
        cuts = []
        for group in groups:
            ids = np.concatenate(group)
            data, base, _ = reader.clip_bytes(video, int(ids.min()), int(ids.max()), self.window_cut)
            cuts += [np.frombuffer(data, np.uint8), (ids - base).astype(np.int32)]
        h, w, size = int(info["height"]), int(info["width"]), self.sampler.crop_size
        per_view = [v.crop.params(h, w, size) for v in views] + [v.frame_ids for v in views]
        slow = [views[0].slow_crop.params(h, w, size)] if self.sampler.independent_crops else []
        meta = np.array([sample, int(info["index"]), int(info.get("label", -1)), reader.bytes_read - before,
                         sum(v.clamped for v in views)], np.int64)
        return (*cuts, *per_view, *slow, meta)


class _Feed:
    """A probe's source: iteration i is the i-th sample's cuts, a batch of one."""

    def __init__(self, items: list[tuple]):
        self.items = items

    def __call__(self, i: int):
        if i >= len(self.items):
            raise StopIteration
        return tuple([x] for x in self.items[i])


def epoch_batches(order, batch_size: int, excluded: set[int], train: bool, drop_last: bool = False) -> list:
    """An epoch's sample batches (slices of ``order``, a list or an array)
    with the excluded samples handled: training puts the last good sample in
    a lost one's place (the next good one at the start), evaluation leaves
    it out (a batch that lost every sample is gone). ``drop_last``: no last
    batch smaller than the others."""
    if train and excluded:
        good = [s for s in order if s not in excluded]
        if not good:
            raise RuntimeError("dali loader: every sample of this rank's epoch failed to decode")
        last, filled = good[0], []
        for s in order:
            last = s if s not in excluded else last
            filled.append(last)
        order = filled
    elif excluded:
        order = [s for s in order if s not in excluded]
    batches = [b for b in (order[i:i + batch_size] for i in range(0, len(order), batch_size)) if len(b)]
    return [b for b in batches if len(b) == batch_size] if drop_last else batches


class DALILoader(ClipLoader):
    def __init__(self, shards: Shards, spec: ClipSpec, sampler: ClipSampler, *, batch_size: int, crop_size: int,
                 train: bool, normalize: bool, device: str, rank: int, world_size: int, num_threads: int, seed: int,
                 channels_last: bool, drop_last: bool = False, prefetch_queue_depth: int = 2,
                 device_id: int | None = None, window_cut: bool | None = None, view_cut: str = "each",
                 source_workers: int | None = None):
        if view_cut not in VIEW_CUTS:
            raise ValueError(f"dali backend: view_cut must be one of {VIEW_CUTS}, not {view_cut!r}")
        device = str(device)
        self.on_gpu = device.startswith("cuda")
        # (the graph normalises, in crop_mirror_normalize: the batches are finished without it)
        self._setup(shards, spec, sampler, batch_size=batch_size, crop_size=crop_size, train=train,
                    normalize=False, device=device if self.on_gpu else "cpu", rank=rank,
                    world_size=world_size, seed=seed, channels_last=channels_last, drop_last=drop_last)
        first = self.sample_video(int(self.rank_sample_array()[0]))[0]  # (a rank opens its own range's tars only)
        check_decodable(shards, "cuda" if self.on_gpu else "cpu",
                        int(np.searchsorted(np.cumsum(shards.counts), first, side="right")))
        self.normalize, self.channels_last = normalize, channels_last
        self.num_threads, self.prefetch = num_threads, prefetch_queue_depth
        # reading is cheap next to decoding: in this process on a CPU, in DALI's workers beside a GPU
        self.source_workers = (2 if self.on_gpu else 0) if source_workers is None else source_workers
        self.device_id = None
        if self.on_gpu:
            self.device_id = self.device.index if self.device.index is not None else (
                device_id if device_id is not None else torch.cuda.current_device())
        tables = has_fragment_tables(shards)
        if window_cut and not tables:
            raise ValueError(f"dali backend: window_cut=True, but {shards.tars[0]} has no fragment tables "
                             "(packed before make_shards wrote them): re-pack it with make_shards")
        if not tables and window_cut is None:
            warnings.warn(
                f"dali loader: {os.path.dirname(shards.tars[0]) or '.'} was packed before make_shards wrote "
                "fragment tables: every clip decodes its member from frame 0, so it costs more the later its "
                "window. Re-pack with make_shards to decode only the window's fragments.", RuntimeWarning)
        # cut each member to its window (default where the shards allow); False: decode whole members
        self.window_cut = tables if window_cut is None else window_cut
        self.view_cut = view_cut  # evaluation views: a cut per temporal view, or one cut covering them all
        self.excluded: set[int] = set()  # samples DALI could not decode, left out from then on
        self._cuts = 1 if view_cut == "cover" else self.num_clips
        views = [f"_{v}" for v in range(self._views())] if self._views() > 1 else [""]
        self._outputs = ([f"fast{v}" for v in views] + [f"params{v}" for v in views] + [f"frame_ids{v}" for v in views]
                         + ["meta"] + (["slow"] if self.independent_crops else []))

    # ------------------------------------------------------------------ the epoch's samples
    def _source(self, first_batch: int) -> _Source:
        order = self.shuffled(self.rank_sample_array())
        videos = times = None
        wanted = order
        if self.events is not None:
            videos, times = self.events.video, self.events.time
            wanted = videos[order]
        reader = self.member_reader(wanted)  # this epoch's range's rows only
        batches = epoch_batches(order, self.batch_size, self.excluded, self.train, self.drop_last)
        return _Source(batches, first_batch, videos, times, reader, self.sampler, self.seed, self.epoch,
                       self.window_cut, self.view_cut)

    # ------------------------------------------------------------------ graph
    def _crop(self, frames, params, fn, types):
        """The view's crop (its parameters from the sampler: Crop.params), flipped, normalised."""
        p = [params[i] for i in range(9)]
        out = resized_crop(frames, *p[:6], p[6], fn, types, size_w=p[7])
        mean, std = (list(MEAN), list(STD)) if self.normalize else ([0.0] * 3, [1.0] * 3)
        out = fn.crop_mirror_normalize(out, dtype=types.FLOAT, output_layout="CFHW", mean=mean, std=std,
                                       mirror=fn.cast(p[8], dtype=types.INT32))
        if isinstance(self.sampler, KeyframeClips) and not self.train:  # whole frames: pad to the batch's largest
            out = fn.pad(out, axis_names="HW")
        return out

    def build_pipeline(self, decode_only: bool = False, first_batch: int = 0):
        """The built DALI pipeline of the graph above for the current epoch.
        ``decode_only``: the source and the video decoder alone, with the
        decoded fast frames as its one output (the loader benchmark's measure
        of what the rest of the graph costs)."""
        from nvidia.dali import fn, pipeline_def, types
        source, views = self._source(first_batch), self._views()
        n_in = 2 * self._cuts + 2 * views + (1 if self.independent_crops else 0) + 1
        dtypes = ([types.UINT8, types.INT32] * self._cuts + [types.FLOAT] * views + [types.INT64] * views
                  + [types.FLOAT] * (1 if self.independent_crops else 0) + [types.INT64])

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed * 1000 + self.rank, prefetch_queue_depth=self.prefetch, exec_dynamic=True,
                      py_num_workers=max(1, self.source_workers), py_start_method="spawn")
        def graph():
            inputs = fn.external_source(source=source, num_outputs=n_in, batch=True, batch_info=True,
                                        parallel=self.source_workers > 0, dtype=dtypes)
            cuts = inputs[:2 * self._cuts]
            params = inputs[2 * self._cuts:2 * self._cuts + views]
            frame_ids = inputs[2 * self._cuts + views:2 * self._cuts + 2 * views]
            meta = inputs[-1]
            decoded = [fn.decoders.video(cuts[2 * k], device="mixed" if self.on_gpu else "cpu", frames=cuts[2 * k + 1])
                       for k in range(self._cuts)]
            if self._cuts == 1 and self.num_clips > 1:  # one covering cut: each clip its slice of the frames
                f = self.spec.fast_frames
                decoded = [fn.slice(decoded[0], start=[k * f], shape=[f], axes=[0]) for k in range(self.num_clips)]
            if decode_only:
                return decoded[0] if len(decoded) == 1 else fn.cat(*decoded, axis=0)
            fasts = [self._crop(decoded[v // self.num_crops], params[v], fn, types) for v in range(views)]
            outputs = [*fasts, *params, *frame_ids, meta]
            if self.independent_crops:  # (DALI's subscript ignores a step on a sequence: pick frames explicitly)
                picked = fn.element_extract(decoded[0], element_map=list(range(0, self.spec.fast_frames,
                                                                                self.spec.alpha)))
                slow_frames = fn.reshape(fn.stack(*picked), layout="FHWC")
                outputs.append(self._crop(slow_frames, inputs[-2], fn, types))
            return tuple(outputs)

        pipe = graph()
        with warnings.catch_warnings():
            if decode_only:  # (the source's other outputs are the full graph's)
                warnings.filterwarnings("ignore", message=".*outputs at the indices .* are not used")
            pipe.build()
        return pipe

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        """This epoch's batches from batch ``_take_resume()`` on. A sample that
        fails (DALI cannot decode it, or its bytes cannot be read) is found,
        counted, warned and left out, and the epoch goes on from the batch that
        failed with a rebuilt pipeline (see the module docstring)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        # (a DALI batch of B samples x V views yields V batches of B clips: resume at the sample batch)
        yielded = self._take_resume() // self._views()  # source batches consumed so far
        if self.train and self.excluded:  # samples left out in an earlier epoch are substituted in this one
            self.stats.substituted += sum(s in self.excluded for s in self.rank_samples())
        while True:
            pipe = it = None
            try:  # (the pipeline reads and the iterator runs its first batches as they are made)
                pipe = self.build_pipeline(first_batch=yielded)
                it = DALIGenericIterator([pipe], self._outputs, auto_reset=False, size=-1)
                while True:
                    try:
                        with Timer(self.stats):
                            out = next(it)
                    except StopIteration:
                        return
                    yielded += 1
                    meta = out[0]["meta"].cpu()
                    self.stats.bytes_read += int(meta[:, 3].sum())
                    self.stats.clamped += int(meta[:, 4].sum())
                    for part in self._split_views(out[0]):
                        yield self._finish(part)
            except RuntimeError as e:
                self._leave_out(str(e), yielded)
            finally:
                del it, pipe

    def _leave_out(self, message: str, failed_from: int) -> None:
        """Exclude the sample(s) a failure names, or that fail alone among the batches it may come from."""
        if _SAMPLE_ERROR in message:
            line = next(ln for ln in message.splitlines() if _SAMPLE_ERROR in ln)
            sample = int(line.split(_SAMPLE_ERROR, 1)[1].split(":", 1)[0])
            bad = {sample: line.split(":", 1)[1].strip()}
        else:
            source = self._source(0)
            candidates = [int(s) for b in source.batches[failed_from:failed_from + self.prefetch + 1] for s in b]
            bad = self._probe(source, candidates)
            if not bad:
                raise RuntimeError(message)
            reason = next((ln.strip() for ln in message.splitlines() if "ailed" in ln or "rror" in ln), message)
            bad = {s: reason[:300] for s in bad}
        for sample, reason in bad.items():
            if sample in self.excluded:
                raise RuntimeError(f"dali loader: sample {sample} failed again after it was left out: {message}")
            self.excluded.add(sample)
            key = self._members[1].describe(self.sample_video(sample)[0], sample if self.events is not None else None)
            self.stats.skip(key, reason)
            if self.train:
                self.stats.substituted += 1
            warnings.warn(f"dali loader: skipped {key}: {reason}", RuntimeWarning)

    def _probe(self, source: _Source, samples: list[int]) -> list[int]:
        """The samples whose cuts DALI fails to decode alone (one at a time)."""
        from nvidia.dali import fn, pipeline_def, types
        feeds = [(s, source.sample(s)) for s in dict.fromkeys(samples)]
        bad, k = [], 0
        while k < len(feeds):
            rest = feeds[k:]
            feed = _Feed([outputs[:2 * self._cuts] for _, outputs in rest])

            @pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id, exec_pipelined=False,
                          exec_async=False, prefetch_queue_depth=1)
            def probe():
                cuts = fn.external_source(source=feed, num_outputs=2 * self._cuts, batch=True,
                                          dtype=[types.UINT8, types.INT32] * self._cuts)
                return tuple(fn.decoders.video(cuts[2 * j], device="mixed" if self.on_gpu else "cpu",
                                               frames=cuts[2 * j + 1]) for j in range(self._cuts))

            pipe = probe()
            pipe.build()
            for i in range(len(rest)):
                try:
                    pipe.run()
                except RuntimeError:
                    bad.append(rest[i][0])
                    k += i + 1
                    break
            else:
                k = len(feeds)
            del pipe
        return bad

    def _split_views(self, batch: dict):
        """One DALI batch of B samples x V views -> batches of batch_size clips
        (sample-major, each clip with its ``view``), as the PyAV backend yields them."""
        V = self._views()
        if V == 1:
            yield batch
            return
        B = batch["meta"].shape[0]

        def stacked(name):
            return torch.stack([batch[f"{name}_{v}"] for v in range(V)], 1).flatten(0, 1)

        parts = {"fast": stacked("fast"), "params": stacked("params"), "frame_ids": stacked("frame_ids"),
                 "meta": batch["meta"].repeat_interleave(V, 0), "view": torch.arange(V).repeat(B)}
        for s in range(0, B * V, self.batch_size):
            yield {k: v[s:s + self.batch_size] for k, v in parts.items()}

    def _finish(self, batch: dict) -> dict:
        """A batch of the contract from one view's outputs of the graph (float clips, normalised there)."""
        meta = batch["meta"].cpu()
        self._batches += 1
        fields = {"label": meta[:, 2], "index": meta[:, 1], "frame_ids": batch["frame_ids"].cpu().long()}
        if "view" in batch:
            fields["view"] = batch["view"]
        events = crops = None
        if self.events is not None:
            events, crops = meta[:, 0].tolist(), [crop_from_params(p) for p in batch["params"].cpu()]
        return self.batch(batch["fast"], batch["slow"] if self.independent_crops else None, fields, events, crops)

