"""Recipes as files: a YAML of options (``configs/``), read the same way by
``vthcl.train --config`` and ``vthcl.eval --config``; the command line wins."""
from __future__ import annotations

from pathlib import Path


def yaml_options(path: str | Path, allowed, prog: str) -> dict:
    """The options in the YAML file ``path`` (keys as the CLI's option names
    with ``_``); a key the CLI does not know is refused, naming the file."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"{prog}: error: cannot read the config {path}: {e}") from None
    if not isinstance(loaded, dict):
        raise SystemExit(f"{prog}: error: {path} is not a mapping of options")
    unknown = sorted(set(loaded) - set(allowed))
    if unknown:
        raise SystemExit(f"{prog}: unknown keys in {path}: {unknown}")
    return loaded
