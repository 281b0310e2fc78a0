"""Checkpoints that load without running code.

Unpickling a file can run any code it carries, and pretrained checkpoints are
shared as files: every checkpoint this product reads goes through
:func:`load`, which uses ``torch.load(weights_only=True)`` — tensors and plain
values (dicts, lists, tuples, numbers, strings, None) only. What
``vthcl.train`` writes is made of those alone: the RNG states are stored as
tensors and plain values (:func:`rng_state`), not as the NumPy objects
``np.random.get_state()`` returns. A file that needs more is refused with
an error that names it and what it holds; ``trust=True`` (the CLIs'
``--trust-checkpoint``) is the only way past, for a checkpoint that stores
NumPy's RNG state as NumPy objects or one from a source you trust.
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
from vthcl.options import OPTIONS, UsageError

TRUST_FLAG = OPTIONS["trust_checkpoint"].flag


class CheckpointRefused(UsageError):
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
                f"can run any code it carries. If you trust where it came from (a last.pt that stores NumPy's RNG "
                f"state as NumPy objects, for one), pass {TRUST_FLAG}.") from None
        warnings.warn(f"{path}: unpickled in full ({TRUST_FLAG}): {_what(e)}", RuntimeWarning)
        return torch.load(path, map_location=map_location, weights_only=False)


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
    else:  # NumPy's own state tuple (a checkpoint loaded with trust)
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
