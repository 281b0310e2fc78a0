"""Evaluate a pretrained slow encoder.

    python -m vthcl.eval linear|knn|retrieval|finetune --checkpoint CK --train SHARDS --val SHARDS --out DIR
        [--random-init] [--single-frame] [--epochs N --batch-size N --lr LR --num-clips N]
        [--config configs/ucf101_finetune.yaml]

* ``linear``: a linear classifier on frozen, globally pooled res5 features of
  the centre clip (standardised; full-batch L-BFGS with weight decay).
* ``knn``: cosine k-nearest neighbours with weighted votes (exp(s / 0.07)).
* ``retrieval``: val clips query the train clips; recall@1/5/10/20 = a clip of
  the same class among the top k (the video-pace protocol).
* ``finetune``: the slow encoder + a linear layer trained end to end with the
  paper's recipe (its epochs, batch and lr are this command's defaults; the lr
  is divided by 10 at 40% and 80% of the epochs), tested with ``--num-clips``
  uniform clips averaged per video.

``--random-init`` evaluates the same architecture untrained (the baseline);
``--single-frame`` feeds the centre frame repeated (no motion: an appearance-
only control). UCF101/HMDB51 work through make_shards' split files. Results
go to ``DIR/<mode>.json`` (accuracies in percent).
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vthcl import checkpoint as ckpt
from vthcl import options, weights
from vthcl.model import Pathway, slow_encoder_features
from vthcl.options import UsageError

log = logging.getLogger(__name__)

CLI = options.command("vthcl.eval", __doc__)
# what the protocols below take, and the paper's fine-tuning recipe as this command's defaults
PROTOCOL = ("init", "checkpoint", "train", "val", "out", "random_init", "single_frame", "arch", "width", "crop_size",
            "epochs", "batch_size", "lr", "num_clips", "workers", "seed", "trust_checkpoint")
RECIPE = {"epochs": 100, "batch_size": 64, "lr": 0.1, "out": "runs/eval"}
# A mode is a function of a resolved config, registered with @mode together with the options it takes. A mode
# of another module (detection, anticipation) declares its own section of options, registers itself the same way
# and is listed in MODE_MODULES, which this module imports.
MODES: dict[str, Callable[[options.Config], dict]] = {}
MODE_MODULES: tuple[str, ...] = ("vthcl.detection", "vthcl.anticipation")


def mode(name: str, description: str, takes=PROTOCOL, recipe=RECIPE, required=("train", "val")):
    """Register the evaluation mode ``name``: ``vthcl.eval NAME``, with the
    options ``takes`` (names or sections of vthcl.options), and the decorated
    function, ``fn(cfg) -> dict``, whose result :func:`run` writes to
    ``OUT/<name>.json``."""
    def register(fn):
        options.mode("vthcl.eval", name, description, takes, recipe=recipe, required=required)
        MODES[name] = fn
        return fn
    return register


# ----------------------------------------------------------------------------- encoders
def load_encoder(checkpoint: str | None, random_init: bool = False, arch: str | None = None,
                 width: int | None = None, seed: int = 0, trust: bool = False) -> tuple[Pathway, dict]:
    """The slow encoder of a vthcl.train checkpoint (last.pt, or slow_encoder.pt
    with last.pt beside it or --arch/--width), or the same net untrained.
    Checkpoints load as tensors and plain values only (see vthcl.checkpoint;
    ``trust``: unpickle in full). ``checkpoint`` may also be an init string
    (random, vthcl:, pyslowfast:, pytorchvideo:, imagenet2d:; see
    vthcl.weights.load_encoder_init)."""
    if weights.init_scheme(checkpoint):
        return weights.load_encoder_init(checkpoint, arch, width, seed, trust, random_init=random_init)
    cfg = {k: options.OPTIONS[k].get_default() for k in ("arch", "width", "tau", "alpha", "slow_frames", "crop_size",
                                                         "input")}
    state = None
    if checkpoint:
        path = Path(checkpoint)
        ck = ckpt.load(path, trust=trust)
        if isinstance(ck, dict) and "config" in ck:
            cfg.update({k: ck["config"][k] for k in cfg if k in ck["config"]})
            state = {k[len("slow."):]: v for k, v in ck["model"].items() if k.startswith("slow.")}
        else:
            state = ck
            beside = path.with_name("last.pt")
            if beside.exists() and not (arch and width):
                cfg.update({k: v for k, v in ckpt.load(beside, trust=trust)["config"].items() if k in cfg})
    if arch:
        cfg["arch"] = arch
    if width:
        cfg["width"] = width
    torch.manual_seed(seed)
    encoder = Pathway(cfg["arch"], cfg["width"], slow=True, residual=cfg["input"] == "residual")
    if state is not None and not random_init:
        weights.load_pathway(encoder, state, str(checkpoint))
    return encoder.eval(), cfg


def encoder_for(cfg: options.Config) -> tuple[Pathway, dict]:
    """The encoder a mode starts from: ``--init SPEC`` (or ``--checkpoint CK``, which is ``vthcl:CK``), or
    with ``--random-init`` the same architecture untrained; its architecture and crop are the checkpoint's
    unless the command line gives them."""
    if cfg.init and cfg.checkpoint:
        raise UsageError("give --init or --checkpoint (--checkpoint CK is --init vthcl:CK), not both")
    spec = cfg.init or cfg.checkpoint
    if not spec and not cfg.random_init:
        raise UsageError("give --init (or --checkpoint), or --random-init for the untrained baseline")

    def given(name):  # the checkpoint's own architecture and crop, unless the user gave them
        return getattr(cfg, name) if name in cfg.given else None
    try:
        encoder, enc = load_encoder(spec, cfg.random_init, given("arch"), given("width"), cfg.seed,
                                    cfg.trust_checkpoint)
    except UsageError:  # (a refused checkpoint is one: it says what to do)
        raise
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    for name in ("crop_size", "tau", "alpha", "slow_frames"):
        if given(name):
            enc[name] = getattr(cfg, name)
    return encoder, enc


def clip_loader(shards, cfg: dict, train: bool, batch_size: int, num_clips: int = 1, num_workers: int | None = 0,
                seed: int = 0):
    from loaders import build_loader
    return build_loader(shards, backend="pyav", batch_size=batch_size, tau=cfg["tau"], alpha=cfg["alpha"],
                        slow_frames=cfg["slow_frames"], crop_size=cfg["crop_size"], train=train, device="cpu",
                        num_workers=num_workers, seed=seed, num_clips=num_clips)


def single_frame(clip: torch.Tensor) -> torch.Tensor:
    """The centre frame repeated over time: the same appearance, no motion."""
    t = clip.shape[2] // 2
    return clip[:, :, t:t + 1].expand_as(clip).contiguous()


@torch.no_grad()
def extract(encoder: Pathway, shards, cfg: dict, single: bool = False, batch_size: int = 16,
            num_workers: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled res5 features of the centre clip of every video (manifest order)."""
    feats, labels, order = [], [], []
    for b in clip_loader(shards, cfg, False, batch_size, num_workers=num_workers):
        x = single_frame(b["slow"]) if single else b["slow"]
        feats.append(slow_encoder_features(encoder, x))
        labels.append(b["label"])
        order.append(b["index"])
    order = torch.cat(order)
    keep = torch.unique(order, return_inverse=True)[1]
    first = torch.full((int(keep.max()) + 1,), -1, dtype=torch.long)
    first.scatter_reduce_(0, keep, torch.arange(len(order)), reduce="amin", include_self=False)
    return torch.cat(feats)[first], torch.cat(labels)[first]


