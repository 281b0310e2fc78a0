"""Export our slow encoder to PySlowFast or pytorchvideo.

    python -m vthcl.export --to pyslowfast|pytorchvideo CKPT OUT [--arch r50] [--trust-checkpoint]

CKPT is vthcl.train's ``last.pt`` or ``slow_encoder.pt`` (the arch comes from
the checkpoint's config, from ``last.pt`` beside it, or ``--arch``). Only the
encoder is written; the other side's classifier starts from its own
initialisation:

* ``pyslowfast``: ``{"model_state": ...}`` in ``ResNet``'s (MODEL.ARCH slow)
  names, for TRAIN.CHECKPOINT_FILE_PATH or TEST.CHECKPOINT_FILE_PATH. Its
  ``load_checkpoint`` loads what matches and logs the head as not loaded.
* ``pytorchvideo``: a plain ``slow_r50`` state dict; load it with
  ``model.load_state_dict(state, strict=False)`` (the head ``blocks.5`` is
  not in it).

Both hold an R50 only: an r18 encoder is refused.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from vthcl import checkpoint as ckpt
from vthcl import options, weights
from vthcl.options import UsageError

log = logging.getLogger(__name__)

TARGETS = ("pyslowfast", "pytorchvideo")
CLI = options.command(
    "vthcl.export", __doc__, [options.EXPORT, "arch", "trust_checkpoint"],
    positionals=[options.Positional("checkpoint", "vthcl.train's last.pt or slow_encoder.pt", "CKPT"),
                 options.Positional("out", "the file to write", "OUT")])


def export(checkpoint, out, to: str, arch: str | None = None, trust: bool = False) -> Path:
    """Write the slow encoder of ``checkpoint`` to ``out`` in ``to``'s layout; returns ``out``."""
    from vthcl.eval import load_encoder

    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}: choose {' or '.join(TARGETS)}")
    encoder, cfg = load_encoder(str(checkpoint), arch=arch, trust=trust)
    if cfg["arch"] != "r50":
        raise ValueError(f"{checkpoint}: an {cfg['arch']} encoder has no counterpart in {to} (its Slow ResNets are "
                         f"R50 and up): only an r50 encoder exports")
    if cfg.get("input") == "residual":
        log.warning("%s: this encoder was trained on residual frames (input: residual); %s feeds it RGB unless "
                    "told otherwise", checkpoint, to)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    if to == "pyslowfast":
        # Without "epoch", load_checkpoint returns -1 (training starts at epoch 0) and never reads
        # "optimizer_state", which this file cannot hold: with "epoch" present, loading it through
        # TRAIN.CHECKPOINT_FILE_PATH (CHECKPOINT_EPOCH_RESET False, the default) reads the optimizer state.
        obj = {"model_state": weights.to_pyslowfast(state)}
    else:
        obj = weights.to_pytorchvideo(state)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(obj, out)
    log.info("wrote the %s slow encoder (width %d) of %s to %s in %s's layout", cfg["arch"], cfg["width"],
             checkpoint, out, to)
    return out


def _job(cfg: options.Config) -> None:
    if cfg.to is None:
        raise UsageError("--to is required: pyslowfast or pytorchvideo")
    try:
        out = export(cfg.checkpoint, cfg.out, cfg.to, cfg.arch if "arch" in cfg.given else None,
                     cfg.trust_checkpoint)
    except (ValueError, FileNotFoundError, ckpt.CheckpointRefused) as e:
        raise UsageError(str(e)) from None
    print(out)


def main(argv=None) -> int:
    return options.cli("vthcl.export", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
