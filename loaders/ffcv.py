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

The video metadata also has an ``epoch`` column, written as 0 and read by
nothing (kept so that files keep one layout). What a clip takes comes from the
sampling policy every backend shares (:mod:`loaders.sampling`): before each
epoch the loader asks its sampler for every sample's view, drawn from
``(seed, epoch, index)`` as in the other backends, and writes the plan —
the fast frame ids, the resized size, the crop's corner and the mirror —
into columns of its in-memory metadata. A compiled FFCV op sees its closure
as constants, so the metadata is how a plan reaches it without rebuilding
(and recompiling) the pipeline.

The pipeline, declared once (ffcv-imagenet style)::

    video  -> ClipDecoder      decode the plan's alpha*slow_frames JPEGs,
                               resize (short side), crop, flip
                               -> uint8 [B, 3, T, S, S]
    video  -> FrameIdsDecoder  the plan's frame ids -> int64 [B, T]
    label, index -> IntDecoder
    main thread: torch, device, normalise, slow = fast[:, :, ::alpha]

``frame_ids`` always names the frames in ``fast``, in any thread and run.
One ``ffcv.Loader`` is compiled per loader, once. Order:
QUASI_RANDOM in training (page-local shuffling, for datasets larger than
RAM) with ``os_cache=False``; RANDOM with ``os_cache=True``; sequential in
evaluation. Ranks read contiguous ranges of the file (the rotation of
:func:`loaders.ranks.rank_indices`), because FFCV's QUASI_RANDOM has no
``distributed=True``.

