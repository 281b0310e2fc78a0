"""`scale` suite: a 10M-video plan, measured in simulation on one machine.

1. The shard index as the dataset grows: 100 -> 40,000 shards of 250
   samples (25k -> 10M videos; 16,000 shards is 10M at ~600 videos per 1 GB
   shard, what make_shards' default gives for Kinetics-like clips), made cheaply: one
   template tar of a make_shards sample's seven members (real small
   members, the video a sparse hole), its real ``.idx``, hard-linked as
   every shard, and a manifest. Each figure from a fresh process (its peak
   memory is its own):

   a. the whole dataset's index, as every rank read it before the compact
      index: ``resolve_shards`` of the manifest; pyav's ``SampleIndex``
      parsing every ``.idx`` line; the dali fragment-table check (now the
      manifest's ``member_format``); DALI's own ``fn.readers.webdataset``
      built on the index files, as far as it goes — with this machine's
      open-file limit and with ``ulimit -n 1024``;
   b. the compact index written by ``shard_tools.reindex`` (what make_shards
      and merge_parts write at pack time), then per rank (rank 0 of 8 and of
      256), with ``ulimit -n 1024`` set in the measuring process: the index
      start-up (from the manifest to the first batch's index work: the
      loader built and its epoch's plan made: pyav's byte-range chunks, the
      dali source with its range's rows), time and peak RSS above the
      imports; the files it opens; then the first batches' reads (dali: the
      source's reads of 64 batches of 32; pyav: the tar streams of its first
      8 chunks), the tars they open (all in the rank's range?) and the most
      files open at once; and for dali the pipeline build and the epoch
      boundary (the next epoch's source, on the next range, and pipeline).
2. Sharded memory banks at the largest n this machine holds: per-rank bank
   bytes, the bytes each rank receives per step through all_gather and
   all_reduce (counted on the collectives ``vthcl.memory`` calls), and the
   step time, on 2 and 4 gloo ranks — against the formula the design
   gives, which the table then extrapolates to n = 10M on 8 to 256 GPUs.

    python -m benchmarks.run --suite scale --out benchmarks/results/cpu [--quick]
"""
from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import progress, write_result

SAMPLES_PER_SHARD = 250
# a make_shards sample's members and sizes (a 10 s, 256p Kinetics clip: ~1.6 MB of video)
MEMBERS = [("cls", 2), ("frag_bytes", 168), ("frag_frames", 84), ("ids", 16), ("json", 420), ("mp4", 1_600_000),
           ("nframes", 4)]
LEVELS, DIM, NEGATIVES, GLOBAL_BATCH = 3, 128, 16384, 256


# --------------------------------------------------------------------------- the shard index
def _template(root: Path) -> tuple[Path, Path]:
    """One shard of SAMPLES_PER_SHARD make_shards samples: real small members
    (json, fragment table, ids, ...), the video member a sparse hole of its
    size (no bytes on disk), and its .idx written by write_index."""
    import tarfile

    from shard_tools.wds_index import write_index
    sizes = dict(MEMBERS)
    frags = sizes["frag_bytes"] // 8 - 1
    tar, idx = root / ".template.tar", root / ".template.idx"
    with open(tar, "wb") as f:
        for k in range(SAMPLES_PER_SHARD):
            info = {"label": k % 400, "label_name": "c", "num_frames": 300, "fps": 30.0, "width": 340,
                    "height": 256, "codec": "vp9", "duration": 10.0, "key": f"s{k:06d}", "index": k,
                    "fragments": frags, "window_cut": True}
            data = {"cls": str(k % 10).encode().rjust(sizes["cls"]),
                    "frag_bytes": np.linspace(800, sizes["mp4"], frags + 1).astype("<i8").tobytes(),
                    "frag_frames": np.linspace(0, 300, frags + 1).astype("<i4").tobytes(),
                    "ids": struct.pack("<qq", k, k % 400), "json": json.dumps(info).encode().ljust(sizes["json"]),
                    "nframes": struct.pack("<i", 300)}
            for ext, size in MEMBERS:
                header = tarfile.TarInfo(f"s{k:06d}.{ext}")
                header.size = size
                f.write(header.tobuf(tarfile.GNU_FORMAT))
                if ext in data:
                    assert len(data[ext]) == size, ext
                    f.write(data[ext])
                else:
                    f.seek(size, os.SEEK_CUR)
                f.seek(-size % 512, os.SEEK_CUR)
        f.truncate(f.tell() + 1024)  # the two zero blocks that end a tar
    write_index(str(tar), str(idx))
    return tar, idx


