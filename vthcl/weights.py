"""Weights in and out of PySlowFast and pytorchvideo, and ImageNet inflation.

Our slow encoder (:class:`vthcl.model.Pathway`, ``slow=True``) at r50 is
PySlowFast's Slow R50 layer for layer, so its weights convert by renaming
alone. The names below are read from the reference code:

* PySlowFast (``slowfast/models/video_model_builder.py`` ``ResNet``,
  ``stem_helper.py``, ``resnet_helper.py``): the stem is
  ``s1.pathway0_stem.{conv,bn}``; block ``j`` of stage ``k`` (2..5) is
  ``s{k}.pathway0_res{j}`` with ``branch2.{a,a_bn,b,b_bn,c,c_bn}`` and, on a
  stage's first block, the shortcut ``branch1`` + ``branch1_bn``; the
  classifier is ``head.*`` (``head.projection`` for ``ResNetBasicHead``).
* pytorchvideo (``pytorchvideo/models/resnet.py`` ``create_resnet``, as
  ``hub/resnet.py`` ``slow_r50`` builds it): the stem is
  ``blocks.0.{conv,norm}``; stage ``k`` is ``blocks.{k-1}.res_blocks.{j}``
  with ``branch2.{conv,norm}_{a,b,c}`` and ``branch1_{conv,norm}``; the
  classifier is ``blocks.5`` (``blocks.5.proj``).
* torchvision ResNet-18/50 (``torchvision/models/resnet.py``): ``conv1``,
  ``bn1``, ``layer{1..4}.{j}.{conv,bn}{1,2,3}``, ``downsample.{0,1}``, ``fc``.

Importing drops the other side's classifier (our encoder has none) and logs
the keys it dropped; exporting writes the encoder alone. A key a converter
does not know keeps its name, so :func:`load_pathway` names it as unexpected
instead of it vanishing. Neither library has a counterpart of our r18:
pytorchvideo's ``create_resnet`` builds depths 50/101/152 only, and
PySlowFast's depth-18 ResNet keeps the bottleneck stage widths (``dim_out`` =
4 x width) around basic blocks, so both are refused for r18.
"""
from __future__ import annotations

import functools
import logging
import re

import torch

from vthcl import checkpoint as ckpt
from vthcl.model import Pathway

log = logging.getLogger(__name__)

SCHEMES = ("vthcl", "pyslowfast", "pytorchvideo", "imagenet2d")
_BRANCH2_PTV = {"a": "conv_a", "a_bn": "norm_a", "b": "conv_b", "b_bn": "norm_b", "c": "conv_c", "c_bn": "norm_c"}
_TV_BLOCK = {"conv1": "a", "bn1": "a_bn", "conv2": "b", "bn2": "b_bn", "conv3": "c", "bn3": "c_bn",
             "downsample.0": "short.0", "downsample.1": "short.1"}
_SHOW = 5  # keys named in a message; the rest are counted


class WeightsMismatch(ValueError):
    """A state dict that does not fit the encoder (missing, unexpected or misshapen tensors)."""


def _named(keys, show: int = _SHOW) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
    return ", ".join(keys[:show]) + more


def _rename(state: dict, rules, what: str, head=None) -> dict:
    """``state`` with each key renamed by the first matching ``(pattern, template)``
    rule; keys matching ``head`` are dropped and logged, others keep their name."""
    out, dropped = {}, []
    for key, value in state.items():
        if head is not None and re.match(head, key):
            dropped.append(key)
            continue
        for pattern, template in rules:
            m = re.fullmatch(pattern, key)
            if m:
                key = m.expand(template)
                break
        out[key] = value
    if dropped:
        log.info("%s: dropped %d classification-head keys (not part of the encoder): %s", what, len(dropped),
                 _named(dropped))
    return out


def _refuse_basic_blocks(state: dict, to: str) -> None:
    if "res2.0.a.weight" in state and "res2.0.c.weight" not in state:
        raise ValueError(f"an r18 encoder has no counterpart in {to}: pytorchvideo builds ResNet-50/101/152 only "
                         f"and PySlowFast's depth 18 keeps the bottleneck stage widths; export an r50 encoder")


