"""Pack a dataset in N parts as Ray tasks (a cluster, or a local instance), then merge them.

    python -m shard_tools.ray_pack SRC OUT --parts N [make_shards options] [--address ADDR]

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

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shard_tools.make_shards import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser


def _pack_part(argv: list[str]) -> tuple[int, str]:
    """One part, in a Ray worker: make_shards' exit code and what it printed."""
    import contextlib
    import io

    from shard_tools.make_shards import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, (out.getvalue() + err.getvalue()).strip()


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="ray_pack", description=__doc__.split("\n\n")[0],
                                epilog="Every other option is make_shards' (python -m shard_tools.make_shards -h).")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--parts", type=int, required=True, help="how many parts (Ray tasks)")
    p.add_argument("--address", default=None, help="a running Ray cluster; default: a local instance")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local instance (default: all); not with --address")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    if args.parts < 1:
        p.error("--parts must be at least 1")
    if args.num_cpus is not None and (args.num_cpus < 1 or args.address is not None):
        p.error("--num-cpus is at least 1, for the local instance (a cluster at --address has its own)")
    if any(a in ("--part", "--parts", "--resume") for a in rest):
        p.error("ray_pack sets --part, --parts and --resume itself")
    shards_args = build_parser().parse_args([args.src, args.out, *rest])  # make_shards' own check of the rest
    return argparse.Namespace(**vars(args), workers=shards_args.workers), rest


def main(argv: list[str] | None = None) -> int:
    args, rest = parse(argv)
    try:
        import ray
    except ImportError:
        print("ray_pack: error: Ray is not installed (pip install -e \".[ray]\")", file=sys.stderr)
        return EXIT_USAGE
    from tqdm import tqdm

    from shard_tools.merge_parts import main as merge_parts
    src, out = os.path.abspath(args.src), os.path.abspath(args.out)
    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        nodes = [int(n["Resources"]["CPU"]) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
        if args.workers is None:
            # A task reserves the CPUs its make_shards workers use, so make_shards is told how many to start
            # (by itself it starts one per core of its node, whatever Ray reserved). The cluster's CPUs shared
            # among the parts let all parts run at once when there are fewer parts than CPUs; no more than the
            # smallest node's CPUs, so every node can take a part (a task asking for more than a node has never
            # runs there). A cluster with no CPU node yet (an autoscaler's) gets one worker per part.
            cpus = max(1, min(min(nodes), sum(nodes) // args.parts)) if nodes else 1
            rest = [*rest, "--workers", str(cpus)]
        else:
            cpus = max(1, args.workers)
            if nodes and cpus > max(nodes):  # Ray would wait for such a node forever
                print(f"ray_pack: error: --workers {args.workers}: no node of the Ray cluster has {cpus} CPUs "
                      f"(the largest has {max(nodes)})", file=sys.stderr)
                return EXIT_USAGE
        task = ray.remote(_pack_part).options(num_cpus=cpus, max_retries=0)
        pending = {task.remote([src, out, *rest, "--quiet", "--resume", "--part", str(i), "--parts",
                                str(args.parts)]): i for i in range(args.parts)}
        codes = {}
        with tqdm(total=args.parts, unit="part", disable=args.quiet, dynamic_ncols=True) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                part = pending.pop(done[0])
                codes[part], said = ray.get(done[0])
                bar.write(f"part {part}: {said.splitlines()[-1] if said else 'exit ' + str(codes[part])}")
                bar.update(1)
                if codes[part] == EXIT_USAGE:
                    print(f"ray_pack: error: part {part}: {said}", file=sys.stderr)
                    return EXIT_USAGE
    finally:
        ray.shutdown()
    rc = merge_parts([out])
    return rc if rc == EXIT_USAGE else (EXIT_FAILED if EXIT_FAILED in codes.values() or rc else EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
