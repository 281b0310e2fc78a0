"""`loader` suite: loader-only clips/s for each backend and for the references.

Every configuration turns the same videos into training clips (random
window of 64 frames, 16 fast frames, random short-side jitter + 224 crop +
flip) with the same number of workers (processes; threads for dali and
ffcv), side by side in one run. The ffcv backend reads the same shards
converted by make_ffcv (JPEG q90); its .beton size against the tars is in
the settings. ``pyav_workers_only`` counts the pyav workers' uint8 clips
before the main process batches them (on a CPU device it makes the float
batch on the same cores; on cuda that happens on the GPU).

Window cuts: the real videos played forwards and backwards to 80 frames
(short), 300 (Kinetics-length) and 1200 (long), packed (VP9 on a CPU, for
DALI's CPU decoder; H.264 on cuda), and DALI run on them cut to the window's
fragments (its default) and on the whole member (``window_cut=False``: the
graph before fragment tables, which decodes from frame 0) side by side:
``dali_long_over_short`` (goal 0.8: a window costs the same wherever it
lies), ``dali_cut_over_whole_kinetics``, the evaluation views cut one by one
against one cut covering them (``view_cut``), and pyav cut against its seek.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch

from benchmarks import references
from benchmarks.common import cores, lengthened, ratio, repeat_rates, replicate, video_files, write_result
from loaders import build_loader
from loaders.sampling import ClipSpec
from loaders.shards import resolve_shards
from vthcl.options import JobError

BATCH = 8  # clips per batch on a CPU
GPU_BATCH = 32  # on cuda: the paper's per-GPU batch (256 on 8 GPUs)
CROP = 224


class _RefClips(torch.utils.data.Dataset):
    """(source, frame_ids, fps) items through one reference decoder."""

    def __init__(self, items, fn, epoch):
        self.items, self.fn, self.epoch = items, fn, epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        src, n, fps = self.items[i]
        if isinstance(src, tuple):  # (tar, offset, size): a shard member, read as the loader would
            with open(src[0], "rb") as f:
                f.seek(src[1])
                src = f.read(src[2])
        rng = np.random.default_rng([self.epoch, i])
        spec = ClipSpec()
        ids = spec.frame_ids(spec.starts(n, True, rng)[0], n)
        out = self.fn(src, ids, fps, CROP, rng)
        return out if isinstance(out, torch.Tensor) else torch.tensor(out)


def _shard_items(shards) -> list:
    items = []
    for tar in resolve_shards(shards).tars:
        with tarfile.open(tar) as t:
            members = {m.name: m for m in t}
            for name, m in members.items():
                if name.endswith(".json"):
                    info = json.loads(t.extractfile(m).read())
                    key = name[:-5]
                    video = next(members[key + "." + e] for e in ("mp4", "webm", "mkv") if key + "." + e in members)
                    items.append(((tar, video.offset_data, video.size), info["num_frames"], info["fps"]))
    return items


def _file_items(videos: Path) -> list:
    items = []
    for p in video_files(videos):
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            n = s.frames or sum(1 for _ in c.decode(s))
            items.append((str(p), n, float(s.average_rate)))
    return items


def _rate_loader(make, epochs: int, max_seconds: float = float("inf"), workers_only: bool = False) -> float:
    """clips/s over ``epochs`` epochs, or up to the batch that passes ``max_seconds``.
    ``workers_only``: count the pyav workers' uint8 clips before the main
    process batches them (``PyAVLoader.clips``), no float batch made."""
    loader = make()
    loader.set_epoch(epochs)  # warm-up, not timed: FFCV compiles its pipeline on the first batch
    next(iter(loader))
    clips, t = 0, time.perf_counter()
    for e in range(epochs):
        loader.set_epoch(e)
        counts = ((1 for c in loader.clips() if "__skip__" not in c) if workers_only
                  else (b["fast"].shape[0] for b in loader))
        for n in counts:
            clips += n
            if time.perf_counter() - t > max_seconds:
                return clips / (time.perf_counter() - t)
    return clips / (time.perf_counter() - t)


def _rate_reference(items, fn, workers: int, epochs: int, batch: int = BATCH,
                    max_seconds: float = float("inf")) -> float:
    clips, t = 0, time.perf_counter()
    for e in range(epochs):
        loader = torch.utils.data.DataLoader(_RefClips(items, fn, e), batch_size=batch, shuffle=True,
                                             num_workers=workers, worker_init_fn=lambda _: torch.set_num_threads(1))
        for b in loader:
            clips += b.shape[0]
            if time.perf_counter() - t > max_seconds:
                return clips / (time.perf_counter() - t)
    return clips / (time.perf_counter() - t)


def _rate_dali_decode_only(make, epochs: int, max_seconds: float = float("inf")) -> float:
    """The dali backend's pipeline up to its video decoder (its source: the
    views and the bytes they need; the decode; nothing resized or copied out): clips/s over ``epochs``
    epochs, or up to the batch that passes ``max_seconds``. The gap to the
    backend's rate is what its resize, crop, normalise and hand-over cost."""
    loader = make()
    loader.set_epoch(epochs)  # warm-up, not timed: threads, decoders
    loader.build_pipeline(decode_only=True).run()
    clips, t = 0, time.perf_counter()
    for e in range(epochs):
        loader.set_epoch(e)
        pipe = loader.build_pipeline(decode_only=True)  # (the source ends the epoch with StopIteration)
        while True:
            try:
                (frames,) = pipe.run()
            except StopIteration:
                break
            if loader.on_gpu:
                torch.cuda.synchronize()
            clips += len(frames)
            if time.perf_counter() - t > max_seconds:
                return clips / (time.perf_counter() - t)
    return clips / (time.perf_counter() - t)


