"""What every suite shares: the machine, package versions, repeats, JSON and plots."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

from loaders.system import atomic, cores
from vthcl.options import UsageError

log = logging.getLogger(__name__)

PACKAGES = ["torch", "numpy", "av", "webdataset", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "ffcv", "decord2"]


VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}


def video_files(folder: Path) -> list[Path]:
    """The videos in ``folder``: a flat folder or a dataset tree of any depth
    (``<class>/<video>``, as Kinetics, UCF101 and HMDB51 are laid out),
    hidden files and folders left out; sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of videos")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise UsageError(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) in {folder} or below it")
    return found


def flat_name(path: Path, root: Path) -> str:
    """A file name for ``path`` that says where under ``root`` it was (``a/b.mp4`` -> ``a__b.mp4``)."""
    return "__".join(path.relative_to(root).parts)


def replicate(videos: Path, dest: Path, copies: int) -> list[Path]:
    """``copies`` symlinked copies of every video in ``videos`` (flat or a
    tree) under ``dest`` (more inputs than workers, the same bytes); returns
    the links, sorted."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        for f in video_files(videos):
            link = dest / f"{i:02d}_{flat_name(f, Path(videos))}"
            if not link.exists():
                os.symlink(f.resolve(), link)
    return sorted(dest.iterdir())


def lengthened(videos: Path, dest: Path, frames: int, short_side: int = 256, first: int | None = None,
               size: tuple[int, int] | None = None) -> list[Path]:
    """Every video in ``videos`` played forwards and backwards (no jump at the
    turn) until it is ``frames`` frames long, at ``short_side`` (or scaled to
    exactly ``size`` = (width, height), aspect not kept), as
    ``dest/<name>_<frames>.mp4`` (H.264, crf 16): Kinetics-length (300 frames)
    or longer videos made from the real ones (``first``: only the first so
    many). Made once; returns them sorted."""
    import av

    from shard_tools.transcode import output_size
    dest.mkdir(parents=True, exist_ok=True)
    made = []
    for src in video_files(videos)[:first]:
        path = dest / f"{flat_name(src, Path(videos)).replace('.', '_')}_{frames}.mp4"
        made.append(path)
        if path.exists():
            continue
        with av.open(str(src)) as c:
            s = c.streams.video[0]
            w, h = size or output_size(s.codec_context.width, s.codec_context.height, short_side)
            seq = [f.reformat(width=w, height=h, format="yuv420p").to_ndarray() for f in c.decode(s)]
        cycle = seq + seq[-2:0:-1] if len(seq) > 2 else seq
        with atomic(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
            st = out.add_stream("libx264", rate=30)
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.options = {"crf": "16", "preset": "ultrafast"}
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(cycle[i % len(cycle)], format="yuv420p")
                frame.pts = i
                for packet in st.encode(frame):
                    out.mux(packet)
            for packet in st.encode():
                out.mux(packet)
    return sorted(made)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": cores(), "python": platform.python_version(), "platform": platform.platform(),
            "gpu": None}
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def repeat_rates(configs: dict[str, Callable[[], float]], repeats: int,
                 on_result: Callable[[dict[str, dict], int], None] | None = None) -> dict[str, dict]:
    """Run every config ``repeats`` times, interleaved (so drift hits all alike);
    each call returns a rate (items/s). ``on_result(results, rounds_done)``
    after each measurement (rounds_done: the rounds complete so far): a
    suite writes what it has, so a run stopped by a time limit (a lent
    GPU's) still leaves its figures."""
    runs: dict[str, list[float]] = {name: [] for name in configs}
    errors: dict[str, dict] = {}

    def results() -> dict[str, dict]:
        return {name: errors.get(name) or summarize(v) for name, v in runs.items() if v or name in errors}

    last = list(configs)[-1] if configs else None
    for done in range(1, repeats + 1):
        for name, fn in configs.items():
            if name in errors:
                continue
            try:
                runs[name].append(fn())
                progress(f"{name}: {runs[name][-1]:.4g}")
            except Exception as e:
                errors[name] = failure(e)
            if on_result is not None:
                on_result(results(), done if name == last else done - 1)
    return results()


def progress(msg: str) -> None:
    """A message per measurement, so a run cut short still shows what it measured."""
    log.info(msg)


def failure(e: Exception) -> dict:
    """A configuration that raised: logged with its traceback and reported in the result (its ratios are
    null); the others still run."""
    log.error(f"{type(e).__name__}: {e}", exc_info=e)
    return {"error": f"{type(e).__name__}: {e}"[:2000]}


def timed(fn: Callable[[], int]) -> float:
    """Call fn (which returns an item count) and return items/s."""
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def ratio(results: dict, a: str, b: str) -> float | None:
    """a's median over b's; None where either configuration failed (or has not run yet)."""
    if "median" not in results.get(a, {}) or "median" not in results.get(b, {}):
        return None
    return results[a]["median"] / results[b]["median"]


def write_result(out: Path, suite: str, settings: dict, results: dict, ratios: dict, unit: str,
                 notes: list[str] | None = None, plot_png: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"suite": suite, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
           "versions": versions(), "settings": settings, "unit": unit, "results": results,
           "ratios": ratios, "notes": notes or []}
    path = out / f"{suite}.json"
    path.write_text(json.dumps(doc, indent=1))
    if plot_png:
        plot(out / f"{suite}.png", suite, results, unit, doc["machine"])
    return path


def plot(path: Path, suite: str, results: dict, unit: str, mach: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in results if "median" in results[n]]  # (a failed configuration has only its error)
    med = [results[n]["median"] for n in names]
    lo = [results[n]["median"] - results[n]["min"] for n in names]
    hi = [results[n]["max"] - results[n]["median"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.6))
    ax.barh(names, med, xerr=[lo, hi], color="#4c72b0", capsize=3)
    for y, v in enumerate(med):
        ax.text(v, y, f" {v:.3g}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel(unit + " (median; bars: min-max)")
    where = mach["gpu"] or f"{mach['cores']}-core {mach['cpu']}"
    ax.set_title(f"{suite} — {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
