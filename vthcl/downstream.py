"""The loop every downstream task fine-tunes with (detection, anticipation, recognition).

A task's mode calls :func:`start` (the process group, both loaders of its
event dataset, the encoder: a :class:`Job`), builds its model on the
encoder, and gives :meth:`Job.fit` the model and a step (the loss of a
batch); :func:`fit` runs SGD with the task's :class:`Schedule` (a linear
warm-up, then the rate divided at the milestone epochs, as PySlowFast's
``steps_with_relative_lrs``), under ``torchrun`` as :mod:`vthcl.train` does
(DDP; NCCL on GPUs, gloo on CPUs), with a progress bar and
``OUT/metrics.jsonl`` on rank 0 and a checkpoint at every epoch's end
(``OUT/task_last.pt``: model, optimizer, schedule, the loader's place, RNG
states) that a run with ``resume`` continues exactly.

Evaluation runs each rank over its share of the validation samples;
:func:`gather` brings every rank's records to all of them, each sample's
once.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from vthcl import checkpoint as ckpt
from vthcl import options

log = logging.getLogger(__name__)
CHECKPOINT = "task_last.pt"


@dataclass(frozen=True)
class Schedule:
    """SGD with momentum and weight decay; the rate warms up linearly from
    ``warmup_start_lr`` over ``warmup_epochs``, then is ``lr`` times ``gamma``
    per milestone epoch passed."""
    lr: float
    epochs: int
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def factor(self, epoch: float) -> float:
        """The learning rate at (fractional) ``epoch``, relative to ``lr``."""
        steps = sum(epoch >= m for m in self.milestones)
        after = self.gamma ** steps
        if epoch < self.warmup_epochs:
            start = self.warmup_start_lr / self.lr
            target = self.gamma ** sum(self.warmup_epochs >= m for m in self.milestones)
            return start + (target - start) * epoch / self.warmup_epochs
        return after


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun or alone; the process group is started once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = options.auto_device(device)
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return rank, world, dev


def gather(records: list, key: Callable[[Any], Any] | None = None) -> list:
    """Every rank's ``records``, concatenated in rank order (the same list on every rank). With ``key`` (a
    record's sample), a sample's records come from the first rank that has it: a rank whose range is short
    repeats another rank's samples as padding (:func:`loaders.ranks.rank_indices`)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return records
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    if key is None:
        return [r for part in parts for r in part]
    owner: dict = {}
    return [r for rank, part in enumerate(parts) for r in part if owner.setdefault(key(r), rank) == rank]


@dataclass
class Job:
    """What a downstream mode starts from (:func:`start`): this process's place in the run, the loaders of
    the training and validation events, and the encoder with its settings (``enc``: arch, width, ...)."""
    cfg: options.Config
    rank: int
    world: int
    device: torch.device
    train: Any
    val: Any
    encoder: torch.nn.Module
    enc: dict

    @property
    def info(self) -> dict:
        """The training dataset's event info (classes, label map) and its task."""
        return {"task": self.train.events.task, **self.train.events.info}

    @property
    def val_events(self) -> list[dict]:
        """The rows of the validation dataset's events.jsonl."""
        return self.val.events.rows

    def fit(self, model: torch.nn.Module, step: Callable, extra_state: dict | None = None) -> dict:
        """:func:`fit` of ``model`` (moved to the device) on the training loader with the options' schedule."""
        cfg = self.cfg
        schedule = Schedule(cfg.lr, cfg.epochs, tuple(cfg.milestones or ()), 0.1, cfg.warmup_epochs,
                            cfg.warmup_start_lr, cfg.momentum, cfg.weight_decay)
        return fit(model.to(self.device), self.train, step, schedule, Path(cfg.out), resume=cfg.resume,
                   progress=not cfg.quiet, log_every=cfg.log_every, max_steps=cfg.max_steps,
                   trust=cfg.trust_checkpoint, extra_state=extra_state)

    def result(self, last: dict, settings: tuple[str, ...]) -> dict:
        """The part of a mode's result every task has: the init, the encoder, the training's end, and the
        options named in ``settings``."""
        cfg = self.cfg
        return {"init": cfg.init or cfg.checkpoint, "random_init": cfg.random_init, "arch": self.enc["arch"],
                "width": self.enc["width"], "train_steps": last.get("step"), "final_loss": last.get("loss"),
                "settings": {k: getattr(cfg, k) for k in settings}}


