"""Checkpoints that load without running code.

Unpickling a file can run any code it carries, and pretrained checkpoints are
shared as files: every checkpoint this product reads goes through
:func:`load`, which uses ``torch.load(weights_only=True)`` — tensors and plain
values (dicts, lists, tuples, numbers, strings, None) only. What
``vthcl.train`` writes is made of those alone: the RNG states are stored as
tensors and plain values (:func:`rng_state`), not as the NumPy objects
``np.random.get_state()`` returns. A file that needs more is refused with
an error that names it and what it holds; ``trust=True`` (the CLIs'
``--trust-checkpoint``) is the only way past, for checkpoints written before
2026-12-01 (they hold NumPy RNG state) or from a source you trust.
"""
from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from loaders.system import atomic

TRUST_FLAG = "--trust-checkpoint"


class CheckpointRefused(Exception):
    """A checkpoint that would need full unpickling (it may run code)."""


def _what(e: Exception) -> str:
    """The line of torch's weights_only error that names the object."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (named or lines or [type(e).__name__])[0]


def load(path: str | os.PathLike, map_location="cpu", trust: bool = False):
    """``torch.load`` of ``path`` with ``weights_only=True``; a file holding
    anything else raises CheckpointRefused (its code never runs), unless
    ``trust`` (then it is unpickled in full, with a warning)."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise CheckpointRefused(
                f"{path}: refused: it holds more than tensors and plain values ({_what(e)}), and unpickling it "
                f"can run any code it carries. If you trust where it came from (a checkpoint vthcl.train wrote "
                f"before 2026-12-01 holds NumPy RNG state), pass {TRUST_FLAG}.") from None
        warnings.warn(f"{path}: unpickled in full ({TRUST_FLAG}): {_what(e)}", RuntimeWarning)
        return torch.load(path, map_location=map_location, weights_only=False)


def add_trust_flag(parser) -> None:
    """The CLIs' opt-in to full unpickling (``args.trust_checkpoint``)."""
    parser.add_argument(TRUST_FLAG, dest="trust_checkpoint", action="store_true", default=None,
                        help="load a checkpoint that needs full unpickling (one written before 2026-12-01): it "
                             "can run any code it carries, so only for files you trust")


def or_exit(prog: str, load_fn, *args, **kwargs):
    """``load_fn(*args, **kwargs)``, a refused checkpoint turned into the CLI's error exit."""
    try:
        return load_fn(*args, **kwargs)
    except CheckpointRefused as e:
        raise SystemExit(f"{prog}: error: {e}") from None


def save(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then an atomic rename."""
    with atomic(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict:
    """Python's, NumPy's, torch's (and CUDA's) RNG states as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # a checkpoint from before 2026-12-01 (loaded with trust): NumPy's own tuple
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
