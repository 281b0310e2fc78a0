"""The DALI backend: the whole clip path declared as one DALI graph.

    fn.readers.webdataset (the .idx files; sharded by rank; shuffled)
      -> num_frames (KEY.nframes), [index, label] (KEY.ids) and the fragment
         table (KEY.frag_bytes, KEY.frag_frames) read as numbers
      -> window start and the fast frame ids chosen in the graph
      -> the member cut to its window: init segment + the fragments that hold
         the window's frames (uint8 slices, concatenated), ids made relative
         to the cut (see loaders/fragments.py)
      -> fn.decoders.video: the fast sequence decoded once from the cut
         (device "mixed" = NVDEC on a GPU; "cpu" = VP8/VP9/MJPEG only)
      -> the crop of the frames resized to short side S (fn.resize of only
         the window it reads), then fn.crop_mirror_normalize flips,
         normalises, FHWC -> CFHW
    DALIGenericIterator(reader_name="reader") -> torch tensors on the device
      -> slow = fast[:, :, ::alpha] (a strided copy on the device; with
         independent crops the slow frames get their own crop in the graph)

The sampling rules are those of :mod:`loaders.sampling` (same window, same
evaluation crop as the PyAV backend); random draws come from DALI's own
generators seeded by ``seed`` and ``rank``.

Why the cut: DALI 2.4's ``fn.decoders.video`` decodes every sample from its
first frame (it builds no index to seek with), so on a whole member a clip's
cost grows with its window's position. Cut to its fragments, a window costs
the same anywhere. Shards packed before make_shards wrote fragment tables are
decoded whole (one warning); a dataset mixing both is refused.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import warnings

import numpy as np
import torch

from loaders.contract import MEAN, STD
from loaders.fragments import FRAGMENT_MEMBERS
from loaders.ranks import rank_indices
from loaders.sampling import ClipSpec, scale_range
from loaders.shards import Shards
from loaders.state import LoaderStats, Timer

VIEW_CUTS = ("each", "cover")
# codecs DALI's CPU video decoder cannot read (it reads VP8, VP9 and MJPEG): NVDEC only
H264_LIKE = {"h264", "hevc", "h265", "mpeg4", "av1"}


def _first_codec(shards: Shards) -> str | None:
    """The codec of the first sample (for shards without a manifest, or codec=copy)."""
    with tarfile.open(shards.tars[0]) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                return json.loads(tar.extractfile(member).read()).get("codec")
    return None


def check_decodable(shards: Shards, device: str) -> None:
    if device != "cpu":
        return
    codec = shards.codec
    if codec in (None, "copy"):
        codec = _first_codec(shards)
    if codec in H264_LIKE:
        raise ValueError(
            f"dali backend on a machine without a GPU: DALI's CPU video decoder reads only VP8/VP9/MJPEG, "
            f"and these shards are {codec} ({shards.tars[0]}). Use backend=\"pyav\", or pack the shards "
            f"with make_shards --codec vp9.")


def has_fragment_tables(shards: Shards) -> bool:
    """True if every sample of ``shards`` carries its fragment table, False if
    none does (shards packed before make_shards wrote them), read from the
    .idx files (each line names its sample's members). A mix is refused: one
    DALI graph decodes every sample the same way."""
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


def cut_to_window(video, frag_bytes, frag_frames, frame_ids, fn, types):
    """The member cut to the frames ``frame_ids`` need, in DALI ops: its init
    segment + the fragments [g0, g1) holding min..max of the ids (uint8
    subscripts, concatenated; subscripts and ``cat``'s first input keep the
    sample's source info, which names the member in a decoder error), and the
    ids relative to the cut. ``frag_frames[g0]`` is the last fragment start
    <= min, g1 the first > max: counts of the table's entries at or below."""
    first, last = fn.reductions.min(frame_ids), fn.reductions.max(frame_ids)
    g0 = fn.reductions.sum(fn.cast(frag_frames <= first, dtype=types.INT32)) - 1
    g1 = fn.reductions.sum(fn.cast(frag_frames <= last, dtype=types.INT32))
    cut = fn.cat(video[0:frag_bytes[0]], video[frag_bytes[g0]:frag_bytes[g1]], axis=0)
    return cut, frame_ids - frag_frames[g0]


def resized_crop(frames, h, w, sh, sw, y0, x0, size: int, fn, types):
    """The ``size`` square at (y0, x0) of the frames resized from (h, w) to
    (sh, sw) (bilinear, antialiased when shrinking), in DALI ops. Only the
    source window the square reads is resized, with the whole frame's scale:
    the same sample positions and filter as resizing whole frames and then
    cropping, for a fraction of the work (the whole-frame resize was the
    CPU graph's costliest op)."""
    c = float(size)
    sy, sx = sh / h, sw / w
    return fn.resize(frames, size=[c, c], roi_start=fn.stack(y0 / sy, x0 / sx),
                     roi_end=fn.stack((y0 + c) / sy, (x0 + c) / sx), roi_relative=False,
                     antialias=True, interp_type=types.INTERP_LINEAR)


class DALILoader:
    def __init__(self, shards: Shards, spec: ClipSpec, *, batch_size: int, crop_size: int, train: bool,
                 normalize: bool, device: str, rank: int, world_size: int, num_threads: int, seed: int,
                 channels_last: bool, independent_crops: bool = False, num_clips: int = 1, num_crops: int = 1,
                 drop_last: bool = False, initial_fill: int = 256, prefetch_queue_depth: int = 2,
                 device_id: int | None = None, window_cut: bool | None = None, view_cut: str = "each"):
        if view_cut not in VIEW_CUTS:
            raise ValueError(f"dali backend: view_cut must be one of {VIEW_CUTS}, not {view_cut!r}")
        self.num_clips, self.num_crops = (1, 1) if train else (num_clips, num_crops)
        device = str(device)
        self.on_gpu = device.startswith("cuda")
        check_decodable(shards, "cuda" if self.on_gpu else "cpu")
        self.shards, self.spec = shards, spec
        self.num_videos = shards.total
        self.batch_size, self.crop_size, self.train, self.normalize = batch_size, crop_size, train, normalize
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.independent_crops, self.channels_last = independent_crops, channels_last
        self.num_threads, self.initial_fill, self.prefetch = num_threads, initial_fill, prefetch_queue_depth
        if self.on_gpu:
            self.device = torch.device(device)
            self.device_id = self.device.index if self.device.index is not None else (
                device_id if device_id is not None else torch.cuda.current_device())
        else:
            self.device, self.device_id = torch.device("cpu"), None
        self.epoch = 0
        self.stats = LoaderStats()
        self._iter = None
        self.index_paths = [shards.idx(t) for t in shards.tars]
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
        self.view_cut = view_cut  # evaluation views: a cut per view, or one cut covering them all
        self._patched = None  # folder of rewritten indices that leave out undecodable members
        views = [f"_{v}" for v in range(self._views())] if self._views() > 1 else [""]
        self._outputs = ([f"fast{v}" for v in views] + [f"frame_ids{v}" for v in views] + ["index", "label"]
                         + (["slow"] if independent_crops else []))

    def _views(self) -> int:
        return self.num_clips * self.num_crops

    # ------------------------------------------------------------------ graph
    def _crop(self, frames, fn, types, dmath, crop_idx: int = 1):
        """crop_params of loaders.sampling, in DALI ops: the square at (y0, x0)
        of the frames resized to short side S, flipped, normalised."""
        shape = frames.shape()
        h = fn.cast(shape[1], dtype=types.FLOAT)
        w = fn.cast(shape[2], dtype=types.FLOAT)
        lo, hi = scale_range(self.crop_size)
        if self.train:
            short = lo + dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * float(hi - lo + 1))
        else:
            short = h * 0.0 + float(lo)
        short = dmath.max(short, float(self.crop_size))
        tall = h > w  # as scaled_size: the short side becomes S, the long one rounds half up
        sh = dmath.floor(fn.cast(tall, dtype=types.FLOAT) * (h * short / w + 0.5)
                         + (1.0 - fn.cast(tall, dtype=types.FLOAT)) * short)
        sw = dmath.floor((1.0 - fn.cast(tall, dtype=types.FLOAT)) * (w * short / h + 0.5)
                         + fn.cast(tall, dtype=types.FLOAT) * short)
        room_y, room_x = sh - float(self.crop_size), sw - float(self.crop_size)
        if self.train:
            y0 = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (room_y + 1.0))
            x0 = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (room_x + 1.0))
            mirror = fn.random.coin_flip()
        else:
            y0, x0, mirror = dmath.floor(room_y * 0.5), dmath.floor(room_x * 0.5), 0
            if self.num_crops > 1:  # left/top, centre, right/bottom along the long side
                frac = crop_idx / (self.num_crops - 1)
                t = fn.cast(tall, dtype=types.FLOAT)
                y0 = t * dmath.floor(room_y * frac + 0.5) + (1.0 - t) * y0
                x0 = (1.0 - t) * dmath.floor(room_x * frac + 0.5) + t * x0
        out = resized_crop(frames, h, w, sh, sw, y0, x0, self.crop_size, fn, types)
        mean, std = (list(MEAN), list(STD)) if self.normalize else ([0.0] * 3, [1.0] * 3)
        return fn.crop_mirror_normalize(out, dtype=types.FLOAT, output_layout="CFHW", mean=mean, std=std,
                                        mirror=mirror)

    def build_pipeline(self, decode_only: bool = False):
        """The built DALI pipeline of the graph above. ``decode_only``: the
        reader and the video decoder alone, with the decoded fast frames as
        its one output (the loader benchmark's measure of what the rest of
        the graph costs)."""
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types
        spec = self.spec

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed * 1000 + self.rank, prefetch_queue_depth=self.prefetch,
                      exec_dynamic=True)
        def graph():
            tables = ["frag_bytes", "frag_frames"] if self.window_cut else []
            video, nframes, ids, *fragments = fn.readers.webdataset(
                paths=self.shards.tars, index_paths=self.index_paths,
                ext=["mp4;webm;mkv", "nframes", "ids", *tables],
                dtypes=[types.UINT8, types.INT32, types.INT64, *[types.INT64, types.INT32][:len(tables)]],
                missing_component_behavior="error", random_shuffle=self.train, initial_fill=self.initial_fill,
                shard_id=self.rank, num_shards=self.world_size, pad_last_batch=True, stick_to_shard=False,
                shuffle_after_epoch=False, name="reader")
            n = nframes[0]
            offsets = types.Constant(np.arange(spec.fast_frames, dtype=np.int32) * spec.stride)
            if self.train:
                starts = dmath.max(n - spec.window + 1, 1)
                start = fn.cast(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * fn.cast(starts, dtype=types.FLOAT)),
                                dtype=types.INT32)
                clip_ids = [(start + offsets) % n]
            else:  # num_clips evenly spaced windows; one: the centre window
                delta = dmath.max(n - spec.window, 0)
                clip_ids = [(delta * (2 * k + 1) // (2 * self.num_clips) + offsets) % n for k in range(self.num_clips)]
            clips = self._decode(video, fragments, clip_ids, fn, types)
            if decode_only:
                return clips[0] if len(clips) == 1 else fn.cat(*clips, axis=0)
            fasts, view_ids = [], []
            for clip, ids_k in zip(clips, clip_ids):
                for j in range(self.num_crops):
                    fasts.append(self._crop(clip, fn, types, dmath, crop_idx=j))
                    view_ids.append(fn.cast(ids_k, dtype=types.INT64))
            outputs = [*fasts, *view_ids, ids[0], ids[1]]
            if self.independent_crops:  # (DALI's subscript ignores a step on a sequence: pick frames explicitly)
                picked = fn.element_extract(clips[0], element_map=list(range(0, spec.fast_frames, spec.alpha)))
                slow_frames = fn.reshape(fn.stack(*picked), layout="FHWC")
                outputs.append(self._crop(slow_frames, fn, types, dmath))
            return tuple(outputs)

        pipe = graph()
        pipe.build()
        return pipe

    def _decode(self, video, fragments: list, clip_ids: list, fn, types) -> list:
        """The fast frames of every view (one view in training), decoded from
        the member cut to the views' windows (one cut per view with
        ``view_cut="each"``, one covering them all with "cover"), or from the
        whole member when the shards carry no fragment tables."""
        def decode(data, ids):
            return fn.decoders.video(data, device="mixed" if self.on_gpu else "cpu", frames=ids)

        def split(frames):
            if len(clip_ids) == 1:
                return [frames]
            f = self.spec.fast_frames
            return [fn.slice(frames, start=[k * f], shape=[f], axes=[0]) for k in range(len(clip_ids))]

        every = clip_ids[0] if len(clip_ids) == 1 else fn.cat(*clip_ids, axis=0)
        if not self.window_cut:
            return split(decode(video, every))
        if self.view_cut == "each":
            return [decode(*cut_to_window(video, *fragments, ids, fn, types)) for ids in clip_ids]
        return split(decode(*cut_to_window(video, *fragments, every, fn, types)))

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        per_rank = len(rank_indices(self.shards.total, self.rank, self.world_size)[0]) * self._views()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """DALI reshuffles by itself each epoch and rotates the rank shards;
        the epoch is recorded for the checkpoint."""
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": 0}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

    def _iterator(self):
        if self._iter is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
            policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
            self._iter = DALIGenericIterator([self.build_pipeline()], self._outputs,
                                             reader_name="reader", last_batch_policy=policy, auto_reset=True,
                                             last_batch_padded=False)
        return self._iter

    def __iter__(self):
        """A member DALI cannot decode costs its whole batch (DALI cannot skip
        inside one): it is left out of a rewritten index and the pipeline is
        rebuilt, which restarts the epoch. Training fills its steps from the
        restarted epoch (``stats.substituted`` counts the lost batch's clips).
        Evaluation yields every decodable video exactly once: after a rebuild
        the videos already yielded are left out of the restarted epoch, which
        runs to its end, so the lost batch's good videos come back, smaller."""
        it, produced, rebuilt = None, 0, False
        seen: set[int] = set()  # evaluation: the videos yielded this epoch
        owed = len(rank_indices(self.shards.total, self.rank, self.world_size)[0])  # videos this rank yields
        last = None  # the last video yielded, as a one-row batch (to pad with)
        while produced < len(self) or (rebuilt and not self.train):
            try:
                with Timer(self.stats):
                    if it is None:
                        it = iter(self._iterator())  # (DALI's iterator runs its first batch here)
                    out = next(it)
            except StopIteration:
                if not rebuilt or not self.train:
                    return
                it, rebuilt = None, False  # a rebuilt pipeline restarted its epoch: fill from the next one
                continue
            except RuntimeError as e:
                bad = _bad_member(str(e))
                if bad is None:
                    raise
                reason = next((ln.strip() for ln in str(e).splitlines() if ".tar:" in ln), str(e))
                self._exclude(*bad, reason=reason[:300])
                it, rebuilt = None, True
                if self.train:
                    self.stats.substituted += self.batch_size
                continue
            batch = out[0]
            rows = batch["index"].reshape(-1).shape[0]
            if not rebuilt and rows < min(self.batch_size, owed):
                # DALI keeps ranks' batch counts equal by trimming the padding of a shorter shard, down to
                # empty batches; the contract pads as rank_indices does: a rank repeats a video it read
                batch = _pad_rows(batch, rows, min(self.batch_size, owed), last)
            if batch["index"].numel():
                last = {k: v[-1:] for k, v in batch.items()}
                owed -= batch["index"].reshape(-1).shape[0]
            if not self.train:
                index = batch["index"].reshape(-1).tolist()
                if rebuilt:
                    keep = torch.tensor([i not in seen for i in index])
                    if not keep.any():
                        continue
                    batch = {k: v[keep.to(v.device)] for k, v in batch.items()}
                seen.update(index)
            for part in self._split_views(batch):
                produced += 1
                yield self._finish(part)

    def _split_views(self, batch: dict):
        """One DALI batch of B videos x V views -> batches of batch_size clips
        (sample-major, each clip with its ``view``), as the PyAV backend yields them."""
        V = self._views()
        if V == 1:
            yield batch
            return
        B = batch["index"].shape[0]
        fast = torch.stack([batch[f"fast_{v}"] for v in range(V)], 1).flatten(0, 1)
        ids = torch.stack([batch[f"frame_ids_{v}"] for v in range(V)], 1).flatten(0, 1)
        rep = {k: batch[k].view(-1).repeat_interleave(V) for k in ("index", "label")}
        view = torch.arange(V).repeat(B)
        for s in range(0, B * V, self.batch_size):
            yield {"fast": fast[s:s + self.batch_size], "frame_ids": ids[s:s + self.batch_size],
                   "view": view[s:s + self.batch_size], **{k: v[s:s + self.batch_size] for k, v in rep.items()}}

    def _finish(self, batch: dict) -> dict:
        fast = batch["fast"]
        slow = batch["slow"] if self.independent_crops else fast[:, :, :: self.spec.alpha].contiguous()
        if self.channels_last:
            fast = fast.contiguous(memory_format=torch.channels_last_3d)
            slow = slow.contiguous(memory_format=torch.channels_last_3d)
        self.stats.batches += 1
        self.stats.clips += fast.shape[0]
        meta = {"label": batch["label"].view(-1), "index": batch["index"].view(-1), "frame_ids": batch["frame_ids"]}
        if "view" in batch:
            meta["view"] = batch["view"]
        return {"slow": slow, "fast": fast, **{k: v.long().to(self.device, non_blocking=True) for k, v in meta.items()}}

    def _exclude(self, tar: str, key: str, reason: str) -> None:
        """A member DALI cannot decode: count and warn, leave its sample out of a
        rewritten index (DALI cannot skip within a batch), rebuild the pipeline."""
        self.stats.skip(f"{key} ({tar})", reason)
        warnings.warn(f"dali loader: skipped {key} in {tar}: {reason}", RuntimeWarning)
        if self._patched is None:
            self._patched = tempfile.mkdtemp(prefix="vthcl_dali_idx_")
        i = self.shards.tars.index(tar)
        src = self.index_paths[i]
        with open(src) as f:
            header, *lines = f.read().splitlines()
        keep = [line for line in lines if not line.split()[3].startswith(key + ".")]
        if len(keep) == len(lines) or not keep:
            raise RuntimeError(f"dali loader: cannot leave out {key} of {tar}: {reason}")
        dst = os.path.join(self._patched, f"{i:06d}.idx")
        with open(dst, "w") as f:
            f.write(f"{header.split()[0]} {len(keep)}\n" + "\n".join(keep) + "\n")
        self.index_paths[i] = dst
        self._iter = None


def _pad_rows(batch: dict, rows: int, want: int, last: dict | None) -> dict:
    """``batch`` with ``want`` rows: its own last row (or the previous batch's) repeated."""
    source = {k: v[-1:] for k, v in batch.items()} if rows else last
    if source is None:
        return batch
    return {k: torch.cat([batch[k], source[k].expand(want - rows, *source[k].shape[1:])]) for k in batch}


def _bad_member(message: str) -> tuple[str, str] | None:
    """(tar, key) of the member a DALI error names as "<tar>:<offset>:<member>"."""
    m = re.search(r"([^\s\"']+\.tar):(\d+):([^\s\"']+)", message)
    if not m:
        return None
    return m.group(1), m.group(3).split(".", 1)[0]