# ----------------------------------------------------------------------------- protocols
def linear_probe(xtr, ytr, xva, yva, weight_decay: float = 1e-3, steps: int = 300) -> float:
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    classes = int(max(ytr.max(), yva.max())) + 1
    torch.manual_seed(0)
    layer = torch.nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(xtr), ytr) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float((layer(xva).argmax(1) == yva).float().mean())


def knn(xtr, ytr, xva, yva, k: int = 20, temperature: float = 0.07) -> float:
    xtr, xva = F.normalize(xtr, dim=1), F.normalize(xva, dim=1)
    sims = xva @ xtr.t()
    k = min(k, len(xtr))
    top, idx = sims.topk(k, dim=1)
    classes = int(max(ytr.max(), yva.max())) + 1
    votes = torch.zeros(len(xva), classes).scatter_add_(1, ytr[idx], (top / temperature).exp())
    return 100.0 * float((votes.argmax(1) == yva).float().mean())


def retrieval(xtr, ytr, xva, yva, ks=(1, 5, 10, 20)) -> dict:
    sims = F.normalize(xva, dim=1) @ F.normalize(xtr, dim=1).t()
    ranked = ytr[sims.argsort(dim=1, descending=True)]
    hits = ranked == yva[:, None]
    return {f"recall@{k}": 100.0 * float(hits[:, :min(k, hits.shape[1])].any(1).float().mean()) for k in ks}


