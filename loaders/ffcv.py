"""The FFCV backend: videos as JPEG frame sequences in a .beton, decoding only
the frames a clip needs.

FFCV has no video field, so this module defines one (the format and its
reader in one place; ``shard_tools/make_ffcv.py`` writes it):

``video`` (:class:`JPEGVideoField`)
    per video one blob: a little-endian uint32 offset table
    ``[num_frames + 1]`` followed by the frames as JPEGs (frame k is
    ``jpegs[off[k]:off[k + 1]]``); metadata columns ``ptr``, ``size``,
    ``num_frames``, ``height``, ``width``, ``index`` and ``fps``.
``label``, ``index`` (``IntField``)
    the label (-1: unlabeled) and the video's position in the shards'
    manifest (the memory-bank row).

The video metadata also has an ``epoch`` column, written as 0: not data but
a run-time input. A compiled FFCV op sees its closure as constants, so the
loader writes the current epoch into that column of its in-memory metadata
before each epoch instead of rebuilding (and recompiling) the pipeline.

The pipeline, declared once (ffcv-imagenet style)::

    video  -> ClipDecoder      choose the window, decode its alpha*slow_frames
                               JPEGs, resize (short side), crop, flip
                               -> uint8 [B, 3, T, S, S]
    video  -> FrameIdsDecoder  the same window -> int64 [B, T]
    label, index -> IntDecoder
    main thread: torch, device, normalise, slow = fast[:, :, ::alpha]

Both decoders draw from one counter-based hash of ``(seed, epoch, index,
draw)``, so ``frame_ids`` always names the frames in ``fast``, in any thread
and run. One ``ffcv.Loader`` is compiled per loader, once. Order:
QUASI_RANDOM in training (page-local shuffling, for datasets larger than
RAM) with ``os_cache=False``; RANDOM with ``os_cache=True``; sequential in
evaluation. Ranks read contiguous ranges of the file (the rotation of
:func:`loaders.ranks.rank_indices`), because FFCV's QUASI_RANDOM has no
``distributed=True``.

Spatial sampling follows :func:`loaders.sampling.crop_params` (the same
distribution, drawn from the hash: a short side in [8/7, 10/7]·crop, a crop,
a coin-flip mirror; the centre at 8/7 in evaluation): the frame is resized
whole, then cropped, as in the PyAV
backend, so in evaluation both give the same pixels up to JPEG and
resampling differences. Bad videos never reach a .beton (make_ffcv
reports them in ``OUT.failed.jsonl``). Not supported here: multi-view
evaluation and independent crops (use the pyav or dali backend).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields import IntField
from ffcv.fields.base import ARG_TYPE, Field
from ffcv.fields.basics import IntDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.reader import Reader
from ffcv.traversal_order import QuasiRandom
from ffcv.traversal_order.base import TraversalOrder
from numba import njit

from loaders.batching import Normalizer
from loaders.ranks import rank_indices
from loaders.sampling import ClipSpec, scale_range, scaled_size
from loaders.state import EpochState, LoaderStats, Timer

ORDERS = ("quasi_random", "random", "sequential")


# --------------------------------------------------------------------------- the format
def pack_frames(jpegs: list[bytes]) -> np.ndarray:
    """One video's blob: uint32 offsets [n + 1], then the JPEGs back to back."""
    sizes = np.fromiter((len(j) for j in jpegs), dtype=np.int64, count=len(jpegs))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] >= 2 ** 32:
        raise ValueError("a video's JPEGs exceed 4 GiB")
    table = offsets.astype("<u4").view(np.uint8)
    return np.concatenate([table, np.frombuffer(b"".join(jpegs), dtype=np.uint8)])