def _pack(videos: Path, out: Path, codec: str, copies: int, name: str = "src", **options) -> Path:
    """``copies`` of the videos packed with ``codec`` and make_shards ``options`` into a folder named for them."""
    from shard_tools.make_shards import pack
    src = out / name
    if not src.exists():
        replicate(videos, src, copies)
    dest = out / "_".join([name, codec, *(f"{k}{v}" for k, v in sorted(options.items()))])
    made = pack(src, dest, quiet=True, codec=codec, samples_per_shard=16, **options)
    if made["failed"]:
        raise JobError(f"packing {videos}: {made['failed']} failed (see {made['failed_path']})")
    return dest


def _beton(h264: str, out: Path, workers: int) -> tuple[str, dict, float]:
    """The same shards as an FFCV .beton; its size against the tars; setup time (compile)."""
    from shard_tools.make_ffcv import make
    beton = out / "clips.beton"
    done = make(h264, beton, quiet=True, workers=workers)
    if done["failed"] or not done["written"]:
        raise JobError(f"make_ffcv on {h264}: {done['failed']} videos failed (see {done['failed_path']})")
    t = time.perf_counter()
    loader = build_loader(str(beton), backend="ffcv", batch_size=BATCH, crop_size=CROP, device="cpu",
                          num_workers=workers)
    next(iter(loader))
    setup = round(time.perf_counter() - t, 2)
    tars = sum(Path(t).stat().st_size for t in resolve_shards(h264).tars)
    sizes = {"beton_bytes": beton.stat().st_size, "beton_video_bytes": int(loader.video_meta["size"].sum()),
             "tars_bytes": tars, "quality": 90}
    sizes["beton_over_tars"] = round(sizes["beton_bytes"] / tars, 2)
    sizes["video_bytes_over_tars"] = round(sizes["beton_video_bytes"] / tars, 2)
    return str(beton), sizes, setup


LENGTHS = {"short": 80, "kinetics": 300, "long": 1200}  # frames of the window-cut sets (a window: 64)


def _window_cut_configs(videos: Path, tmp: Path, device: str, workers: int, common: dict, epochs: int,
                        cap: float, copies: int) -> dict:
    """DALI cut to the window vs the whole member on short, Kinetics-length and
    long videos; evaluation views cut one by one vs one covering cut; pyav cut
    vs seek. The same shards for each pair."""
    codec = "h264" if device == "cuda" else "vp9"
    sets = {}
    for name, frames in LENGTHS.items():
        src = lengthened(videos, tmp / f"lengthened_{frames}", frames)
        sets[name] = str(_pack(src[0].parent, tmp, codec, copies, name=f"{name}_src"))

    def rate(path: str, backend: str = "dali", decode_only: bool = False, **kw):
        def make():
            return build_loader(path, backend=backend, num_workers=workers, **{**common, **kw})
        if decode_only:
            return lambda: _rate_dali_decode_only(make, epochs, cap)
        return lambda: _rate_loader(make, epochs, cap)

    configs = {}
    for name in ("short", "long", "kinetics"):
        configs[f"dali_cut_{name}"] = rate(sets[name])
        configs[f"dali_whole_{name}"] = rate(sets[name], window_cut=False)
    for cut in (True, False):
        configs[f"dali_decode_only_{'cut' if cut else 'whole'}_kinetics"] = rate(sets["kinetics"], decode_only=True,
                                                                               window_cut=cut)
    evaluation = dict(train=False, num_clips=10)
    for view_cut in ("each", "cover"):
        configs[f"dali_eval_10_views_{view_cut}_kinetics"] = rate(sets["kinetics"], view_cut=view_cut, **evaluation)
    for name in ("kinetics", "long"):
        configs[f"pyav_cut_{name}"] = rate(sets[name], "pyav")
        configs[f"pyav_seek_{name}"] = rate(sets[name], "pyav", window_cut=False)
    return configs