def make_dataset(root: Path, shards: int) -> Path:
    """``shards`` tars of SAMPLES_PER_SHARD samples, their .idx files and a
    manifest.json (no compact index yet); every shard's files are hard links
    of one pair (the index readers read each file anyway). Returns the
    manifest."""
    root.mkdir(parents=True, exist_ok=True)
    template_tar, template_idx = _template(root)
    entries = []
    for s in range(shards):
        name = f"train-{s:06d}"
        for ext, template in ((".tar", template_tar), (".idx", template_idx)):
            path = root / (name + ext)
            if not path.exists():
                os.link(template, path)
        entries.append({"path": name + ".tar", "num_samples": SAMPLES_PER_SHARD,
                        "first_index": s * SAMPLES_PER_SHARD})
    manifest = {"shards": entries, "total_samples": shards * SAMPLES_PER_SHARD, "classes": [],
                "settings": {"codec": "vp9"}, "member_format": "fmp4-fragments-v1"}
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def probe(kind: str, manifest: str, open_files: int | None = None) -> dict:
    """One measurement in this process: seconds and peak RSS above the baseline
    after imports; ``open_files``: raise this process's open-file limit first."""
    if open_files:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(open_files, hard), hard))
    import loaders.pyav  # noqa: F401  (imports first: the baseline)
    from loaders.shards import resolve_shards
    if kind == "dali_reader":
        from nvidia.dali import fn, pipeline_def, types
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    shards = resolve_shards(manifest)
    if kind == "sample_index":  # every .idx line parsed (what a loader did before the compact index)
        from loaders.pyav import SampleIndex
        shards.index = shards.manifest_path = None
        SampleIndex(shards)
    elif kind == "write_index":
        from shard_tools.reindex import reindex
        reindex(os.path.dirname(manifest))
    elif kind == "fragment_check":
        from loaders.dali import has_fragment_tables
        has_fragment_tables(shards)
    elif kind == "dali_reader":
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def graph():
            return fn.readers.webdataset(paths=shards.tars, index_paths=[shards.idx(t) for t in shards.tars],
                                         ext=["ids"], dtypes=[types.INT64], name="reader")
        pipe = graph()
        pipe.build()
        pipe.run()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"seconds": seconds, "peak_rss_mb": peak / 1024, "samples": shards.total, "open_fds": _fds()}


