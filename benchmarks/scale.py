"""`scale` suite: a 10M-video plan, measured in simulation on one machine.

1. The shard index as the dataset grows: 100 -> 40,000 shards of 250
   samples (25k -> 10M videos; 16,000 shards is 10M at ~600 videos per 1 GB
   shard, what make_shards' default gives for Kinetics-like clips), made cheaply — sparse tars (their size, no
   bytes), real ``.idx`` files (the members of a make_shards sample), a
   manifest. Per rank, each in a fresh process (its peak memory is its own):
   ``resolve_shards`` of the manifest; the pyav backend's ``SampleIndex``
   (every ``.idx`` line parsed: each sample's byte range); the dali
   backend's fragment-table check (its ``.idx`` scan before the graph); and
   DALI's own reader built on the index files (``fn.readers.webdataset``,
   ``index_paths``), time and peak RSS, as far as it goes.
2. Sharded memory banks at the largest n this machine holds: per-rank bank
   bytes, the bytes each rank receives per step through all_gather and
   all_reduce (counted on the collectives ``vthcl.memory`` calls), and the
   step time, on 2 and 4 gloo ranks — against the formula the design
   gives, which the table then extrapolates to n = 10M on 8 to 256 GPUs.

    python -m benchmarks.run --suite scale --out benchmarks/results/cpu [--quick]
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import progress, write_result

SAMPLES_PER_SHARD = 250
# a make_shards sample's members and sizes (a 10 s, 256p Kinetics clip: ~1.6 MB of video)
MEMBERS = [("cls", 2), ("frag_bytes", 168), ("frag_frames", 84), ("ids", 16), ("json", 420), ("mp4", 1_600_000),
           ("nframes", 4)]
LEVELS, DIM, NEGATIVES, GLOBAL_BATCH = 3, 128, 16384, 256


# --------------------------------------------------------------------------- the shard index
def make_dataset(root: Path, shards: int) -> Path:
    """``shards`` sparse tars of SAMPLES_PER_SHARD samples, their .idx files
    and a manifest.json; every shard's files are hard links of one pair (the
    index readers read each file anyway). Returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    lines, offset = [], 0
    for k in range(SAMPLES_PER_SHARD):
        entries = []
        for ext, size in MEMBERS:
            offset += 512  # the member's tar header
            entries.append(f"{ext} {offset} {size} s{k:06d}.{ext}")
            offset += -(-size // 512) * 512
        lines.append(" ".join(entries))
    tar_size = offset + 1024
    template_tar, template_idx = root / ".template.tar", root / ".template.idx"
    with open(template_tar, "wb") as f:
        f.truncate(tar_size)  # sparse: no bytes on disk
    template_idx.write_text(f"v1.2 {SAMPLES_PER_SHARD}\n" + "\n".join(lines) + "\n")
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
                "settings": {"codec": "h264"}, "member_format": "fmp4-fragments-v1"}
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
    if kind == "sample_index":
        from loaders.pyav import SampleIndex
        SampleIndex(shards)
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
    return {"seconds": seconds, "peak_rss_mb": peak / 1024, "samples": shards.total}


def _probe_in_child(kind: str, manifest: Path, timeout: float, open_files: int | None = None) -> dict:
    cmd = [sys.executable, "-c", f"import json, benchmarks.scale as s; print(json.dumps(s.probe({kind!r}, "
                                 f"{str(manifest)!r}, {open_files!r})))"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if r.returncode != 0:  # DALI's own reason is the line after "encountered:"
        lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
        after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"]
        return {"error": (after or lines or [f"exit {r.returncode}"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


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
def run(out: Path, quick: bool = False) -> Path:
    counts = [100, 1000] if quick else [100, 1000, 10000, 16000, 40000]
    kinds = ["manifest", "sample_index", "fragment_check", "dali_reader"]
    results, notes = {}, []
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    settings = {"samples_per_shard": SAMPLES_PER_SHARD, "shard_counts": counts, "members": MEMBERS,
                "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
                "levels": LEVELS, "dim": DIM, "negatives": NEGATIVES, "global_batch": GLOBAL_BATCH}
    try:
        for n in counts:
            manifest = make_dataset(tmp / f"shards_{n}", n)
            for kind in kinds:
                r = _probe_in_child(kind, manifest, timeout=120 if quick else 900)
                results[f"{kind}_{n}_shards"] = r
                progress(f"{kind} {n} shards: {r}")
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                if kind == "dali_reader" and "Too many open files" in r.get("error", "") and hard > 2 * n:
                    # DALI's reader opens every tar at build: again with the limit raised (the hard one allows)
                    r = _probe_in_child(kind, manifest, 900, open_files=2 * n)
                    results[f"{kind}_{n}_shards_open_files_{2 * n}"] = r
                    progress(f"{kind} {n} shards, open-file limit {2 * n}: {r}")
            shutil.rmtree(tmp / f"shards_{n}")
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

