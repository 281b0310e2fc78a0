"""Run benchmark suites and write DIR/<suite>.json and DIR/<suite>.png.

    python -m benchmarks.run --suite shards --videos ../shared/data/videos --out benchmarks/results/cpu
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUITES = ["loader", "shards"]


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
        if suite == "loader":
            if not args.videos:
                p.error("--suite loader needs --videos SRC (and packs them itself unless --shards is given)")
            from benchmarks import loader
            path = loader.run(Path(args.videos), out, args.quick, args.device, args.shards, args.workers)
        elif suite == "shards":
            if not args.videos:
                p.error("--suite shards needs --videos SRC")
            from benchmarks import shards
            path = shards.run(Path(args.videos), out, args.quick, workers=args.workers)
        doc = json.loads(Path(path).read_text())
        print(f"{suite}: {json.dumps(doc['ratios'])} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
