"""DALI index files for WebDataset tars, byte for byte what DALI's ``wds2idx`` writes.

Format (``wds2idx.IndexCreator``, version ``v1.2``): a first line
``v1.2 <number of samples>``, then one line per sample listing, for each of its
members in tar order, ``<ext> <data offset> <size> <member name>`` separated by
spaces. The sample key is the member name up to the first dot after the last
``/`` (as in webdataset); members of one sample are consecutive; hidden files
and non-regular entries are left out. The data offset is where the member's
bytes start (after its 512-byte header and any PAX/GNU extension headers).
"""
from __future__ import annotations

import tarfile

INDEX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def write_index(tar_path: str, idx_path: str) -> int:
    """Write the DALI index of ``tar_path`` to ``idx_path``; return the sample count."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base, ext = split_name(member.name)
            if not base or base.endswith("/"):
                continue
            entry = (ext, member.offset_data, member.size, member.name)
            if base != last:
                samples.append([entry])
                last = base
            else:
                samples[-1].append(entry)
    if not samples:
        raise ValueError(f"{tar_path}: the tar holds no samples")
    with open(idx_path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for bundle in samples:
            f.write(" ".join(" ".join(map(str, entry)) for entry in bundle))
            f.write("\n")
    return len(samples)