def _window_cut_ratios(results: dict) -> dict:
    return {
        "dali_long_over_short": ratio(results, "dali_cut_long", "dali_cut_short"),
        "dali_whole_long_over_short": ratio(results, "dali_whole_long", "dali_whole_short"),
        "dali_cut_over_whole_kinetics": ratio(results, "dali_cut_kinetics", "dali_whole_kinetics"),
        "dali_cut_over_whole_long": ratio(results, "dali_cut_long", "dali_whole_long"),
        "dali_decode_only_cut_over_whole_kinetics": ratio(results, "dali_decode_only_cut_kinetics",
                                                          "dali_decode_only_whole_kinetics"),
        "dali_views_each_over_cover_kinetics": ratio(results, "dali_eval_10_views_each_kinetics",
                                                     "dali_eval_10_views_cover_kinetics"),
        "pyav_cut_over_seek_kinetics": ratio(results, "pyav_cut_kinetics", "pyav_seek_kinetics"),
        "pyav_cut_over_seek_long": ratio(results, "pyav_cut_long", "pyav_seek_long"),
    }


def _keyframe_configs(videos: Path, tmp: Path, device: str, workers: int, common: dict, epochs: int, cap: float,
                      quick: bool) -> dict:
    """AVA keyframe clips/s from shards: a long video (the first real one played to 2 or 10 minutes) packed
    as an AVA event dataset, a keyframe every second; training clips (the keyframe window, a random crop)
    of the slow clip alone (alpha 1), from pyav and from dali."""
    from benchmarks import long_video as lv
    seconds = 120 if quick else 600
    video = lv.long_video(videos, tmp, seconds)
    found = {"pyav": lv.pack_events(video, tmp, "h264", seconds, workers)}
    if device == "cuda":
        found["dali"] = found["pyav"]
    else:
        try:
            import nvidia.dali  # noqa: F401
            found["dali"] = lv.pack_events(video, tmp, "vp9", seconds, workers)
        except ImportError:
            pass
    keyframe = dict(common, alpha=1)
    return {f"ava_keyframes_{backend}": (lambda b=backend, path=str(path): _rate_loader(
        lambda: build_loader(path, backend=b, num_workers=workers, **keyframe), epochs, cap))
        for backend, path in found.items()}