def finetune(encoder: Pathway, cfg: dict, train, val, epochs: int = RECIPE["epochs"],
             batch_size: int = RECIPE["batch_size"], lr: float = RECIPE["lr"], num_clips: int = 10,
             num_workers: int | None = 0, seed: int = 0, log=None) -> dict:
    """The paper's fine-tuning recipe (SGD, lr/10 at 40% and 80% of the epochs), multi-clip test."""
    from loaders import resolve_shards
    classes = len(resolve_shards(train).manifest.get("classes") or []) or None
    loader = clip_loader(train, cfg, True, batch_size, num_workers=num_workers, seed=seed)
    if classes is None:
        classes = int(max(int(b["label"].max()) for b in loader)) + 1
    encoder.train()
    head = torch.nn.Linear(encoder.dims["res5"], classes)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.4 * epochs), int(0.8 * epochs)], gamma=0.1)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for b in loader:
            logits = head(F.dropout(slow_encoder_features(encoder, b["slow"]), 0.5, training=True))
            loss = F.cross_entropy(logits, b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if log:
            log(f"finetune epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    encoder.eval()
    scores, labels = {}, {}
    with torch.no_grad():
        for b in clip_loader(val, cfg, False, batch_size, num_clips=num_clips, num_workers=num_workers):
            prob = head(slow_encoder_features(encoder, b["slow"])).softmax(1)
            for i, idx in enumerate(b["index"].tolist()):
                scores[idx] = scores.get(idx, 0) + prob[i]
                labels[idx] = int(b["label"][i])
    correct = [int(scores[i].argmax()) == labels[i] for i in scores]
    return {"top1": 100.0 * sum(correct) / len(correct), "videos": len(correct), "clips_per_video": num_clips}


def evaluate(mode: str, encoder, cfg, train, val, single: bool = False, **options) -> dict:
    if mode == "finetune":
        return finetune(encoder, cfg, train, val, **options)
    workers = options.get("num_workers", 0)
    xtr, ytr = extract(encoder, train, cfg, single, num_workers=workers)
    xva, yva = extract(encoder, val, cfg, single, num_workers=workers)
    if (ytr < 0).any() or (yva < 0).any():
        raise UsageError("the shards hold unlabeled videos (label -1): evaluation needs labels")
    if mode == "linear":
        return {"top1": linear_probe(xtr, ytr, xva, yva), "train_videos": len(xtr), "val_videos": len(xva)}
    if mode == "knn":
        return {"top1": knn(xtr, ytr, xva, yva), "k": min(20, len(xtr))}
    return retrieval(xtr, ytr, xva, yva)


@mode("finetune", "the slow encoder + a linear layer trained end to end (the paper's recipe)")
@mode("retrieval", "recall@1/5/10/20 of val clips against train clips")
@mode("knn", "cosine k-nearest neighbours (k=20) on the same features")
@mode("linear", "a linear probe on frozen, pooled res5 features of the centre clip")
def protocol(cfg: options.Config) -> dict:
    """The encoder of ``cfg.checkpoint`` (or an untrained one) evaluated by ``cfg.mode``."""
    encoder, enc = encoder_for(cfg)
    extra = {"num_workers": cfg.workers}
    if cfg.mode == "finetune":
        extra.update(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, num_clips=cfg.num_clips,
                     seed=cfg.seed, log=log.info)
    result = evaluate(cfg.mode, encoder, enc, cfg.train, cfg.val, cfg.single_frame, **extra)
    result.update({"init": cfg.init or cfg.checkpoint, "random_init": cfg.random_init,
                   "single_frame": cfg.single_frame, "arch": enc["arch"], "width": enc["width"]})
    return result


for _module in MODE_MODULES:
    importlib.import_module(_module)


def run(cfg: options.Config | None = None, /, **values) -> dict:
    """Evaluate with ``cfg`` (``options.resolve("vthcl.eval", mode="knn", ...)``,
    or the options as keywords): the mode's result, also written to
    ``OUT/<mode>[_random][_single_frame].json``."""
    cfg = options.take("vthcl.eval", cfg, values)
    result = {"mode": cfg.mode, **MODES[cfg.mode](cfg)}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return result  # (rank 0 writes)
    name = cfg.mode + ("_random" if getattr(cfg, "random_init", False) else "") + (
        "_single_frame" if getattr(cfg, "single_frame", False) else "")
    path = Path(cfg.out) if cfg.out.endswith(".json") else Path(cfg.out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def _job(cfg: options.Config) -> None:
    print(json.dumps(run(cfg)))


def main(argv=None) -> int:
    return options.cli("vthcl.eval", _job, argv)


if __name__ == "__main__":
    # Run as ``python -m vthcl.eval`` this file is a second module, ``__main__``; the task modes (detection,
    # anticipation) register with the imported ``vthcl.eval``, so its main is the one that knows them all.
    sys.exit(importlib.import_module("vthcl.eval").main())
