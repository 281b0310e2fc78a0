"""Run benchmark suites and write DIR/<suite>.json and DIR/<suite>.png.

    python -m benchmarks.run --suite all --videos tests/data/videos --shards SHARDS --out benchmarks/results/cpu
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUITES = ["loader", "decode", "step", "e2e", "loss", "shards", "scale"]
NEEDS = {"loader": ["videos"], "decode": ["videos"], "e2e": ["shards"], "shards": ["videos"]}


def run_suite(suite: str, args, out: Path) -> Path:
    if suite == "loader":
        from benchmarks import loader
        return loader.run(Path(args.videos), out, args.quick, args.device, args.shards, args.workers)
    if suite == "decode":
        from benchmarks import decode
        return decode.run(Path(args.videos), out, args.quick, args.device, args.shards, args.workers)
    if suite == "step":
        from benchmarks import step
        return step.run(out, args.quick, args.device)
    if suite == "e2e":
        from benchmarks import e2e
        return e2e.run(out, args.shards, args.quick, args.device, args.workers)
    if suite == "loss":
        from benchmarks import loss
        return loss.run(out, args.quick, args.device)
    if suite == "scale":
        from benchmarks import scale
        return scale.run(out, args.quick)
    from benchmarks import shards
    return shards.run(Path(args.videos), out, args.quick, workers=args.workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=SUITES + ["all"], default="all")
    p.add_argument("--shards", help="packed shards (manifest.json, folder, pattern)")
    p.add_argument("--videos", help="the original videos the shards were packed from")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats and inputs (smoke test)")
    p.add_argument("--workers", type=int, default=None, help="processes/threads for CPU stages (default: all cores)")
    p.add_argument("--out", default="benchmarks/results/latest")
    args = p.parse_args(argv)
    out = Path(args.out)
    suites = SUITES if args.suite == "all" else [args.suite]
    for suite in suites:
        missing = [f"--{n}" for n in NEEDS.get(suite, []) if not getattr(args, n)]
        if missing:
            if args.suite != "all":
                p.error(f"--suite {suite} needs {' '.join(missing)}")
            print(f"{suite}: skipped (needs {' '.join(missing)})", file=sys.stderr)
            continue
        path = run_suite(suite, args, out)
        doc = json.loads(Path(path).read_text())
        print(f"{suite}: {json.dumps(doc['ratios'])} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
