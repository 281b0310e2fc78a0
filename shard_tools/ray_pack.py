"""Pack a dataset in N parts as Ray tasks (a cluster, or a local instance), then merge them.

    python -m shard_tools.ray_pack SRC OUT --parts N [make_shards options] [--address ADDR] [--num-cpus N]

Each part is ``make_shards SRC OUT --part I --parts N --resume`` run as one
Ray task that reserves the CPUs its worker processes use, so Ray never runs
more make_shards workers than a node has cores: ``--workers W`` among the
make_shards options reserves W CPUs (``--workers 0``: one); without it W is
chosen (the cluster's CPUs shared among the parts, at most the smallest
node's, at least 1) and passed on as ``--workers W``. SRC and OUT
must be paths every node sees (a shared filesystem). A part that fails with
a usage error stops the run; a part whose videos partly failed has them in
its report. When all parts are done, ``merge_parts`` writes the dataset's
manifest. Killed and run again, the same command resumes: every part picks
up where it was (``--resume``), complete parts pack nothing more, and a
merge is redone in full. ``--address`` connects to a running cluster
(``ray start --head``, ``auto``, ``ray://HOST:10001``); without it a local
instance is started for this run, with ``--num-cpus`` CPUs (default: all).
Needs the ``ray`` extra (``pip install -e ".[ray]"``).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging

from shard_tools.make_shards import summary
from vthcl import options
from vthcl.options import UsageError

log = logging.getLogger(__name__)
# ray_pack sets part, parts (its own) and resume itself
PASSED_ON = [n for n in options.PACK.names if n not in ("part", "parts")] + ["labelmap", "exclusions"]
CLI = options.command(
    "shard_tools.ray_pack", __doc__, [*PASSED_ON, "parts", "workers", "seed", options.RAY],
    positionals=[options.Positional("src", "the folder with the videos (seen by every node)", "SRC"),
                 options.Positional("out", "the folder for the shards (seen by every node)", "OUT")],
    required=("parts",))


def _pack_part(src: str, out: str, part: int, parts: int, values: dict) -> dict:
    """One part, in a Ray task: make_shards.pack's result (a usage error: {"usage_error": message})."""
    from shard_tools.make_shards import pack
    try:
        return pack(src, out, part=part, parts=parts, resume=True, quiet=True, **values)
    except UsageError as e:
        return {"usage_error": str(e)}


def pack_with_ray(src, out, parts: int, address: str | None = None, num_cpus: int | None = None,
                  quiet: bool = False, **values) -> dict:
    """Pack ``src`` into ``out`` in ``parts`` Ray tasks, then merge them
    (see the module docstring); ``values`` are make_shards' options. Returns
    the merged manifest; a usage error (bad options, a part's) raises
    UsageError."""
    if parts < 1:
        raise UsageError("--parts must be at least 1")
    if num_cpus is not None and (num_cpus < 1 or address is not None):
        raise UsageError("--num-cpus is at least 1, for the local instance (a cluster at --address has its own)")
    options.resolve("shard_tools.make_shards", src=src, out=out, **values)  # make_shards' own check of them
    try:
        import ray
    except ImportError:
        raise UsageError('Ray is not installed (pip install -e ".[ray]")') from None
    from tqdm import tqdm

    from shard_tools.merge_parts import merge
    src, out = os.path.abspath(src), os.path.abspath(out)
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        nodes = [int(n["Resources"]["CPU"]) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
        if values.get("workers") is None:
            # A task reserves the CPUs its make_shards workers use, so make_shards is told how many to start
            # (by itself it starts one per core of its node, whatever Ray reserved). The cluster's CPUs shared
            # among the parts let all parts run at once when there are fewer parts than CPUs; no more than the
            # smallest node's CPUs, so every node can take a part (a task asking for more than a node has never
            # runs there). A cluster with no CPU node yet (an autoscaler's) gets one worker per part.
            cpus = max(1, min(min(nodes), sum(nodes) // parts)) if nodes else 1
            values = {**values, "workers": cpus}
        else:
            cpus = max(1, values["workers"])
            if nodes and cpus > max(nodes):  # Ray would wait for such a node forever
                raise UsageError(f"--workers {values['workers']}: no node of the Ray cluster has {cpus} CPUs "
                                 f"(the largest has {max(nodes)})")
        task = ray.remote(_pack_part).options(num_cpus=cpus, max_retries=0)
        pending = {task.remote(src, out, i, parts, values): i for i in range(parts)}
        failed = False
        with tqdm(total=parts, unit="part", disable=quiet, dynamic_ncols=True) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                part = pending.pop(done[0])
                result = ray.get(done[0])
                if "usage_error" in result:
                    raise UsageError(f"part {part}: {result['usage_error']}")
                log.info("part %d: %s", part, summary(result))
                failed |= bool(result["failed"])
                bar.update(1)
    finally:
        ray.shutdown()
    return merge(out)


def _job(cfg: options.Config) -> int:
    values = options.kwargs(cfg)
    values.pop("quiet", None)
    manifest = pack_with_ray(values.pop("src"), values.pop("out"), values.pop("parts"), values.pop("address", None),
                             values.pop("num_cpus", None), cfg.quiet, **values)
    from shard_tools.merge_parts import report
    return report(manifest, cfg.out)


def main(argv: list[str] | None = None) -> int:
    return options.cli("shard_tools.ray_pack", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