def task_loader(cfg: options.Config, shards, train: bool, rank: int, world: int, device, **sampling):
    """A downstream task's loader of ``shards``: the clip options of ``cfg``, this rank's share of
    ``--batch-size``, the task's sampling options."""
    from loaders import build_loader
    if cfg.batch_size % world:
        raise options.UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} ranks")
    try:
        return build_loader(shards, backend=cfg.backend, batch_size=cfg.batch_size // world, tau=cfg.tau,
                            alpha=cfg.alpha, slow_frames=cfg.slow_frames, crop_size=cfg.crop_size, train=train,
                            device=str(device), rank=rank, world_size=world, num_workers=cfg.workers,
                            seed=cfg.seed, **sampling)
    except (FileNotFoundError, ValueError) as e:
        raise options.UsageError(str(e)) from None


def start(cfg: options.Config, task: str, needs: str, train_sampling: dict | None = None,
          val_sampling: dict | None = None) -> Job:
    """The start of the mode ``cfg.mode`` of the task ``task`` ("ava", "epic"; ``needs`` says which shards
    that is, for the message): the process group under torchrun, the loaders of ``cfg.train`` and
    ``cfg.val`` (their manifests must be the task's), and the encoder of ``--init``."""
    from loaders.shards import resolve_shards
    from vthcl.eval import encoder_for
    for shards in (cfg.train, cfg.val):
        try:
            kind = resolve_shards(shards).manifest.get("task") or "video"
        except (FileNotFoundError, ValueError) as e:
            raise options.UsageError(str(e)) from None
        if kind != task:
            raise options.UsageError(f"{shards}: {cfg.mode} needs {needs}, not {kind!r} ones")
    rank, world, device = setup_distributed(cfg.device)
    train = task_loader(cfg, cfg.train, True, rank, world, device, **(train_sampling or {}))
    val = task_loader(cfg, cfg.val, False, rank, world, device, **(val_sampling or {}))
    encoder, enc = encoder_for(cfg)
    return Job(cfg, rank, world, device, train, val, encoder, enc)


class Progress:
    """Rank 0's record of a fine-tuning run: a tqdm bar and ``metrics.jsonl`` (a line per logged step)."""

    def __init__(self, out: Path, main: bool, total: int, first: int, resume: bool, progress: bool):
        self.main = main
        self.file = open(out / "metrics.jsonl", "a" if resume else "w") if main else None
        self.bar = None
        if main and progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=first, unit="step", dynamic_ncols=True)

    def step(self, record: dict | None) -> None:
        if record and self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.bar:
            self.bar.update(1)
            if record:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", epoch=record["epoch"])

    def close(self) -> None:
        for thing in (self.bar, self.file):
            if thing:
                thing.close()


def fit(model: torch.nn.Module, loader, step: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
        schedule: Schedule, out: Path, *, resume: bool = False, progress: bool = True, log_every: int = 10,
        max_steps: int | None = None, trust: bool = False, extra_state: dict | None = None) -> dict:
    """Train ``model`` (already on its device; wrapped in DDP here under
    torchrun) for ``schedule.epochs`` epochs of ``loader``; ``step(model,
    batch)`` returns the loss and the figures to log. Returns the last logged
    record. ``extra_state`` is saved beside the model (what the task needs to
    rebuild it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum,
                                weight_decay=schedule.weight_decay)
    per_epoch = max(1, len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: schedule.factor(it / per_epoch))
    epoch = first = 0
    path = out / CHECKPOINT
    if resume and path.exists():
        state = ckpt.load(path, trust=trust)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        epoch, first = state["loader"]["epoch"], state["step"]
        ckpt.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        log.info("resuming %s at epoch %d, step %d", path, epoch, first)
    total = schedule.epochs * per_epoch if max_steps is None else min(max_steps, schedule.epochs * per_epoch)
    bar = Progress(out, rank == 0, total, first, resume and first > 0, progress)
    done, last = first, {}
    model.train()
    try:
        while done < total and epoch < schedule.epochs:
            loader.set_epoch(epoch)
            for batch in loader:
                loss, figures = step(net, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                done += 1
                record = None
                if rank == 0 and (done % log_every == 0 or done == total):
                    record = last = {"step": done, "epoch": epoch, "loss": loss.item(),
                                     "lr": optimizer.param_groups[0]["lr"], **figures}
                bar.step(record)
                if done >= total:
                    break
            else:
                epoch += 1
                loader.set_epoch(epoch)
            _save(path, model, optimizer, scheduler, loader, done, rank, world, extra_state)
    finally:
        bar.close()
    model.eval()
    return last


def _save(path: Path, model, optimizer, scheduler, loader, step: int, rank: int, world: int, extra: dict | None):
    rngs = [ckpt.rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, ckpt.rng_state())
    if rank == 0:
        ckpt.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "step": step, "rng": rngs,
                   **(extra or {})}, path)