def run(videos: Path, out: Path, quick: bool, device: str = "cpu", shards: str | None = None,
        workers: int | None = None) -> Path:
    workers = workers or cores()
    # a batch is what DALI decodes in parallel (one sample per thread): on cuda the per-GPU batch of training
    batch = GPU_BATCH if device == "cuda" else BATCH
    copies = 2 if quick else (32 if device == "cuda" else 8)  # a GPU decoder needs more clips to reach its rate
    epochs = 1 if quick else 2
    # a CPU's ratios vary run to run, so more repeats there; a lent GPU machine is time-limited, so there each
    # measurement stops after the batch that passes 15 s, and the JSON is written after every measurement
    repeats = 1 if quick else (3 if device == "cuda" else 5)
    cap = 15.0 if device == "cuda" else float("inf")
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    h264 = shards or str(_pack(videos, tmp, "h264", copies))
    vp9 = str(_pack(videos, tmp, "vp9", copies)) if device == "cpu" else None
    shard_items = _shard_items(h264)
    originals = _file_items(videos)
    file_items = originals * max(1, len(shard_items) // len(originals))  # as many clips as the shards hold
    reference = partial(_rate_reference, workers=workers, epochs=epochs, batch=batch, max_seconds=cap)
    common = dict(batch_size=batch, crop_size=CROP, device=device, train=True)
    configs = {
        "pyav": lambda: _rate_loader(lambda: build_loader(h264, backend="pyav", num_workers=workers, **common),
                                     epochs, cap),
        "pyav_workers_only": lambda: _rate_loader(
            lambda: build_loader(h264, backend="pyav", num_workers=workers, **common), epochs, cap, workers_only=True),
        "synthetic": lambda: _rate_loader(lambda: build_loader(h264, backend="synthetic", **common), epochs, cap),
        "slowfast_style_original_files": lambda: reference(file_items, references.slowfast_style),
        "slowfast_style_same_shards": lambda: reference(shard_items, references.slowfast_style),
        "codec_limit_same_shards": lambda: reference(shard_items, references.codec_limit),
    }
    notes = []
    try:
        import decord  # noqa: F401
        configs["decord_style_same_shards"] = lambda: reference(shard_items, references.decord_style)
    except ImportError:
        notes.append("decord (pip install decord2) is not installed: no mmaction2-style reference")
    try:
        import nvidia.dali  # noqa: F401
        dali_shards = h264 if device == "cuda" else vp9
        name = "dali_mixed_h264" if device == "cuda" else "dali_cpu_vp9"

        def dali(path: str):
            return lambda: build_loader(path, backend="dali", num_workers=workers, **common)

        def dali_rate(path: str):
            return lambda: _rate_loader(dali(path), epochs, cap)

        configs[name] = dali_rate(dali_shards)
        configs[name.replace("dali", "dali_decode_only", 1)] = lambda: _rate_dali_decode_only(
            dali(dali_shards), epochs, cap)
        if device == "cuda":  # the same videos without B-frames: DALI copies out-of-order frames one by one
            configs["dali_mixed_h264_no_bframes"] = dali_rate(str(_pack(videos, tmp, "h264", copies, bframes=0)))
        # (each stopped after the batch that passes 30 s on a CPU: whole members of long videos decode slowly)
        configs.update(_window_cut_configs(videos, tmp, device, workers, common, epochs, min(cap, 30.0),
                                           max(1, copies // 2)))
    except ImportError:
        notes.append("nvidia-dali is not installed: no dali figure")
    configs.update(_keyframe_configs(videos, tmp, device, workers, common, epochs, cap, quick))
    ffcv_sizes = None
    try:
        import ffcv  # noqa: F401
        beton, ffcv_sizes, ffcv_setup = _beton(h264, tmp, workers)
        configs["ffcv"] = lambda: _rate_loader(
            lambda: build_loader(beton, backend="ffcv", num_workers=workers, **common), epochs, cap)
        notes.append(f"ffcv: pipeline setup (numba compile, once per process) took {ffcv_setup} s, not in clips/s")
    except ImportError:
        notes.append("ffcv is not installed (the ffcv extra): no ffcv figure")
    settings = {"videos": str(videos), "copies": copies, "clips_per_epoch": len(shard_items), "epochs": epochs,
                "repeats": repeats, "max_seconds": cap, "workers": workers, "batch_size": batch, "crop": CROP,
                "tau": 8, "alpha": 2, "slow_frames": 8, "device": device, "ffcv_sizes": ffcv_sizes,
                "window_cut_lengths": LENGTHS, "window_cut_copies": max(1, copies // 2),
                "goals": {"pyav_over_slowfast_style": 4, "pyav_over_slowfast_style_same_shards": 1.5,
                          "pyav_over_codec_limit": 0.8, "pyav_over_decord": 1.0,
                          "dali_long_over_short": {"cpu": 0.8}}}

    def report(results: dict, rounds: int, final: bool = False) -> Path:
        """The JSON of what is measured so far (``rounds``: complete rounds), after every measurement,
        so a run cut short by a time limit keeps its figures; the plot with the final one."""
        for r in results.values():
            if "median" in r:
                r["per_core"] = r["median"] / workers
        ratios = {
            "pyav_over_slowfast_style": ratio(results, "pyav", "slowfast_style_original_files"),
            "pyav_over_slowfast_style_same_shards": ratio(results, "pyav", "slowfast_style_same_shards"),
            "pyav_over_codec_limit": ratio(results, "pyav", "codec_limit_same_shards"),
            # the same workers without the batch the main process makes (float on a CPU device, on the GPU on cuda)
            "pyav_workers_only_over_codec_limit": ratio(results, "pyav_workers_only", "codec_limit_same_shards"),
        }
        if "decord_style_same_shards" in configs:
            ratios["pyav_over_decord"] = ratio(results, "pyav", "decord_style_same_shards")
        dali = next((k for k in ("dali_mixed_h264", "dali_cpu_vp9") if k in configs), None)
        if dali:
            ratios["dali_over_pyav"] = ratio(results, dali, "pyav")
            ratios["dali_over_dali_decode_only"] = ratio(results, dali, dali.replace("dali", "dali_decode_only", 1))
        if "dali_mixed_h264_no_bframes" in configs:
            ratios["dali_no_bframes_over_dali"] = ratio(results, "dali_mixed_h264_no_bframes", dali)
        if "dali_cut_long" in configs:
            ratios.update(_window_cut_ratios(results))
        if "ava_keyframes_dali" in configs:
            ratios["ava_keyframes_dali_over_pyav"] = ratio(results, "ava_keyframes_dali", "ava_keyframes_pyav")
        if "ffcv" in configs:
            ratios["ffcv_over_pyav"] = ratio(results, "ffcv", "pyav")
            ratios["ffcv_beton_over_tars"] = ffcv_sizes["beton_over_tars"]
        return write_result(out, "loader", dict(settings, rounds_done=rounds, complete=final), results, ratios,
                            "clips/s", notes, plot_png=final)

    try:
        results = repeat_rates(configs, repeats, on_result=report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(results, repeats, final=True)
