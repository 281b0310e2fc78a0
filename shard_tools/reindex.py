"""Write a dataset's compact index (``index.npy``) and name it in its manifest.

    python -m shard_tools.reindex OUT

make_shards and merge_parts write the compact index themselves
(:mod:`loaders.index`: every sample's shard and member byte ranges, one row
per sample in manifest order), so that each rank reads only its own rows
instead of every shard's ``.idx``. A dataset packed before gets it here, from
its ``.idx`` files; its shards are not touched. For a dataset whose manifest
names no ``member_format`` (packed before fragment tables) the manifest also
records whether its samples carry them (``fragment_tables``: all, none or
mixed), which the dali backend otherwise learns by reading every ``.idx``.

It holds every writer's lock of OUT (:func:`shard_tools.lock.dataset_lock`)
while it runs: refused (exit 2) while make_shards or merge_parts writes into
OUT. Running it again rewrites the same index.
"""
from __future__ import annotations

import json
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loaders.fragments import MEMBER_FORMAT
from loaders.index import INDEX_FILE, write_compact_index
from loaders.shards import Shards
from loaders.system import atomic_write_text
from shard_tools.lock import dataset_lock
from shard_tools.sources import UsageError
from vthcl import options

log = logging.getLogger(__name__)
CLI = options.command("shard_tools.reindex", __doc__, positionals=[
    options.Positional("out", "the dataset's folder (its manifest.json, tars and .idx files)", "OUT")])


def index_fields(out: str, manifest: dict) -> dict:
    """Write OUT's compact index for ``manifest`` (its shards in OUT) and
    return what the manifest adds to name it: ``index_file``, and
    ``fragment_tables`` where no ``member_format`` says so. Used by make_shards
    and merge_parts before they write the manifest, and by :func:`reindex`."""
    entries = manifest.get("shards", [])
    tars = [os.path.join(out, s["path"]) for s in entries]
    for tar in tars:
        if not os.path.exists(tar[:-4] + ".idx"):
            raise UsageError(f"{tar} has no index {tar[:-4]}.idx beside it (shard_tools.wds_index writes one)")
    shards = Shards(tars, [int(s["num_samples"]) for s in entries], manifest)
    try:
        summary = write_compact_index(os.path.join(out, INDEX_FILE), shards)
    except (OSError, ValueError) as e:
        raise UsageError(f"{out}: cannot write its compact index: {e}") from None
    fields = {"index_file": INDEX_FILE}
    if manifest.get("member_format") != MEMBER_FORMAT:
        fields["fragment_tables"] = summary["fragment_tables"]
    return fields


def reindex(out: str) -> str:
    """Write OUT's compact index from its ``.idx`` files and name it in
    ``OUT/manifest.json`` (holding every writer's lock of OUT); returns the
    index's path. Raises UsageError naming the file at fault."""
    with dataset_lock(out):
        path = os.path.join(out, "manifest.json")
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"{out} has no manifest.json (a folder make_shards or merge_parts wrote)") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: cannot read it: {e}") from None
        if not isinstance(manifest, dict) or not manifest.get("shards"):
            raise UsageError(f"{path}: the manifest lists no shards")
        missing = [s["path"] for s in manifest["shards"] if not os.path.exists(os.path.join(out, s["path"]))]
        if missing:
            raise UsageError(f"{path}: shard {os.path.join(out, missing[0])} is missing")
        manifest.update(index_fields(out, manifest))
        atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False))
        return os.path.join(out, manifest["index_file"])


def _job(cfg: options.Config) -> None:
    print(reindex(cfg.out))


def main(argv: list[str] | None = None) -> int:
    return options.cli("shard_tools.reindex", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
