"""`e2e` suite: the real loader feeding the train step, against the same step
fed by the synthetic backend (the upper bound); the data-wait fraction.

On a GPU: R18 and R50 at the paper's settings (crop 224, 8+16 frames, 32 clips
per GPU = 256 on 8 GPUs, bf16, channels_last_3d, 240k-row banks, N=16384),
fed by DALI (NVDEC, members cut to their windows) and, as PySlowFast users do,
by PyAV workers on all the machine's cores and on 8 of them (an 8-GPU node
has fewer cores per GPU than a lent single-GPU machine); R18 also compiled
(torch.compile), fed by DALI. Each measurement stops after ``max_seconds``
(a slow loader gets a rate, not a stalled run). What the measured clips/s
per GPU make the paper's pretraining (Kinetics-400, 240k videos x 200
epochs) on one 8-GPU node, against our targets (``TARGET_HOURS``: the
step-bound times, i.e. a loader that costs nothing). On a CPU a small R18
configuration.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from benchmarks.common import cores, ratio, repeat_rates, summarize, write_result
from benchmarks.step import Trainer, endless, measure_steps
from loaders import build_loader, resolve_shards

KINETICS_CLIPS = 240_000 * 200  # videos x epochs of the paper's pretraining
# hours on 8 GPUs: the step-bound times of the step suite on an H100, rounded up (docs/benchmarks.md)
TARGET_HOURS = {"r18": 3.5, "r50": 9}
PYAV_CORES_PER_GPU = 8  # PyAV's figure also at 8 workers: what one GPU of an 8-GPU node has


def run(out: Path, shards: str, quick: bool, device: str = "cpu", workers: int | None = None) -> Path:
    gpu = device == "cuda"
    crop, batch, width = (224, 32, 64) if gpu else (112, 4, 16)
    archs = ["r18", "r50"] if gpu else ["r18"]
    # on a (lent, time-limited) GPU one repeat per configuration, each stopped after max_seconds
    steps, repeats = (30, 1) if gpu else (20, 3)
    if quick:
        steps, repeats = max(3, steps // 3), 1
    max_seconds = 10.0 if gpu else float("inf")  # per measurement: a slow loader is rated, not waited for
    workers = workers or cores()
    # on GPU: DALI (NVDEC) and PyAV workers (PySlowFast's way: all cores, and 8) each feeding the step
    feeds = {"dali": ("dali", workers), "pyav": ("pyav", workers)} if gpu else {"pyav": ("pyav", workers)}
    if gpu and workers > PYAV_CORES_PER_GPU:
        feeds[f"pyav{PYAV_CORES_PER_GPU}"] = ("pyav", PYAV_CORES_PER_GPU)
    backends = list(feeds)
    n = resolve_shards(shards).total
    waits = {}

    def real(trainer, name, feed):
        backend, num_workers = feeds[feed]
        loader = build_loader(shards, backend=backend, batch_size=batch, crop_size=crop, device=device,
                              num_workers=num_workers, channels_last=gpu)
        data = endless(loader)
        trainer(next(data))  # warm-up, and the first batch's worker start-up
        wait0, t = loader.stats.wait_s, time.perf_counter()
        rate = measure_steps(trainer, data, 0, steps, max_seconds)
        waits.setdefault(name, []).append((loader.stats.wait_s - wait0) / (time.perf_counter() - t))
        return rate

    def synthetic(trainer):
        data = endless(build_loader(None, backend="synthetic", num_videos=n, batch_size=batch, crop_size=crop,
                                    device=device, channels_last=gpu))
        return measure_steps(trainer, data, 1, steps, max_seconds)

    # R18 compiled too (the target is a compiled run), fed by DALI: its own arch entry "r18c"
    runs = archs + (["r18c"] if gpu else [])
    settings = {"device": device, "backends": backends, "feeds": {k: {"backend": b, "workers": w}
                                                                  for k, (b, w) in feeds.items()},
                "archs": runs, "width": width, "crop": crop,
                "batch_per_gpu": batch, "workers": workers, "steps": steps, "max_seconds": max_seconds,
                "repeats": repeats, "shards": shards, "goals": {"e2e_over_synthetic": {"cuda": 0.95}},
                "target_hours_on_8_gpus": TARGET_HOURS}

    def report(results: dict, complete: bool) -> Path:
        """The JSON of what is measured so far (after every measurement: a run cut short by a GPU
        lease's time limit keeps its figures); the plot once complete."""
        ratios = {}
        for arch in runs:
            for b in (["dali"] if arch == "r18c" else backends):
                name = f"{b}_e2e_{arch}"
                if name in waits and "median" in results.get(name, {}):
                    results[name]["data_wait"] = summarize(waits[name][:len(results[name]["runs"])])
                prefix = "" if b == backends[0] else f"{b}_"
                ratios[f"{prefix}e2e_over_synthetic_{arch}"] = ratio(results, name, f"synthetic_{arch}")
                ratios[f"{prefix}data_wait_fraction_{arch}"] = results.get(name, {}).get("data_wait", {}).get("median")
        main = [ratios[f"e2e_over_synthetic_{a}"] for a in archs]
        ratios["e2e_over_synthetic"] = None if None in main else min(main)
        done = dict(settings, complete=complete)
        if gpu:  # what a user can expect: the measured clips/s of one GPU, on one 8-GPU node
            done["kinetics400_pretraining"] = {
                arch: {name.split("_")[0]: {"clips_per_s_per_gpu": results[name]["median"],
                                            "hours_on_8_gpus": round(KINETICS_CLIPS / (8 * results[name]["median"])
                                                                     / 3600, 1)}
                       for name in [f"{b}_e2e_{arch}" for b in backends] + [f"synthetic_{arch}"]
                       if "median" in results.get(name, {})} | {"target_hours": TARGET_HOURS[arch[:3]],
                                                               "compiled": arch == "r18c"}
                for arch in runs}
        return write_result(out, "e2e", done, results, ratios, "clips/s (loader + train step)", plot_png=complete)

    results = {}
    for arch in runs:
        # on GPU the banks are Kinetics-sized (240k rows, N=16384 negatives), as in the step suite
        trainer = Trainer(arch[:3], width, "bf16" if gpu else "fp32", gpu, arch == "r18c", device,
                          240_000 if gpu else n)
        configs = {f"{b}_e2e_{arch}": partial(real, trainer, f"{b}_e2e_{arch}", b)
                   for b in (["dali"] if arch == "r18c" else backends)}
        configs[f"synthetic_{arch}"] = partial(synthetic, trainer)
        results.update(repeat_rates(configs, repeats, on_result=lambda r, _: report({**results, **r}, False)))
        trainer = configs = None
    return report(results, True)
