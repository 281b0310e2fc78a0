"""Run benchmark suites and write DIR/<suite>.json and DIR/<suite>.png.

    python -m benchmarks.run --suite all --videos tests/data/videos --shards SHARDS --out benchmarks/results/cpu
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from vthcl import options

log = logging.getLogger(__name__)

SUITES = ["loader", "decode", "step", "e2e", "loss", "shards", "scale"]
NEEDS = {"loader": ["videos"], "decode": ["videos"], "e2e": ["shards"], "shards": ["videos"]}

CLI = options.command("benchmarks.run", __doc__, [options.BENCH, "quick", "device", "workers", "out"],
                      recipe={"out": "runs/benchmarks"})


def run_suite(suite: str, cfg, device: str, out: Path) -> Path:
    if suite == "loader":
        from benchmarks import loader
        return loader.run(Path(cfg.videos), out, cfg.quick, device, cfg.shards, cfg.workers)
    if suite == "decode":
        from benchmarks import decode
        return decode.run(Path(cfg.videos), out, cfg.quick, device, cfg.shards, cfg.workers)
    if suite == "step":
        from benchmarks import step
        return step.run(out, cfg.quick, device)
    if suite == "e2e":
        from benchmarks import e2e
        return e2e.run(out, cfg.shards, cfg.quick, device, cfg.workers)
    if suite == "loss":
        from benchmarks import loss
        return loss.run(out, cfg.quick, device)
    if suite == "scale":
        from benchmarks import scale
        return scale.run(out, cfg.quick)
    from benchmarks import shards
    return shards.run(Path(cfg.videos), out, cfg.quick, workers=cfg.workers)


def run(cfg: options.Config | None = None, /, **values) -> dict[str, Path]:
    """The suites of ``cfg`` (``options.resolve("benchmarks.run", ...)``, or
    the options as keywords): {suite: its JSON}. A suite named alone without
    its inputs is a UsageError; under ``all`` it is skipped with a warning."""
    cfg = options.take("benchmarks.run", cfg, values)
    device = options.auto_device(cfg.device)
    out = Path(cfg.out)
    done = {}
    for suite in SUITES if cfg.suite == "all" else [cfg.suite]:
        missing = [f"--{n}" for n in NEEDS.get(suite, []) if not getattr(cfg, n)]
        if missing:
            if cfg.suite != "all":
                raise options.UsageError(f"--suite {suite} needs {' '.join(missing)}")
            log.warning(f"{suite}: skipped (needs {' '.join(missing)})")
            continue
        done[suite] = run_suite(suite, cfg, device, out)
        log.info(f"{suite}: done -> {done[suite]}")
    return done


def _job(cfg: options.Config) -> None:
    for suite, path in run(cfg).items():
        doc = json.loads(Path(path).read_text())
        print(f"{suite}: {json.dumps(doc['ratios'])} -> {path}")


def main(argv: list[str] | None = None) -> int:
    return options.cli("benchmarks.run", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
