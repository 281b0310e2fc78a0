"""Finding shards: a manifest.json, a shard folder, a brace pattern or a list
of tars, with their sample counts (from the DALI .idx files beside them)."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field


@dataclass
class Shards:
    """Tars in manifest order, their sample counts and what the manifest says."""
    tars: list[str]
    counts: list[int]
    manifest: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def idx(self, tar: str) -> str:
        return tar[:-4] + ".idx"

    @property
    def codec(self) -> str | None:
        return (self.manifest.get("settings") or {}).get("codec")


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand
    return list(braceexpand.braceexpand(pattern))


def _idx_count(idx_path: str) -> int:
    with open(idx_path) as f:
        return int(f.readline().split()[1])


def resolve_shards(shards) -> Shards:
    """``shards``: a manifest.json, a shard folder, a brace pattern, or a list of tars."""
    if isinstance(shards, Shards):
        return shards
    manifest: dict = {}
    if isinstance(shards, (list, tuple)):
        tars = [str(t) for t in shards]
    else:
        shards = str(shards)
        if os.path.isdir(shards) and os.path.exists(os.path.join(shards, "manifest.json")):
            shards = os.path.join(shards, "manifest.json")
        if shards.endswith(".json"):
            try:
                with open(shards, encoding="utf-8") as f:
                    manifest = json.load(f)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"cannot read the manifest {shards}: {e}") from None
            root = os.path.dirname(os.path.abspath(shards))
            tars = [os.path.join(root, s["path"]) for s in manifest.get("shards", [])]
            counts = [int(s["num_samples"]) for s in manifest.get("shards", [])]
            if not tars or sum(counts) == 0:
                raise ValueError(f"{shards}: the manifest lists no samples (was every video in failed.jsonl?)")
            missing = [t for t in tars if not os.path.exists(t)]
            if missing:
                raise FileNotFoundError(f"{shards}: shard {missing[0]} is missing")
            return Shards(tars, counts, manifest)
        if os.path.isdir(shards):
            tars = sorted(glob.glob(os.path.join(shards, "*.tar")))
            if not tars:
                raise FileNotFoundError(f"no .tar shards in {shards}")
        else:
            tars = _expand_braces(shards)
    missing = [t for t in tars if not os.path.exists(t)]
    if not tars or missing:
        raise FileNotFoundError(f"shard {missing[0] if missing else shards} does not exist")
    for t in tars:
        if not os.path.exists(t[:-4] + ".idx"):
            raise FileNotFoundError(f"{t} has no index {t[:-4]}.idx beside it (make_shards writes one; "
                                    "DALI's wds2idx makes one for other tars)")
    parent = os.path.join(os.path.dirname(os.path.abspath(tars[0])), "manifest.json")
    if os.path.exists(parent):
        with open(parent, encoding="utf-8") as f:
            manifest = json.load(f)
    return Shards(tars, [_idx_count(t[:-4] + ".idx") for t in tars], manifest)
