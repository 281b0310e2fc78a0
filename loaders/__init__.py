"""Clip loaders behind one batch contract.

    from loaders import build_loader
    loader = build_loader("shards/manifest.json", backend="pyav", batch_size=8, device="cpu")
    for batch in loader:       # {"slow", "fast", "label", "index", "frame_ids"}
        ...

Backends: ``"dali"`` (GPU decode with device="cuda"; DALI's CPU decoder for
VP9/MJPEG shards with device="cpu"), ``"pyav"`` (CPU workers), ``"ffcv"`` (a
.beton of JPEG frames written by ``shard_tools/make_ffcv.py``; the ffcv
extra), ``"synthetic"`` (random tensors from memory: the upper bound for
benchmarks). See :mod:`loaders.contract` for the contract. Every loader also
has ``num_videos`` (memory-bank rows: the manifest's video count), ``len``,
``set_epoch`` and ``stats``.
"""
from __future__ import annotations

from loaders.base import make_sampler
from loaders.contract import MEAN, STD
from loaders.sampling import ClipSpec
from loaders.shards import Shards, resolve_shards
from loaders.system import cores

BACKENDS = ("dali", "pyav", "ffcv", "synthetic")


SAMPLER_OPTIONS = ("independent_crops", "num_clips", "num_crops", "eval_short_side", "tau_a", "tau_o")


def build_loader(shards, *, backend: str, batch_size: int, tau: int = 8, alpha: int = 2, slow_frames: int = 8,
                 crop_size: int = 224, train: bool = True, normalize: bool = True, device: str = "cuda",
                 rank: int = 0, world_size: int = 1, num_workers: int | None = None, seed: int = 0,
                 channels_last: bool = False, **options):
    """Build a loader yielding dicts ``slow``, ``fast``, ``label``, ``index``, ``frame_ids``
    (and an event dataset's fields: see :mod:`loaders.events`).

    ``shards``: a manifest.json, a shard folder, a brace pattern or a list of
    tars; for ``backend="ffcv"`` a .beton (``None`` is allowed for
    ``backend="synthetic"`` with ``num_videos=``). The dataset's kind comes
    from its manifest: whole videos, or events in long videos (make_shards
    ``--layout ava|epic``; backends pyav and dali), each with its sampling
    policy (:mod:`loaders.sampling`). ``num_workers``: decoding processes
    (pyav; 0 = in-process; default: CPU cores) or threads (dali, ffcv).
    Sampling options (every backend): ``independent_crops``, ``num_clips``
    and ``num_crops`` (evaluation views; not ffcv), ``eval_short_side``
    (ava: the evaluation frame's short side, default 256), ``tau_a`` and
    ``tau_o`` (epic: seconds anticipated and observed, default 1 and 1).
    Backend options: ``drop_last``, ``shuffle_buffer`` (pyav),
    ``window_cut`` (dali, pyav: decode each clip from its member cut to the
    fragments its window needs — the default where the shards carry
    fragment tables; False decodes whole members), ``view_cut`` (dali:
    "each" view its own cut, the default, or one "cover"ing all views),
    ``source_workers`` (dali: processes reading the bytes; 0 reads them in
    the calling process), ``os_cache`` and ``order`` (ffcv), ``num_videos``
    (synthetic).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    spec = ClipSpec(tau=tau, alpha=alpha, slow_frames=slow_frames)
    if num_workers is None:
        num_workers = cores()
    common = dict(batch_size=batch_size, crop_size=crop_size, train=train, normalize=normalize, device=device,
                  rank=rank, world_size=world_size, seed=seed, channels_last=channels_last)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    sampling = {k: options.pop(k) for k in SAMPLER_OPTIONS if k in options}
    if backend == "synthetic":
        from loaders.synthetic import SyntheticLoader
        num_videos = options.pop("num_videos", None)
        _check_options(backend, SyntheticLoader, options, common)
        if num_videos is None:
            if shards is None:
                raise ValueError("synthetic backend: give shards or num_videos=")
            num_videos = resolve_shards(shards).total
        sampler = make_sampler(None, spec, crop_size, train, **sampling)
        return SyntheticLoader(num_videos, spec, sampler, **common, **options)
    if shards is None:
        raise ValueError(f"{backend} backend: shards are required")
    if backend == "ffcv":
        from loaders.ffcv import FFCVLoader
        _check_options(backend, FFCVLoader, options, common)
        return FFCVLoader(shards, spec, make_sampler(None, spec, crop_size, train, **sampling),
                          num_workers=num_workers, **common, **options)
    resolved = resolve_shards(shards)
    sampler = make_sampler(resolved, spec, crop_size, train, **sampling)
    if backend == "pyav":
        from loaders.pyav import PyAVLoader
        _check_options(backend, PyAVLoader, options, common)
        return PyAVLoader(resolved, spec, sampler, num_workers=num_workers, **common, **options)
    from loaders.dali import DALILoader
    _check_options(backend, DALILoader, options, common)
    return DALILoader(resolved, spec, sampler, num_threads=max(1, num_workers), **common, **options)


def _check_options(backend: str, cls, options: dict, common: dict) -> None:
    """Every backend refuses options it does not take the same way: a TypeError naming them and what it
    takes (its keyword-only parameters less what build_loader passes itself: ``common`` and the workers,
    plus the sampling options every backend takes)."""
    import inspect
    params = inspect.signature(cls.__init__).parameters
    takes = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - set(common) - {"num_workers", "num_threads"}
    unknown = sorted(set(options) - takes)
    if unknown:
        raise TypeError(f"{backend} backend: unknown options {unknown} (it takes "
                        f"{', '.join(sorted(takes | set(SAMPLER_OPTIONS)))})")


__all__ = ["build_loader", "BACKENDS", "ClipSpec", "Shards", "resolve_shards", "MEAN", "STD"]
