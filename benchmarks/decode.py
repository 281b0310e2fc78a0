"""`decode` suite: the DALI data path in detail, on Kinetics-length shards.

Side by side in one run (on cuda every measurement stops after the batch
that passes ``max_seconds``, and the JSON is rewritten after each):

* DALI decode-only (the dali backend's own pipeline up to its video decoder:
  its source — the windows and the bytes they need — and the decode) and its full graph (resize, crop, normalise,
  hand-over), each on members cut to the window's fragments and on whole
  members (``window_cut=False``: the graph before fragment tables), at
  ``num_threads`` 4, 8 and 16 on cuda (1 and 2 on a CPU). During each, the
  GPU's and the video decoder's (NVDEC) utilisation are sampled with
  ``nvidia-smi -q -d UTILIZATION`` (median and max; none without nvidia-smi).
* One size for all: the same videos scaled to one frame size (340x256)
  against their own sizes (340, 342 and 456 wide at short side 256), DALI
  decode-only, cut, at the most threads: DALI reuses an NVDEC decoder only
  for an identical coded size, and Kinetics has many widths.
* A reference for what NVDEC gives from the same bytes: NVIDIA's
  PyNvVideoCodec (``SimpleDecoder.get_batch_frames_by_index``) decoding the
  same windows' frames of the same members, cut and whole, from threads
  (cuda only; skipped with a note where it does not import).
* The window's position: one 1200-frame member, a batch of the same window
  decoded at starts 0 .. 1136, cut and whole (decode-only): a cut window
  should cost the same anywhere (``position_cut_last_over_first`` near 1);
  a whole member costs more the later the window.

* A 15-minute video (AVA's keyframe clips), see :mod:`benchmarks.long_video`:
  keyframe clips at its start against its end (pyav and dali), bytes read
  per clip against the member, and the same video as a PySlowFast-style
  JPEG frame folder: bytes on disk and clips/s side by side.

In that order (the priority of a time-limited GPU lease). Shards: the real
videos played forwards and backwards to 300 frames (the first of them to
1200 for the position), replicated, packed as H.264 on cuda and VP9 on a
CPU (DALI's CPU decoder reads only VP8/VP9), or ``--shards``.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import failure, lengthened, progress, ratio, summarize, write_result
from benchmarks.loader import _pack, _rate_dali_decode_only, _rate_loader
from loaders import build_loader
from loaders.fragments import FRAGMENT_MEMBERS, Fragments
from loaders.sampling import ClipSpec
from loaders.shards import resolve_shards
from vthcl.options import UsageError

POSITIONS = (0, 272, 544, 816, 1136)  # window starts in a 1200-frame member (the last valid one: 1136)


# --------------------------------------------------------------------------- utilisation
_UTIL_LINE = re.compile(r"^\s*(Gpu|Memory|Encoder|Decoder|JPEG|OFA)\s*:\s*(\d+)\s*%", re.MULTILINE)


def parse_utilization(text: str) -> dict[str, int]:
    """The instantaneous percentages of ``nvidia-smi -q -d UTILIZATION`` (its
    "Utilization" section: gpu, memory, encoder, decoder, jpeg, ofa), the
    first GPU's; the "... Utilization Samples" sections (min/max/avg) are not read."""
    out: dict[str, int] = {}
    for name, value in _UTIL_LINE.findall(text):
        out.setdefault(name.lower(), int(value))
    return out