class JPEGVideoField(Field):
    """A video as JPEG frames with an offset table. ``encode`` takes
    ``(blob, num_frames, height, width, index, fps)`` (blob from
    :func:`pack_frames`)."""

    @property
    def metadata_type(self) -> np.dtype:
        return np.dtype([("ptr", "<u8"), ("size", "<u8"), ("num_frames", "<u4"), ("height", "<u2"),
                         ("width", "<u2"), ("index", "<i8"), ("fps", "<f4"), ("epoch", "<u4")])

    @staticmethod
    def from_binary(binary: ARG_TYPE) -> Field:
        return JPEGVideoField()

    def to_binary(self) -> ARG_TYPE:
        return np.zeros(1, dtype=ARG_TYPE)[0]

    def encode(self, destination, value, malloc):
        blob, num_frames, height, width, index, fps = value
        ptr, buffer = malloc(blob.size)
        buffer[:] = blob
        destination["ptr"], destination["size"] = ptr, blob.size
        destination["num_frames"], destination["height"], destination["width"] = num_frames, height, width
        destination["index"], destination["fps"], destination["epoch"] = index, fps, 0

    def get_decoder_class(self):
        return FrameIdsDecoder


FIELDS = {"video": JPEGVideoField, "label": IntField, "index": IntField}