def _fill_bn_counters(state: dict) -> dict:
    """Add a zero ``num_batches_tracked`` beside every BN's running stats that
    lacks one, as PyTorch's own loader does for states written before it
    existed (the counter only matters with ``momentum=None``)."""
    for key in [k for k in state if k.endswith(".running_mean")]:
        counter = key[:-len("running_mean")] + "num_batches_tracked"
        state.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return state


# ----------------------------------------------------------------------------- PySlowFast
_TO_PSF = [(r"stem\.0\.(.+)", r"s1.pathway0_stem.conv.\1"),
           (r"stem\.1\.(.+)", r"s1.pathway0_stem.bn.\1"),
           (r"res(\d)\.(\d+)\.short\.0\.(.+)", r"s\1.pathway0_res\2.branch1.\3"),
           (r"res(\d)\.(\d+)\.short\.1\.(.+)", r"s\1.pathway0_res\2.branch1_bn.\3"),
           (r"res(\d)\.(\d+)\.(a|a_bn|b|b_bn|c|c_bn)\.(.+)", r"s\1.pathway0_res\2.branch2.\3.\4")]
_FROM_PSF = [(r"s1\.pathway0_stem\.conv\.(.+)", r"stem.0.\1"),
             (r"s1\.pathway0_stem\.bn\.(.+)", r"stem.1.\1"),
             (r"s([2-5])\.pathway0_res(\d+)\.branch1\.(.+)", r"res\1.\2.short.0.\3"),
             (r"s([2-5])\.pathway0_res(\d+)\.branch1_bn\.(.+)", r"res\1.\2.short.1.\3"),
             (r"s([2-5])\.pathway0_res(\d+)\.branch2\.(a|a_bn|b|b_bn|c|c_bn)\.(.+)", r"res\1.\2.\3.\4")]


def to_pyslowfast(state: dict) -> dict:
    """Our r50 slow encoder's state dict in PySlowFast's ``ResNet`` names (no head)."""
    _refuse_basic_blocks(state, "PySlowFast")
    return _rename(state, _TO_PSF, "to PySlowFast")


def from_pyslowfast(state: dict) -> dict:
    """A PySlowFast Slow R50 ``model_state`` in our names; ``head.*`` is dropped (logged)."""
    return _fill_bn_counters(_rename(_strip_wrapper(state), _FROM_PSF, "from PySlowFast", head=r"head\."))


# ----------------------------------------------------------------------------- pytorchvideo
# stage k (res2..res5) is blocks.{k-1}: one rule per stage keeps the tables plain renames
_TO_PTV = [(r"stem\.0\.(.+)", r"blocks.0.conv.\1"), (r"stem\.1\.(.+)", r"blocks.0.norm.\1")]
_FROM_PTV = [(r"blocks\.0\.conv\.(.+)", r"stem.0.\1"), (r"blocks\.0\.norm\.(.+)", r"stem.1.\1")]
for _k in range(2, 6):
    _TO_PTV += [(rf"res{_k}\.(\d+)\.short\.0\.(.+)", rf"blocks.{_k - 1}.res_blocks.\1.branch1_conv.\2"),
                (rf"res{_k}\.(\d+)\.short\.1\.(.+)", rf"blocks.{_k - 1}.res_blocks.\1.branch1_norm.\2")]
    _FROM_PTV += [(rf"blocks\.{_k - 1}\.res_blocks\.(\d+)\.branch1_conv\.(.+)", rf"res{_k}.\1.short.0.\2"),
                  (rf"blocks\.{_k - 1}\.res_blocks\.(\d+)\.branch1_norm\.(.+)", rf"res{_k}.\1.short.1.\2")]
    for _ours, _theirs in _BRANCH2_PTV.items():
        _TO_PTV.append((rf"res{_k}\.(\d+)\.{_ours}\.(.+)", rf"blocks.{_k - 1}.res_blocks.\1.branch2.{_theirs}.\2"))
        _FROM_PTV.append((rf"blocks\.{_k - 1}\.res_blocks\.(\d+)\.branch2\.{_theirs}\.(.+)", rf"res{_k}.\1.{_ours}.\2"))
del _k, _ours, _theirs


def to_pytorchvideo(state: dict) -> dict:
    """Our r50 slow encoder's state dict in pytorchvideo's ``slow_r50`` names (no head)."""
    _refuse_basic_blocks(state, "pytorchvideo")
    return _rename(state, _TO_PTV, "to pytorchvideo")