class Utilization:
    """Samples ``command`` (nvidia-smi) every ``interval`` s in a thread while
    inside the block; ``summary()`` gives median/max per field, or None where
    the command is missing or printed nothing it could read."""

    def __init__(self, interval: float = 0.5,
                 command: tuple[str, ...] = ("nvidia-smi", "-q", "-d", "UTILIZATION", "-i", "0")):
        self.interval, self.command = interval, command
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            try:
                text = subprocess.run(self.command, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                return
            sample = parse_utilization(text)
            if sample:
                self.samples.append(sample)
            self._stop.wait(self.interval)

    def __enter__(self):
        if shutil.which(self.command[0]):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        fields = sorted({k for s in self.samples for k in s})
        out = {k: {"median": statistics.median(v), "max": max(v)}
               for k in fields for v in [[s[k] for s in self.samples if k in s]]}
        return {**out, "samples": len(self.samples)}


# --------------------------------------------------------------------------- position
def _samples(tar: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of one tar, in tar order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as t:
        for m in t:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def _long_member(shards: str) -> tuple[bytes, Fragments, int]:
    """The first video member of ``shards``, its fragment table and frame count."""
    s = next(iter(_samples(resolve_shards(shards).tars[0]).values()))
    return s["mp4"], Fragments.from_members(*(s[m] for m in FRAGMENT_MEMBERS)), int(json.loads(s["json"])["num_frames"])


def _position_rates(data: bytes, frags: Fragments, start: int, n: int, cut: bool, device: str, threads: int,
                    runs: int, blocks: int = 3) -> list[float]:
    """Clips/s decoding the window at ``start`` (16 frames, stride 4) of one
    member, a batch of ``threads`` copies (one per thread), from the dali
    backend's cut (the init segment and the window's fragments, as its source
    reads them) or the whole member: one rate per block of ``runs`` batches,
    ``blocks`` blocks on one pipeline."""
    from nvidia.dali import fn, pipeline_def, types
    spec = ClipSpec()
    ids = spec.frame_ids(start, n)
    base = 0
    if cut:
        data, base = frags.cut(data, int(ids.min()), int(ids.max()))
    video = np.frombuffer(data, np.uint8)
    ids = (ids - base).astype(np.int32)
    batch = max(1, threads)
    gpu = device == "cuda"

    @pipeline_def(batch_size=batch, num_threads=max(1, threads), device_id=0 if gpu else None,
                  prefetch_queue_depth=1)
    def graph():
        enc, fr = fn.external_source(source=lambda: ([video] * batch, [ids] * batch), batch=True,
                                     num_outputs=2, dtype=[types.UINT8, types.INT32])
        return fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=fr)

    pipe = graph()
    pipe.build()
    pipe.run()  # warm-up: threads, decoders
    rates = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(runs):
            pipe.run()
        rates.append(batch * runs / (time.perf_counter() - t))
    return rates


# --------------------------------------------------------------------------- PyNvVideoCodec
def _pynvc_rate(shards: str, cut: bool, threads: int, clips: int, max_seconds: float) -> float:
    """Clips/s of NVIDIA's PyNvVideoCodec decoding each clip's 16 frames (RGB,
    on the GPU) from the same members (cut to the window's fragments, or
    whole) in ``threads`` threads; a member is a file for SimpleDecoder."""
    import PyNvVideoCodec as nvc
    import torch
    spec = ClipSpec()
    work = Path(tempfile.mkdtemp(prefix="bench_pynvc_", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    jobs = []
    try:
        rng = np.random.default_rng(0)
        for tar in resolve_shards(shards).tars:
            for key, s in _samples(tar).items():
                n = int(json.loads(s["json"])["num_frames"])
                ids = spec.frame_ids(spec.starts(n, True, rng)[0], n)
                data, base = s["mp4"], 0
                if cut:
                    frags = Fragments.from_members(*(s[m] for m in FRAGMENT_MEMBERS))
                    data, base = frags.cut(data, int(ids.min()), int(ids.max()))
                path = work / f"{key}.mp4"
                path.write_bytes(data)
                jobs.append((str(path), [int(i) - base for i in ids]))
                if len(jobs) >= clips:
                    break
            if len(jobs) >= clips:
                break

        def decode(job):
            path, ids = job
            dec = nvc.SimpleDecoder(path, gpu_id=0, use_device_memory=True, output_color_type=nvc.OutputColorType.RGB)
            frames = [torch.from_dlpack(f) for f in dec.get_batch_frames_by_index(ids)]
            torch.cuda.synchronize()
            return len(frames)

        decode(jobs[0])  # warm-up: CUDA context, decoder
        done, t = 0, time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(decode, jobs):
                done += 1
                if time.perf_counter() - t > max_seconds:
                    break
        return done / (time.perf_counter() - t)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- a 15-minute video
def _long_video_stage(videos: Path, tmp: Path, device: str, seconds: int, threads: int, cap: float, results: dict,
                      settings: dict, measure, notes: list) -> None:
    """The long-video measurements (see benchmarks.long_video), recorded through ``measure``."""
    from benchmarks import long_video as lv
    gpu = device == "cuda"
    try:
        video = lv.long_video(videos, tmp, seconds)
        h264 = lv.pack_events(video, tmp, "h264", seconds, threads)
        dali_shards = h264 if gpu else lv.pack_events(video, tmp, "vp9", seconds, threads)
        frames = tmp / "ava_long_jpeg"
        sizes = {"seconds": seconds, "frames": seconds * lv.FPS, "keyframes": len(lv.keyframes(seconds)),
                 "member_bytes_h264": lv.member_size(h264), "shard_bytes_h264": lv.shard_bytes(h264),
                 "jpeg_bytes": lv.jpeg_frames(video, frames), "jpeg_quality": "mjpeg qmin=qmax=1 (ffmpeg -q:v 1)"}
    except (Exception, SystemExit) as e:  # reported, the rest of the suite stands
        results["long_video"] = failure(e)
        return
    settings["long_video"] = sizes
    secs = lv.keyframes(seconds)
    halves = (secs[:(len(secs) + 1) // 2], secs[(len(secs) + 1) // 2:])
    for name, backend, shards in (("pyav", "pyav", h264), ("dali", "dali", dali_shards)):
        for half, where in enumerate(("start", "end")):
            def rate(b=backend, s=shards, h=half, n=name, w=where):
                r, per_clip = lv.rate_events(s, b, h, device, threads, cap)
                sizes[f"{n}_bytes_read_per_clip_{w}"] = per_clip
                sizes.setdefault(f"{n}_bytes_read_per_clip", per_clip)
                return r
            measure(f"long_{name}_{where}", rate)
    for half, where in enumerate(("start", "end")):
        measure(f"long_jpeg_{where}", lambda h=half: lv.rate_jpeg(frames / video.stem, halves[h], seconds * lv.FPS,
                                                                   threads, cap))
    notes.append(f"long video: {seconds} s at 256p; the start/end halves are a loader's ranks 0 and 1 of 2; "
                 f"dali reads {'H.264 on NVDEC' if gpu else 'VP9 (its CPU decoder)'}, pyav and the JPEG frames "
                 "the same windows")


# --------------------------------------------------------------------------- the suite
def run(videos: Path | None, out: Path, quick: bool, device: str = "cpu", shards: str | None = None,
        workers: int | None = None, long_seconds: int | None = None) -> Path:
    """The suite (see the module docstring); ``long_seconds``: the long video's length (900, or 120 with
    ``quick``)."""
    gpu = device == "cuda"
    threads = (4, 8, 16) if gpu else (1, 2)
    if workers:
        threads = tuple(t for t in threads if t <= workers) or (workers,)
    batch = 32 if gpu else 8  # the per-GPU batch on cuda (what DALI decodes in parallel)
    copies = 1 if quick else (32 if gpu else 4)
    cap = 5.0 if gpu else (3.0 if quick else 30.0)
    epochs = 1 if quick else 2
    runs = 2 if quick else 8  # batches per timed block of the position measurement (3 blocks)
    codec = "h264" if gpu else "vp9"
    tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    notes = []
    try:
        given = shards
        if shards is None:
            if videos is None:
                raise UsageError("the decode suite needs --videos (to pack Kinetics-length shards) or --shards")
            src = lengthened(videos, tmp / "lengthened_300", 300)
            shards = str(_pack(src[0].parent, tmp, codec, copies, name="kinetics"))
        long_shards = uniform_shards = None
        if videos is not None:
            uniform = lengthened(videos, tmp / "uniform_300", 300, size=(340, 256))
            uniform_shards = str(_pack(uniform[0].parent, tmp, codec, max(1, copies // 4), name="uniform"))
            long_src = lengthened(videos, tmp / "lengthened_1200", 1200, first=1)
            long_shards = str(_pack(long_src[0].parent, tmp, codec, 1, name="long"))
        packed = f"{videos} played to 300 frames, x{copies}, {codec}"
        settings = {"device": device, "videos": str(videos), "shards": given or packed, "codec": codec,
                    "threads": list(threads),
                    "batch_size": batch, "max_seconds": cap, "epochs": epochs, "copies": copies,
                    "positions": list(POSITIONS), "position_runs": runs, "position_blocks": 3, "repeats": 1}
        results: dict[str, dict] = {}

        def report(final: bool = False) -> Path:
            ratios = {}
            for t in threads:
                for what in ("decode_only", "full"):
                    ratios[f"dali_{what}_cut_over_whole_t{t}"] = ratio(results, f"dali_{what}_cut_t{t}",
                                                                       f"dali_{what}_whole_t{t}")
                ratios[f"dali_full_over_decode_only_cut_t{t}"] = ratio(results, f"dali_full_cut_t{t}",
                                                                       f"dali_decode_only_cut_t{t}")
            for mode in ("cut", "whole"):
                ratios[f"position_{mode}_last_over_first"] = ratio(
                    results, f"position_{mode}_at_{POSITIONS[-1]:04d}", f"position_{mode}_at_{POSITIONS[0]:04d}")
            best = max(threads)
            ratios[f"dali_decode_only_one_size_over_own_sizes_t{best}"] = ratio(
                results, f"dali_decode_only_cut_one_size_t{best}", f"dali_decode_only_cut_t{best}")
            ratios["dali_decode_only_cut_over_pynvc_cut"] = ratio(results, f"dali_decode_only_cut_t{best}",
                                                                  f"pynvc_cut_t{best}")
            for backend in ("pyav", "dali"):
                ratios[f"long_{backend}_end_over_start"] = ratio(results, f"long_{backend}_end",
                                                                 f"long_{backend}_start")
            ratios["long_pyav_over_jpeg_frames"] = ratio(results, "long_pyav_start", "long_jpeg_start")
            sizes = settings.get("long_video", {})
            if "jpeg_bytes" in sizes:
                ratios["long_shard_bytes_over_jpeg_bytes"] = sizes["shard_bytes_h264"] / sizes["jpeg_bytes"]
                ratios["long_pyav_bytes_read_per_clip_over_member"] = \
                    sizes.get("pyav_bytes_read_per_clip", 0) / sizes["member_bytes_h264"]
            return write_result(out, "decode", dict(settings, complete=final), results, ratios, "clips/s",
                                notes, plot_png=final)

        def measure(name: str, fn) -> None:
            """One measurement (a rate, or a list of them) with the utilisation sampled; the JSON
            rewritten after it."""
            try:
                with Utilization() as util:
                    rates = fn()
                rates = rates if isinstance(rates, list) else [rates]
                rate = summarize(rates)["median"]
                results[name] = summarize(rates)
                if util.summary():
                    results[name]["utilization"] = util.summary()
                progress(f"{name}: {rate:.4g} {json.dumps(util.summary()) if util.summary() else ''}")
            except Exception as e:  # reported, the others still run
                results[name] = failure(e)
            report()

        common = dict(batch_size=batch, crop_size=224, device=device, train=True)
        for t in threads:  # in priority order: the decoder alone, then the graph around it
            for what in ("decode_only", "full"):
                for cut in (True, False):
                    def make(t=t, cut=cut):
                        return build_loader(shards, backend="dali", num_workers=t, window_cut=cut, **common)
                    rate = (lambda m=make: _rate_dali_decode_only(m, epochs, cap)) if what == "decode_only" \
                        else (lambda m=make: _rate_loader(m, epochs, cap))
                    measure(f"dali_{what}_{'cut' if cut else 'whole'}_t{t}", rate)
        if uniform_shards is not None:
            def one_size():
                return build_loader(uniform_shards, backend="dali", num_workers=max(threads), **common)
            measure(f"dali_decode_only_cut_one_size_t{max(threads)}",
                    lambda: _rate_dali_decode_only(one_size, epochs, cap))
        if gpu:
            try:
                import PyNvVideoCodec  # noqa: F401
                for cut in (True, False):
                    measure(f"pynvc_{'cut' if cut else 'whole'}_t{max(threads)}",
                            lambda c=cut: _pynvc_rate(shards, c, max(threads), 4 * batch, cap))
            except ImportError as e:
                notes.append(f"PyNvVideoCodec does not import ({e}): no NVDEC reference figure")
        else:
            notes.append("PyNvVideoCodec needs a GPU: no NVDEC reference on a CPU")
        if long_shards is not None:
            data, frags, n = _long_member(long_shards)
            settings["position_member_frames"] = n
            for start in POSITIONS:
                for cut in (True, False):
                    measure(f"position_{'cut' if cut else 'whole'}_at_{start:04d}",
                            lambda s=start, c=cut: _position_rates(data, frags, s, n, c, device, max(threads), runs))
        else:
            notes.append("no --videos: no position measurement (it packs a 1200-frame video from them)")
        if videos is not None:
            _long_video_stage(videos, tmp, device, long_seconds or (120 if quick else 900), max(threads), cap,
                              results, settings, measure, notes)
        else:
            notes.append("no --videos: no long-video measurement (it makes a 15-minute video from them)")
        return report(final=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