# --------------------------------------------------------------------------- random draws
@njit(cache=True)
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def draw(seed, epoch, index, k, n):
    """A uniform integer in [0, n) for draw ``k`` of sample ``index``
    (splitmix64 over the four numbers): the same in every thread and run."""
    h = _mix(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
    h = _mix(h ^ np.uint64(epoch))
    h = _mix(h ^ np.uint64(index))
    h = _mix(h ^ np.uint64(k))
    return np.int64(h % np.uint64(n))


@njit(cache=True)
def window_start(seed, epoch, index, num_frames, window, train):
    delta = num_frames - window
    if delta <= 0:
        return 0
    if train:
        return draw(seed, epoch, index, 0, delta + 1)
    return delta // 2


@njit(cache=True)
def _scaled(height, width, short):
    if height <= width:
        return short, np.int64(math.floor(width * short / height + 0.5))
    return np.int64(math.floor(height * short / width + 0.5)), short


@njit(cache=True)
def _u32(data, i):
    p = 4 * i
    return (np.int64(data[p]) | (np.int64(data[p + 1]) << 8) | (np.int64(data[p + 2]) << 16)
            | (np.int64(data[p + 3]) << 24))


# --------------------------------------------------------------------------- decoders
# compiled once per process (not per epoch's loader): fewer compiles, and no
# numba dispatcher finalised while another epoch's code still refers to it
_imdecode = Compiler.compile(imdecode)
_resize = Compiler.compile(resize_crop)


class _VideoOp(Operation):
    """What both decoders share: the clip spec, seed and mode (the epoch
    comes from the metadata at run time)."""

    def __init__(self, spec: ClipSpec = ClipSpec(), crop_size: int = 224, train: bool = False, seed: int = 0):
        super().__init__()
        self.spec, self.crop_size, self.train, self.seed = spec, crop_size, train, seed


class FrameIdsDecoder(_VideoOp):
    """int64 [T]: the source frame numbers of the clip ClipDecoder makes."""

    def declare_state_and_memory(self, previous_state):
        shape = (self.spec.fast_frames,)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<i8")), \
            AllocationQuery(shape, np.dtype("<i8"))

    def generate_code(self):
        seed, train = self.seed, self.train
        window, stride, frames = self.spec.window, self.spec.stride, self.spec.fast_frames

        def decode(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                m = metadata[batch_indices[i]]
                n = np.int64(m["num_frames"])
                start = window_start(seed, m["epoch"], m["index"], n, window, train)
                for t in range(frames):
                    destination[i, t] = (start + stride * t) % n
            return destination[:len(batch_indices)]

        return decode


class ClipDecoder(_VideoOp):
    """uint8 [3, T, S, S]: decode the window's JPEGs, resize the frame so its
    short side is the drawn scale, crop, mirror (channels first)."""

    def declare_state_and_memory(self, previous_state):
        s, t = self.crop_size, self.spec.fast_frames
        heights, widths = self.metadata["height"].astype(int), self.metadata["width"].astype(int)
        hi = max(scale_range(s)[1], s)
        scaled = [scaled_size(h, w, hi) for h, w in zip(heights, widths)]
        decoded = int((heights * widths).max()) * 3
        resized = max(h * w for h, w in scaled) * 3
        out = (3, t, s, s)
        return replace(previous_state, jit_mode=True, shape=out, dtype=np.dtype("u1")), (
            AllocationQuery(out, np.dtype("u1")),
            AllocationQuery((decoded,), np.dtype("u1")),
            AllocationQuery((resized,), np.dtype("u1")))

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_c = _imdecode, _resize
        seed, train, s = self.seed, self.train, self.crop_size
        window, stride, frames = self.spec.window, self.spec.stride, self.spec.fast_frames
        lo, hi = scale_range(s)

        def decode(batch_indices, storage, metadata, storage_state):
            destination, decoded, resized = storage
            for i in my_range(len(batch_indices)):
                m = metadata[batch_indices[i]]
                data = mem_read(m["ptr"], storage_state)
                n, index, epoch = np.int64(m["num_frames"]), m["index"], m["epoch"]
                height, width = np.int64(m["height"]), np.int64(m["width"])
                start = window_start(seed, epoch, index, n, window, train)
                short = lo + draw(seed, epoch, index, 1, hi - lo + 1) if train else lo
                h, w = _scaled(height, width, max(short, s))
                if train:
                    y0 = draw(seed, epoch, index, 2, h - s + 1)
                    x0 = draw(seed, epoch, index, 3, w - s + 1)
                    flip = draw(seed, epoch, index, 4, 2) == 1
                else:
                    y0, x0, flip = (h - s) // 2, (w - s) // 2, False
                frame = decoded[i][:height * width * 3].reshape(height, width, 3)
                big = resized[i][:h * w * 3].reshape(h, w, 3)
                base = 4 * (n + 1)
                for t in range(frames):
                    k = (start + stride * t) % n
                    jpeg = data[base + _u32(data, k):base + _u32(data, k + 1)]
                    imdecode_c(jpeg, frame, height, width, height, width, 0, 0, 1, 1, False, False)
                    resize_c(frame, 0, height, 0, width, big)
                    out = destination[i, :, t]
                    for y in range(s):
                        for x in range(s):
                            xs = x0 + (s - 1 - x if flip else x)
                            for c in range(3):
                                out[c, y, x] = big[y0 + y, xs, c]
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# --------------------------------------------------------------------------- order
class _RankOrder(TraversalOrder):
    """This rank's samples for the owner's current epoch (the rotation of
    :func:`loaders.ranks.rank_indices`, with its padded repeat), in FFCV's
    QUASI_RANDOM order (page-local), a seeded permutation, or as stored;
    minus what a resumed epoch has already consumed. FFCV calls an order
    *instance* with the loader."""

    def __init__(self, kind: str, owner: "FFCVLoader"):
        self.kind, self.owner, self.skip = kind, owner, 0

    def __call__(self, loader):
        super().__init__(loader)
        self.quasi = QuasiRandom(loader) if self.kind == "quasi_random" else None
        return self

    def sample_order(self, _ffcv_epoch: int):
        o = self.owner
        positions, pad = rank_indices(o.total, o.rank, o.world_size, o.epoch)
        unique = np.asarray(positions[:len(positions) - pad], dtype=np.int64)
        if self.quasi is not None:
            self.quasi.indices = unique
            self.quasi.prepare_data_structures()
            order = self.quasi.sample_order(o.epoch)
        elif self.kind == "random":
            order = np.random.default_rng([o.seed, o.epoch, o.rank]).permutation(unique)
        else:
            order = unique
        return np.concatenate([order, np.asarray(positions[len(unique):], dtype=np.int64)])[self.skip:]


# --------------------------------------------------------------------------- loader
class FFCVLoader(EpochState):
    """Iterates batches of the contract from a .beton; see :func:`loaders.build_loader`."""

    def __init__(self, path: str, spec: ClipSpec, *, batch_size: int, crop_size: int, train: bool, normalize: bool,
                 device: str, rank: int, world_size: int, num_workers: int, seed: int, channels_last: bool,
                 os_cache: bool = False, order: str | None = None, drop_last: bool = False, batches_ahead: int = 3,
                 num_clips: int = 1, num_crops: int = 1, independent_crops: bool = False):
        if (not train and num_clips * num_crops > 1) or independent_crops:
            raise ValueError("ffcv backend: multi-view evaluation and independent crops are not supported; "
                             "use the pyav or dali backend")
        order = order or ("sequential" if not train else "random" if os_cache else "quasi_random")
        if order not in ORDERS:
            raise ValueError(f"ffcv backend: order {order!r}: choose one of {', '.join(ORDERS)}")
        if order == "quasi_random" and os_cache:
            raise ValueError("ffcv backend: QUASI_RANDOM needs os_cache=False (FFCV's process cache); "
                             "use order='random' with os_cache=True")
        try:
            reader = Reader(str(path), custom_handlers=FIELDS)
        except (OSError, ValueError, AssertionError) as e:
            raise FileNotFoundError(f"{path}: not a readable FFCV dataset ({type(e).__name__}: {e})") from None
        if set(reader.field_names) != set(FIELDS):
            raise ValueError(f"{path}: fields {reader.field_names}, expected {list(FIELDS)} "
                             "(write it with shard_tools/make_ffcv.py)")
        self.total = int(reader.num_samples)
        if self.total == 0:
            raise ValueError(f"{path}: the dataset holds no videos")
        self.path, self.spec, self.batch_size, self.train, self.seed = str(path), spec, batch_size, train, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.finish = Normalizer(spec.alpha, normalize, device, channels_last)
        self.stats = LoaderStats()
        self.order = _RankOrder(order, self)
        args = (spec, crop_size, train, seed)
        pipelines = {"fast": PipelineSpec("video", decoder=ClipDecoder(*args)),
                     "frame_ids": PipelineSpec("video", decoder=FrameIdsDecoder(*args)),
                     "label": [IntDecoder()], "index": [IntDecoder()], "video": None}
        threads = torch.get_num_threads()
        self.loader = Loader(self.path, batch_size=batch_size, num_workers=max(1, num_workers), os_cache=os_cache,
                             order=self.order, seed=seed, pipelines=pipelines, custom_fields=FIELDS,
                             drop_last=drop_last, batches_ahead=batches_ahead)
        torch.set_num_threads(threads)  # FFCV sets torch's threads to its worker count; keep the caller's
        self.names = list(self.loader.pipeline_specs)
        # the run-time epoch column (see the module docstring) lives in a writable copy of the metadata
        self.loader.reader.metadata = self.loader.reader.metadata.copy()
        self.video_meta = self.loader.reader.metadata[f"f{reader.field_names.index('video')}"]
        self.num_videos = int(self.video_meta["index"].max()) + 1  # bank rows: manifest positions

    def samples_per_epoch(self) -> int:
        return len(rank_indices(self.total, self.rank, self.world_size, self.epoch)[0])

    def __iter__(self):
        start = self._take_resume()
        total = len(self)
        if start >= total:
            return
        self.order.skip = start * self.batch_size
        self.video_meta["epoch"] = self.epoch
        threads = torch.get_num_threads()
        it = iter(self.loader)
        torch.set_num_threads(threads)
        try:
            while self._batches < total:
                with Timer(self.stats):
                    out = next(it, None)
                if out is None:
                    break
                yield self._emit(dict(zip(self.names, out)))
        finally:
            it.close()

    def _emit(self, out: dict) -> dict:
        self._batches += 1
        self.stats.batches += 1
        fast = torch.from_numpy(out["fast"])
        self.stats.clips += fast.shape[0]
        meta = {"label": torch.from_numpy(out["label"].reshape(-1).copy()),
                "index": torch.from_numpy(out["index"].reshape(-1).copy()),
                "frame_ids": torch.from_numpy(out["frame_ids"].copy())}
        return self.finish(fast, None, meta)
