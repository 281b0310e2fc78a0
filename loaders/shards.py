"""Finding shards: a manifest.json, a shard folder, a brace pattern or a list
of tars, with their sample counts.

A manifest lists its tars and their counts, and names the dataset's compact
index (:mod:`loaders.index`): resolving it opens no ``.idx`` file, whatever the
dataset's size. A folder without a manifest, a brace pattern or a list of tars
has no such list: every tar's ``.idx`` is opened for its count (and the
loaders read member offsets from the ``.idx`` files), which is fine for small
sets of tars; a large dataset is loaded through its manifest.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field


@dataclass
class Shards:
    """Tars in manifest order, their sample counts and what the manifest says;
    ``manifest_path`` where they were resolved from a manifest, ``index``
    the compact index it names (:mod:`loaders.index`)."""
    tars: list[str]
    counts: list[int]
    manifest: dict = field(default_factory=dict)
    manifest_path: str | None = None
    index: str | None = None

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
            index = manifest.get("index_file")
            return Shards(tars, counts, manifest, os.path.abspath(shards), os.path.join(root, index) if index else None)
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
