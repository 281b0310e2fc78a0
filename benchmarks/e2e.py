"""`e2e` suite: the real loader feeding the train step, against the same step
fed by the synthetic backend (the upper bound); the data-wait fraction."""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import cores, ratio, summarize, write_result
from benchmarks.step import Trainer, endless, measure_steps
from loaders import build_loader, resolve_shards


def run(out: Path, shards: str, quick: bool, device: str = "cpu", workers: int | None = None) -> Path:
    gpu = device == "cuda"
    crop, batch, width = (224, 32, 64) if gpu else (112, 4, 16)
    arch = "r18"
    steps, repeats = (30, 3) if gpu else (6, 2)
    if quick:
        steps, repeats = max(3, steps // 3), 1
    workers = workers or cores()
    backend = "dali" if gpu else "pyav"
    n = resolve_shards(shards).total
    trainer = Trainer(arch, width, "bf16" if gpu else "fp32", gpu, False, device, n)
    results, waits = {}, []

    def real():
        loader = build_loader(shards, backend=backend, batch_size=batch, crop_size=crop, device=device,
                              num_workers=workers)
        data = endless(loader)
        trainer(next(data))  # warm-up, and the first batch's worker start-up
        wait0, t = loader.stats.wait_s, time.perf_counter()
        rate = measure_steps(trainer, data, 0, steps)
        waits.append((loader.stats.wait_s - wait0) / (time.perf_counter() - t))
        return rate

    def synthetic():
        data = endless(build_loader(None, backend="synthetic", num_videos=n, batch_size=batch, crop_size=crop,
                                    device=device))
        return measure_steps(trainer, data, 1, steps)

    runs = {f"{backend}_e2e": [], "synthetic": []}
    for _ in range(repeats):
        runs[f"{backend}_e2e"].append(real())
        runs["synthetic"].append(synthetic())
    results = {k: summarize(v) for k, v in runs.items()}
    results[f"{backend}_e2e"]["data_wait"] = summarize(waits)
    ratios = {"e2e_over_synthetic": ratio(results, f"{backend}_e2e", "synthetic"),
              "data_wait_fraction": results[f"{backend}_e2e"]["data_wait"]["median"]}
    settings = {"device": device, "backend": backend, "arch": arch, "width": width, "crop": crop,
                "batch_per_gpu": batch, "workers": workers, "steps": steps, "repeats": repeats, "shards": shards,
                "goals": {"e2e_over_synthetic": {"cuda": 0.95}}}
    return write_result(out, "e2e", settings, results, ratios, "clips/s (loader + train step)")