The frame is resized whole, then cropped, so in evaluation the PyAV backend
and this one give the same pixels up to JPEG and resampling differences. Bad videos never reach a .beton (make_ffcv
reports them in ``OUT.failed.jsonl``). Not supported here: multi-view
evaluation and independent crops (use the pyav or dali backend).
"""
from __future__ import annotations

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

from loaders.base import ClipLoader
from loaders.ranks import rank_indices
from loaders.sampling import ClipInfo, ClipSampler, ClipSpec, sample_rng, scale_range, scaled_size
from loaders.state import Timer

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


def plan_dtype(spec: ClipSpec) -> np.dtype:
    """The plan columns the loader adds to the video metadata: a view of the sampler."""
    return np.dtype([("frame_ids", "<i8", (spec.fast_frames,)), ("scaled_h", "<i8"), ("scaled_w", "<i8"),
                     ("y0", "<i8"), ("x0", "<i8"), ("flip", "<i8")])


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
    """What both decoders share: the clip spec and the crop size (what each
    clip takes comes from the plan columns of the metadata at run time)."""

    def __init__(self, spec: ClipSpec = ClipSpec(), crop_size: int = 224):
        super().__init__()
        self.spec, self.crop_size = spec, crop_size


class FrameIdsDecoder(_VideoOp):
    """int64 [T]: the source frame numbers of the clip ClipDecoder makes."""

    def declare_state_and_memory(self, previous_state):
        shape = (self.spec.fast_frames,)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<i8")), \
            AllocationQuery(shape, np.dtype("<i8"))

    def generate_code(self):
        frames = self.spec.fast_frames

        def decode(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                m = metadata[batch_indices[i]]
                for t in range(frames):
                    destination[i, t] = m["frame_ids"][t]
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
        s, frames = self.crop_size, self.spec.fast_frames

        def decode(batch_indices, storage, metadata, storage_state):
            destination, decoded, resized = storage
            for i in my_range(len(batch_indices)):
                m = metadata[batch_indices[i]]
                data = mem_read(m["ptr"], storage_state)
                n = np.int64(m["num_frames"])
                height, width = np.int64(m["height"]), np.int64(m["width"])
                h, w, y0, x0, flip = m["scaled_h"], m["scaled_w"], m["y0"], m["x0"], m["flip"] == 1
                frame = decoded[i][:height * width * 3].reshape(height, width, 3)
                big = resized[i][:h * w * 3].reshape(h, w, 3)
                base = 4 * (n + 1)
                for t in range(frames):
                    k = m["frame_ids"][t]
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
class FFCVLoader(ClipLoader):
    """Iterates batches of the contract from a .beton; see :func:`loaders.build_loader`."""

    def __init__(self, path: str, spec: ClipSpec, sampler: ClipSampler, *, batch_size: int, crop_size: int,
                 train: bool, normalize: bool, device: str, rank: int, world_size: int, num_workers: int, seed: int,
                 channels_last: bool, os_cache: bool = False, order: str | None = None, drop_last: bool = False,
                 batches_ahead: int = 3):
        if sampler.num_views > 1 or sampler.independent_crops:
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
        if int(reader.num_samples) == 0:
            raise ValueError(f"{path}: the dataset holds no videos")
        self.path = str(path)
        self._setup(None, spec, sampler, batch_size=batch_size, crop_size=crop_size, train=train,
                    normalize=normalize, device=device, rank=rank, world_size=world_size, seed=seed,
                    channels_last=channels_last, drop_last=drop_last, num_videos=0)
        self.total = int(reader.num_samples)
        self.order = _RankOrder(order, self)
        args = (spec, crop_size)
        pipelines = {"fast": PipelineSpec("video", decoder=ClipDecoder(*args)),
                     "frame_ids": PipelineSpec("video", decoder=FrameIdsDecoder(*args)),
                     "label": [IntDecoder()], "index": [IntDecoder()], "video": None}
        threads = torch.get_num_threads()
        self.loader = Loader(self.path, batch_size=batch_size, num_workers=max(1, num_workers), os_cache=os_cache,
                             order=self.order, seed=seed, pipelines=pipelines, custom_fields=FIELDS,
                             drop_last=drop_last, batches_ahead=batches_ahead)
        torch.set_num_threads(threads)  # FFCV sets torch's threads to its worker count; keep the caller's
        self.names = list(self.loader.pipeline_specs)
        # the plan columns (see the module docstring) live in an extended copy of the metadata
        field = f"f{reader.field_names.index('video')}"
        self.loader.reader.metadata = _with_plan(self.loader.reader.metadata, field, plan_dtype(spec))
        self.video_meta = self.loader.reader.metadata[field]
        self.num_videos = int(self.video_meta["index"].max()) + 1  # bank rows: manifest positions

    def _plan(self) -> None:
        """Write this epoch's view of each of this rank's samples into the plan columns."""
        m = self.video_meta
        for p in dict.fromkeys(self.rank_samples()):
            info = ClipInfo(int(m["num_frames"][p]), int(m["height"][p]), int(m["width"][p]), float(m["fps"][p]))
            (view,) = self.sampler.views(info, sample_rng(self.seed, self.epoch, int(m["index"][p])))
            m["frame_ids"][p] = view.frame_ids
            c = view.crop
            m["scaled_h"][p], m["scaled_w"][p], m["y0"][p], m["x0"][p], m["flip"][p] = \
                c.height, c.width, c.y0, c.x0, int(c.flip)

    def __iter__(self):
        start = self._take_resume()
        total = len(self)
        if start >= total:
            return
        self.order.skip = start * self.batch_size
        self._plan()
        threads = torch.get_num_threads()
        it = iter(self.loader)
        torch.set_num_threads(threads)
        try:
            while self._batches < total:
                with Timer(self.stats):
                    out = next(it, None)
                if out is None:
                    break
                self._batches += 1
                meta = {"label": torch.from_numpy(out[self.names.index("label")].reshape(-1).copy()),
                        "index": torch.from_numpy(out[self.names.index("index")].reshape(-1).copy()),
                        "frame_ids": torch.from_numpy(out[self.names.index("frame_ids")].copy())}
                yield self.batch(torch.from_numpy(out[self.names.index("fast")]), None, meta)
        finally:
            it.close()


def _with_plan(metadata: np.ndarray, field: str, plan: np.dtype) -> np.ndarray:
    """A copy of FFCV's metadata whose ``field`` record also has the ``plan`` columns (zeros)."""
    names = metadata.dtype.names
    inner = metadata.dtype[field]
    extended = np.dtype([(n, metadata.dtype[n] if n != field else np.dtype(inner.descr + plan.descr)) for n in names])
    out = np.zeros(metadata.shape, extended)
    for n in names:
        if n == field:
            for k in inner.names:
                out[n][k] = metadata[n][k]
        else:
            out[n] = metadata[n]
    return out
