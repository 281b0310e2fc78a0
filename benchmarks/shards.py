"""`shards` suite: make_shards videos/s against a bare PyAV transcode of the
same files with the same worker processes and encoder settings.

The bare transcode is what one writes without make_shards: decode, FFmpeg's
own ``fps`` and ``scale`` filters, encode to memory — no tar, no index, no
metadata, no failure bookkeeping.
"""
from __future__ import annotations

import io
import multiprocessing
import shutil
import tempfile
from pathlib import Path

import av
import av.filter

from benchmarks.common import cores, ratio, repeat_rates, replicate, timed, video_files, write_result
from shard_tools.make_shards import pack as make_shards
from shard_tools.transcode import ENCODER, MEMBER_EXT, EncodeSettings, encoder_options, output_size
from vthcl.options import UsageError


def bare_transcode(job: tuple[str, str, int, int, int, int]) -> int:
    path, codec, fps, short_side, gop, threads = job
    with av.open(path) as src:
        ist = src.streams.video[0]
        ist.thread_type = "AUTO"
        w, h = output_size(ist.codec_context.width, ist.codec_context.height, short_side)
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=ist), graph.add("fps", str(fps)),
                 graph.add("scale", f"{w}:{h}:flags=area"), graph.add("format", "yuv420p"),
                 graph.add("buffersink")]
        graph.link_nodes(*chain).configure()
        out = av.open(io.BytesIO(), "w", format=MEMBER_EXT[codec])
        ost = out.add_stream(ENCODER[codec], rate=fps)
        ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
        ost.codec_context.thread_count = threads
        # the encoder options make_shards uses for these settings
        ost.options = encoder_options(EncodeSettings(codec=codec, fps=fps, short_side=short_side, gop=gop))
        n = 0

        def drain():
            nonlocal n
            while True:
                try:
                    frame = graph.vpull()
                except (av.error.BlockingIOError, av.error.EOFError):
                    return
                frame.pict_type = av.video.frame.PictureType.NONE
                for packet in ost.encode(frame):
                    out.mux(packet)
                n += 1

        for frame in src.decode(ist):
            graph.vpush(frame)
            drain()
        graph.vpush(None)
        drain()
        for packet in ost.encode():
            out.mux(packet)
        out.close()
    return n


def run(videos: Path, out: Path, quick: bool, codec: str = "h264", workers: int | None = None,
        copies: int | None = None) -> Path:
    workers = workers or cores()
    copies = copies or (2 if quick else 6)
    repeats = 1 if quick else 3
    files = video_files(videos)
    if not files:
        raise UsageError(f"no videos in {videos}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    src = tmp / "src"
    inputs = [str(p) for p in replicate(videos, src, copies)]
    threads = max(1, cores() // workers)
    jobs = [(p, codec, 30, 256, 16, threads) for p in inputs]
    runs = iter(range(1000))

    def bare():
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(bare_transcode, jobs, chunksize=1)
        return len(inputs)

    def ours():
        dest = tmp / f"out{next(runs)}"
        made = make_shards(src, dest, quiet=True, workers=workers, codec=codec, fps=30, short_side=256, gop=16)
        assert made["failed"] == 0, f"make_shards failed on {made['failed']} (see {made['failed_path']})"
        shutil.rmtree(dest)
        return len(inputs)

    try:
        results = repeat_rates({"bare_pyav_transcode": lambda: timed(bare), "make_shards": lambda: timed(ours)},
                               repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {"make_shards_over_bare_transcode": ratio(results, "make_shards", "bare_pyav_transcode")}
    settings = {"videos": [f.name for f in files], "copies": copies, "inputs": len(inputs), "workers": workers,
                "codec": codec, "fps": 30, "short_side": 256, "gop": 16, "repeats": repeats,
                "goals": {"make_shards_over_bare_transcode": 0.9}}
    return write_result(out, "shards", settings, results, ratios, "videos/s")