def _in_child(call: str, timeout: float) -> dict:
    """The JSON that ``benchmarks.scale.CALL`` returns, run in a fresh interpreter (its own memory, files
    and file limit), or ``{"error": why}``."""
    cmd = [sys.executable, "-c", f"import json, benchmarks.scale as s; print(json.dumps(s.{call}))"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if r.returncode != 0:  # DALI's own reason is the line after "encountered:"
        lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
        after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"]
        return {"error": (after or lines or [f"exit {r.returncode}"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _probe_in_child(kind: str, manifest: Path, timeout: float, open_files: int | None = None) -> dict:
    return _in_child(f"probe({kind!r}, {str(manifest)!r}, {open_files!r})", timeout)


RANK_BATCH, DALI_READ_BATCHES, PYAV_READ_CHUNKS = 32, 64, 8


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def opened_files():
    """The paths this process opens in the block (``builtins.open`` / ``io.open``, ``os.open`` and tarfile's own
    reference to open), absolute; the real functions are back after it."""
    seen: list[str] = []

    def recording(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                seen.append(os.path.abspath(os.fsdecode(file)))
            return real(file, *args, **kwargs)
        return wrapper

    patched = [(module, name, getattr(module, name))
               for module, name in ((builtins, "open"), (io, "open"), (os, "open"), (tarfile, "bltn_open"))]
    for module, name, real in patched:
        setattr(module, name, recording(real))
    try:
        yield seen
    finally:
        for module, name, real in patched:
            setattr(module, name, real)


def rank_probe(backend: str, manifest: str, world: int, rank: int = 0, open_files: int = 1024) -> dict:
    """One rank's index start-up, reads and (dali) epoch boundary, measured in
    this process with its open-file limit set to ``open_files`` first (see the
    module docstring). Files opened are counted by :func:`opened_files`; the
    most open at once from /proc/self/fd."""
    from types import SimpleNamespace
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(open_files, hard), hard))
    import loaders.dali  # noqa: F401  (imports first: the baseline)
    import loaders.pyav  # noqa: F401
    from loaders import build_loader
    from loaders.ranks import rank_range
    if backend == "dali":
        from nvidia.dali import fn, pipeline_def  # noqa: F401
    from webdataset import tariterators
    with opened_files() as opened:
        root = os.path.dirname(os.path.abspath(manifest))
        manifest_doc = json.loads(Path(manifest).read_text())
        total, per_shard = manifest_doc["total_samples"], SAMPLES_PER_SHARD

        def range_tars(epoch: int) -> set[str]:
            lo, hi = rank_range(total, rank, world, epoch)
            return {os.path.join(root, f"train-{s:06d}.tar") for s in range(lo // per_shard, (max(hi, lo + 1) - 1)
                                                                             // per_shard + 1)}

        def files(seen: list[str], epoch: int) -> dict:
            mine = range_tars(epoch)
            tars = {p for p in seen if p.endswith(".tar")}
            return {"tars": len(tars), "tars_outside_range": len(tars - mine), "idx": len({p for p in seen
                                                                                           if p.endswith(".idx")}),
                    "other": sorted({os.path.basename(p) for p in seen if not p.endswith((".tar", ".idx"))})}

        fds_before = _fds()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        common = dict(backend=backend, batch_size=RANK_BATCH, device="cpu", crop_size=112, rank=rank,
                      world_size=world, seed=0)
        if backend == "pyav":
            loader = build_loader(manifest, num_workers=0, **common)
            plan = loader._dataset(0).chunks
        else:
            loader = build_loader(manifest, num_workers=1, source_workers=0, **common)
            plan = loader._source(0)
        startup_s = time.perf_counter() - t
        startup_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        out = {"world": world, "rank": rank, "range_shards": len(range_tars(0)),
               "samples": len(loader.rank_sample_array()), "open_files_limit": min(open_files, hard),
               "startup_s": startup_s, "startup_peak_rss_mb": startup_mb,
               "startup_files": files(opened, 0), "fds_before": fds_before, "fds_after_startup": _fds()}
        opened.clear()
        peak_fds = _fds()
        t = time.perf_counter()
        if backend == "pyav":  # the tar streams of the first chunks, as a worker reads them
            import loaders.pyav as pyav
            read = 0
            for chunk in plan[:PYAV_READ_CHUNKS]:
                for sample in tariterators.group_by_keys(tariterators.tar_file_expander(pyav._open_ranges([chunk]))):
                    read += 1
                    peak_fds = max(peak_fds, _fds())
            out["read"] = {"chunks": min(PYAV_READ_CHUNKS, len(plan)), "samples": read}
        else:  # the source's reads (json, fragment table, init segment and window) of the first batches
            batches = min(DALI_READ_BATCHES, len(plan.batches))
            for b in range(batches):
                plan(SimpleNamespace(iteration=b, epoch_idx=0))
                peak_fds = max(peak_fds, _fds())
            out["read"] = {"batches": batches, "samples": sum(len(x) for x in plan.batches[:batches]),
                           "bytes_read": plan.reader.bytes_read}
        out["read"].update(seconds=time.perf_counter() - t, files=files(opened, 0), peak_fds=peak_fds)
        if backend == "dali":  # the pipeline of this epoch, then the next epoch's source (its range) and pipeline
            del plan
            t = time.perf_counter()
            pipe = loader.build_pipeline()
            out["pipeline_s"] = time.perf_counter() - t
            del pipe
            opened.clear()
            loader.set_epoch(1)
            t = time.perf_counter()
            pipe = loader.build_pipeline()
            out["epoch_boundary_s"] = time.perf_counter() - t
            del pipe
            out["epoch_boundary_files"] = files(opened, 1)
        out["peak_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        out["fds_end"] = _fds()
        return out


def _rank_probe_in_child(backend: str, manifest: Path, world: int, timeout: float) -> dict:
    return _in_child(f"rank_probe({backend!r}, {str(manifest)!r}, {world})", timeout)


# --------------------------------------------------------------------------- sharded banks
def _bank_worker(rank: int, world: int, init: str, rows: int, steps: int, result: str) -> None:
    """One gloo rank of a ShardedMemoryBank with ``rows`` rows: its bank bytes,
    the bytes it receives per step through the collectives, the step time."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from vthcl.memory import ShardedMemoryBank
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    received = [0]
    gather, reduce = dist.all_gather, dist.all_reduce

    def counted_gather(parts, x, *a, **k):
        received[0] += sum(p.numel() * p.element_size() for p in parts) - x.numel() * x.element_size()
        return gather(parts, x, *a, **k)

    def counted_reduce(x, *a, **k):  # a ring all-reduce moves 2 (W-1)/W of the tensor into each rank
        received[0] += 2 * (world - 1) * x.numel() * x.element_size() // world
        return reduce(x, *a, **k)
    dist.all_gather, dist.all_reduce = counted_gather, counted_reduce
    bank = ShardedMemoryBank(rows, LEVELS, DIM, NEGATIVES, seed=0)
    local = GLOBAL_BATCH // world
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps + 1):
        q = F.normalize(torch.randn(LEVELS, 2, local, DIM, generator=g), dim=-1).requires_grad_()
        index = torch.randint(0, rows, (local,), generator=g)
        before, t = received[0], time.perf_counter()
        loss, _ = bank.loss(q, index)
        loss.backward()
        bank.update(q.detach(), index)
        dist.barrier()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t)
            per_step = received[0] - before
    out = {"rank": rank, "bank_bytes": bank.banks.numel() * bank.banks.element_size(),
           "received_per_step": per_step, "step_s": sorted(times)[len(times) // 2]}
    Path(f"{result}.{rank}").write_text(json.dumps(out))
    dist.destroy_process_group()


def bank_traffic(rows: int, world: int, steps: int, tmp: Path) -> dict:
    import torch.multiprocessing as mp
    init = f"file://{tmp}/bank_init_{world}_{rows}"
    result = tmp / f"bank_{world}_{rows}"
    mp.spawn(_bank_worker, args=(world, init, rows, steps, str(result)), nprocs=world, join=True)
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
    return {"rows": rows, "world": world, "bank_mb_per_rank": max(r["bank_bytes"] for r in ranks) / 2 ** 20,
            "received_mb_per_step_per_rank": max(r["received_per_step"] for r in ranks) / 2 ** 20,
            "step_s": max(r["step_s"] for r in ranks)}


def formula(rows: int, world: int, bytes_per_value: int = 4) -> dict:
    """The design's per-rank figures (vthcl.memory.ShardedMemoryBank): its rows of
    both banks at every level; per step the other ranks' negative keys (all-gathered,
    N in all), the positives' all-reduce over the global batch, the global batch's
    features for the update (all-gathered), and the indices and sizes."""
    kv = LEVELS * 2 * DIM * 4  # bytes of one row's keys, all levels and banks, as float32 on the wire
    share = (world - 1) / world
    neg = share * NEGATIVES * kv
    pos = 2 * share * GLOBAL_BATCH * kv
    upd = share * GLOBAL_BATCH * kv
    small = share * GLOBAL_BATCH * 8 * 3 + (world - 1) * 8 * 4
    return {"bank_mb_per_rank": LEVELS * 2 * -(-rows // world) * DIM * bytes_per_value / 2 ** 20,
            "received_mb_per_step_per_rank": (neg + pos + upd + small) / 2 ** 20}


# --------------------------------------------------------------------------- the suite
# the goals for a rank's index start-up at 40,000 shards (10M videos): seconds, MB
GOALS = {8: (5.0, 200.0), 256: (2.0, 50.0)}
WORLDS = (8, 256)


def goals(results: dict, n: int) -> dict:
    """Per backend and world size at ``n`` shards: the start-up against GOALS,
    and no tar outside the rank's range, no .idx, at most the limit's files
    open at once."""
    out = {}
    for world, (seconds, mb) in GOALS.items():
        for backend in ("pyav", "dali"):
            r = results.get(f"rank_{backend}_{world}_ranks_{n}_shards", {})
            if "error" in r or not r:
                out[f"{backend}_{world}_ranks"] = {"met": False, "why": r.get("error", "not measured")}
                continue
            outside = (r["startup_files"]["tars_outside_range"] + r["read"]["files"]["tars_outside_range"]
                       + r.get("epoch_boundary_files", {}).get("tars_outside_range", 0))
            idx = r["startup_files"]["idx"] + r["read"]["files"]["idx"]
            checks = {"startup_s": r["startup_s"] <= seconds, "startup_peak_rss_mb": r["startup_peak_rss_mb"] <= mb,
                      "own_range_only": outside == 0 and idx == 0,
                      "open_files": r["read"]["peak_fds"] <= r["open_files_limit"]}
            out[f"{backend}_{world}_ranks"] = {"met": all(checks.values()), **checks}
    return out


def run(out: Path, quick: bool = False) -> Path:
    counts = [100, 1000] if quick else [100, 1000, 10000, 16000, 40000]
    kinds = ["manifest", "sample_index", "fragment_check", "dali_reader"]
    results, notes = {}, []
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    timeout = 120 if quick else 900
    settings = {"samples_per_shard": SAMPLES_PER_SHARD, "shard_counts": counts, "members": MEMBERS,
                "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE), "rank_open_files_limit": 1024,
                "worlds": list(WORLDS), "rank_batch": RANK_BATCH, "dali_read_batches": DALI_READ_BATCHES,
                "pyav_read_chunks": PYAV_READ_CHUNKS, "goals_at_40000_shards": {str(w): g for w, g in GOALS.items()},
                "levels": LEVELS, "dim": DIM, "negatives": NEGATIVES, "global_batch": GLOBAL_BATCH}

    def record(name: str, r: dict) -> None:
        results[name] = r
        progress(f"{name}: {r}")

    try:
        for n in counts:
            manifest = make_dataset(tmp / f"shards_{n}", n)
            # a. the whole dataset's index, as every rank read it before the compact index
            for kind in kinds:
                r = _probe_in_child(kind, manifest, timeout=timeout)
                record(f"{kind}_{n}_shards", r)
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                if kind == "dali_reader" and "Too many open files" in r.get("error", "") and hard > 2 * n:
                    # DALI's reader opens every tar at build: again with the limit raised (the hard one allows)
                    record(f"{kind}_{n}_shards_open_files_{2 * n}", _probe_in_child(kind, manifest, 900, 2 * n))
            if n == counts[-1] or not quick:  # what DALI's own reader does where the open-file limit is 1,024
                record(f"dali_reader_{n}_shards_open_files_1024",
                       _probe_in_child("dali_reader", manifest, timeout, 1024))
            # b. the compact index (pack time), then each rank's own rows and files
            record(f"write_index_{n}_shards", _probe_in_child("write_index", manifest, timeout))
            for world in WORLDS if n == counts[-1] or not quick else ():
                for backend in ("pyav", "dali"):
                    record(f"rank_{backend}_{world}_ranks_{n}_shards",
                           _rank_probe_in_child(backend, manifest, world, timeout))
            shutil.rmtree(tmp / f"shards_{n}")
        results[f"goals_{counts[-1]}_shards"] = goals(results, counts[-1])
        rows = 20_000 if quick else 2_000_000  # 2M rows x 3 levels x 2 banks x 128 x 4 B = 6.1 GB in all
        for world in ([2] if quick else [2, 4]):
            r = bank_traffic(rows, world, 2 if quick else 5, tmp)
            r["formula"] = formula(rows, world)
            results[f"sharded_bank_{rows}_rows_{world}_ranks"] = r
            progress(f"sharded bank {rows} rows, {world} ranks: {r}")
        plan = {}
        for world in (8, 16, 32, 64, 128, 256):
            f32, bf16 = formula(10_000_000, world, 4), formula(10_000_000, world, 2)
            plan[str(world)] = {"bank_gb_per_rank_fp32": round(f32["bank_mb_per_rank"] / 1024, 2),
                                "bank_gb_per_rank_bf16": round(bf16["bank_mb_per_rank"] / 1024, 2),
                                "received_mb_per_step_per_rank": round(f32["received_mb_per_step_per_rank"], 1)}
        settings["plan_10m_videos"] = plan
        settings["unsharded_bank_gb_10m_fp32"] = round(LEVELS * 2 * 10_000_000 * DIM * 4 / 2 ** 30, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return write_result(out, "scale", settings, results, {}, "seconds / MB", notes, plot_png=False)