def from_pytorchvideo(state: dict) -> dict:
    """A pytorchvideo ``slow_r50`` state dict in our names; the head ``blocks.5``
    is dropped (logged). PySlowFast's ``PTVResNet`` wraps the same net as
    ``model.``: that prefix is removed first."""
    state = _strip_wrapper(state)
    if state and all(k.startswith("model.blocks.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return _fill_bn_counters(_rename(state, _FROM_PTV, "from pytorchvideo", head=r"blocks\.5\."))


def _strip_wrapper(state: dict) -> dict:
    """Without the ``module.`` prefix that DistributedDataParallel adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------- ImageNet inflation
@functools.lru_cache(maxsize=None)
def _temporal_sizes(arch: str) -> dict[str, int]:
    """The temporal kernel size of each of the encoder's conv weights, read off
    a width-1 instance (the sizes do not depend on the width)."""
    with torch.random.fork_rng(devices=[]):  # building it draws its initial weights: leave the caller's RNG be
        return {k: v.shape[2] for k, v in Pathway(arch, 1, slow=True).state_dict().items() if v.dim() == 5}


def inflate_2d(state_2d: dict, arch: str) -> dict:
    """A torchvision ResNet-18 (``arch="r18"``) or -50 (``"r50"``) state dict as
    our slow encoder's, inflated the I3D way: a kernel whose 3D counterpart
    has temporal size t is repeated t times along time and divided by t, so a
    video of one repeated frame gets the 2D net's response (away from the
    clip's first and last frames, where temporal zero padding cuts the
    kernel). ``fc.*`` is dropped (logged); BN statistics carry over."""
    state_2d = _strip_wrapper(state_2d)
    bottleneck = any(re.fullmatch(r"layer\d\.\d+\.conv3\.weight", k) for k in state_2d)
    if arch not in ("r18", "r50"):
        raise ValueError(f"unknown arch {arch!r}: choose r18 or r50")
    if bottleneck != (arch == "r50"):
        kind = "a bottleneck (ResNet-50-like)" if bottleneck else "a basic-block (ResNet-18-like)"
        raise ValueError(f"{kind} 2D state does not inflate to {arch}")
    temporal = _temporal_sizes(arch)
    out, dropped = {}, []
    for key, value in state_2d.items():
        if key.startswith("fc."):
            dropped.append(key)
            continue
        if key.startswith("conv1."):
            key = "stem.0." + key[len("conv1."):]
        elif key.startswith("bn1."):
            key = "stem.1." + key[len("bn1."):]
        elif m := re.fullmatch(r"layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)", key):
            key = f"res{int(m.group(1)) + 1}.{m.group(2)}.{_TV_BLOCK[m.group(3)]}.{m.group(4)}"
        if value.dim() == 4:
            t = temporal.get(key, 1)
            value = value.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
        out[key] = value
    if dropped:
        log.info("inflate_2d: dropped %d classifier keys: %s", len(dropped), _named(dropped))
    return _fill_bn_counters(out)


# ----------------------------------------------------------------------------- loading
def load_pathway(encoder: Pathway, state: dict, source: str) -> Pathway:
    """``encoder.load_state_dict(state)``, strict, refusing a state that does not
    fit with a :class:`WeightsMismatch` that names ``source``, the missing and
    unexpected keys (the first few of each, and their counts) and the shape
    mismatches."""
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshapen:
        what = [f"{len(missing)} missing keys ({_named(missing)})" if missing else "",
                f"{len(unexpected)} unexpected keys ({_named(unexpected)})" if unexpected else "",
                f"{len(misshapen)} shape mismatches, given vs encoder ({_named(misshapen)})" if misshapen else ""]
        raise WeightsMismatch(f"{source}: does not fit the {encoder.arch} slow encoder (stem width "
                              f"{encoder.stem[0].out_channels}): " + "; ".join(w for w in what if w))
    encoder.load_state_dict(state, strict=True)
    return encoder


def init_scheme(init) -> str | None:
    """The scheme of an init string (``random``, ``vthcl:``, ``pyslowfast:``,
    ``pytorchvideo:``, ``imagenet2d:``), or None for a plain path."""
    if not isinstance(init, str):
        return None
    if init == "random":
        return "random"
    scheme, sep, _ = init.partition(":")
    return scheme if sep and scheme in SCHEMES else None


def _state_in(obj, path: str, containers: tuple[str, ...], what: str) -> dict:
    """The state dict in a loaded file: under one of ``containers``, or the file itself."""
    if isinstance(obj, dict):
        for name in containers:
            if isinstance(obj.get(name), dict):
                return obj[name]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    held = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: not {what}: expected a state dict or a dict holding one under "
                     f"{' / '.join(repr(c) for c in containers)}, found {held}")


def _video_state(obj, path: str, containers: tuple[str, ...], what: str) -> dict:
    """A Slow R50 state in PySlowFast's or pytorchvideo's names, in ours."""
    state = _strip_wrapper(_state_in(obj, path, containers, what))
    if any(k.startswith("s1.pathway0_stem.") for k in state):
        return from_pyslowfast(state)
    if any(k.startswith(("blocks.0.", "model.blocks.0.")) for k in state):
        return from_pytorchvideo(state)
    raise ValueError(f"{path}: not {what}: neither PySlowFast's (s1.pathway0_stem.*) nor pytorchvideo's "
                     f"(blocks.0.*) names; keys begin {_named(sorted(state))}")


def load_encoder_init(init: str, arch: str | None = None, width: int | None = None, seed: int = 0,
                      trust: bool = False, random_init: bool = False) -> tuple[Pathway, dict]:
    """The slow encoder an init string names, in eval mode, and its config (as
    :func:`vthcl.eval.load_encoder` returns them):

    * ``vthcl:PATH``: our ``last.pt`` or ``slow_encoder.pt`` (vthcl.eval's logic);
    * ``random``: the untrained net (seeded with ``seed``);
    * ``pyslowfast:PATH``: a PySlowFast Slow R50 checkpoint (its ``model_state``);
    * ``pytorchvideo:PATH``: a ``slow_r50`` state dict, or a dict holding one
      under ``model_state`` / ``state_dict``;
    * ``imagenet2d:PATH``: a torchvision ResNet-18/50 state dict, or a dict
      holding one under ``state_dict`` / ``model``, inflated (:func:`inflate_2d`).

    ``arch``/``width`` None: the checkpoint's (vthcl), what the weights hold
    (the others: r50 for PySlowFast/pytorchvideo, the stem's width), r18 and
    64 for ``random``. Files load through :func:`vthcl.checkpoint.load`
    (tensors and plain values only unless ``trust``). ``random_init``: the same
    architecture, its weights left untrained (the baseline)."""
    from vthcl.eval import load_encoder  # vthcl.eval imports this module

    scheme = init_scheme(init)
    if scheme is None:
        raise ValueError(f"unknown init {init!r}: give random, or vthcl:PATH, pyslowfast:PATH, pytorchvideo:PATH "
                         f"or imagenet2d:PATH")
    if scheme == "random":
        return load_encoder(None, True, arch, width, seed)
    path = init[len(scheme) + 1:]
    if not path:
        raise ValueError(f"init {init!r} names no file")
    if scheme == "vthcl":
        return load_encoder(path, random_init, arch, width, seed, trust)
    if scheme in ("pyslowfast", "pytorchvideo"):
        if arch == "r18":
            raise ValueError(f"{init}: PySlowFast and pytorchvideo have no counterpart of our r18 (their Slow "
                             f"ResNets are R50 and up): use arch r50")
        arch = "r50"
        containers = ("model_state",) if scheme == "pyslowfast" else ("model_state", "state_dict")
        what = "a PySlowFast Slow R50 checkpoint" if scheme == "pyslowfast" else "a pytorchvideo slow_r50 state"
        state = _video_state(ckpt.load(path, trust=trust), path, containers, what)
    else:
        state_2d = _state_in(ckpt.load(path, trust=trust), path, ("state_dict", "model"),
                             "a torchvision ResNet state dict")
        state_2d = _strip_wrapper(state_2d)
        arch = arch or ("r50" if any(re.fullmatch(r"layer\d\.\d+\.conv3\.weight", k) for k in state_2d) else "r18")
        try:
            state = inflate_2d(state_2d, arch)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if width is None and "stem.0.weight" in state:
        width = int(state["stem.0.weight"].shape[0])
    encoder, cfg = load_encoder(None, True, arch, width, seed)
    if not random_init:
        load_pathway(encoder, state, init)
        log.info("loaded the %s slow encoder (width %d) from %s", arch, cfg["width"], init)
    return encoder.eval(), cfg
