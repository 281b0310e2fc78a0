"""Pretrain VTHCL: ``python -m vthcl.train --data SHARDS --out DIR [options]``.

Also under ``torchrun --nproc_per_node=K -m vthcl.train ...`` (NCCL on GPUs,
gloo on CPUs). ``--batch-size`` is the global batch, split across ranks.
Defaults are the paper's recipe (SGD with a half-cosine schedule; ``--help``
and ``--print-config`` list every value); ``--config`` reads one from a file
(``configs/``), and the command line wins.

Writes ``DIR/metrics.jsonl`` (a JSON line per logged step), TensorBoard logs,
``DIR/last.pt`` (everything needed to resume exactly) and
``DIR/slow_encoder.pt`` (the slow encoder's state_dict, for fine-tuning).
"""
from __future__ import annotations

import copy
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vthcl import checkpoint as ckpt
from vthcl import options
from vthcl.memory import MemoryBank, ShardedMemoryBank
from vthcl.model import VTHCL
from vthcl.options import JobError, UsageError

log = logging.getLogger(__name__)

CLI = options.command(
    "vthcl.train", __doc__,
    ["data", "backend", "num_videos", options.MODEL, options.CLIP, options.METHOD, options.OPTIM,
     "seed", "device", "workers", "out", "resume", "log_every", "ckpt_every", "tensorboard", "trust_checkpoint"],
    recipe={"out": "runs/pretrain"})


# ---------------------------------------------------------------------------- setup
def setup_distributed(cfg):
    """(rank, world size, device) under torchrun or alone; ``cfg.device`` becomes the one chosen."""
    from vthcl.downstream import setup_distributed as setup
    cfg.device = options.auto_device(cfg.device)
    return setup(cfg.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(cfg, rank: int, world: int, device):
    from loaders import build_loader
    per_rank = cfg.batch_size // world
    if per_rank < 1 or cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} ranks")
    extra = {"independent_crops": True} if cfg.independent_crops else {}
    if cfg.backend == "synthetic" and not cfg.data:
        extra["num_videos"] = cfg.num_videos
    return build_loader(cfg.data, backend=cfg.backend, batch_size=per_rank, tau=cfg.tau, alpha=cfg.alpha,
                        slow_frames=cfg.slow_frames, crop_size=cfg.crop_size, train=True, normalize=True,
                        device=str(device), rank=rank, world_size=world, num_workers=cfg.workers,
                        seed=cfg.seed, channels_last=bool(cfg.channels_last), **extra)


# ---------------------------------------------------------------------------- train
def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator, p_gray: float = 0.2) -> torch.Tensor:
    """Colour jitter of normalised clips [B, 3, T, H, W], one draw per clip
    (every frame alike): brightness, contrast, saturation in [1-s, 1+s], then
    grayscale with probability ``p_gray``."""
    from loaders import MEAN, STD
    B = x.shape[0]
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1, 1)

    def factor():
        return (1 + (torch.rand(B, generator=gen) * 2 - 1) * strength).to(x.device).view(B, 1, 1, 1, 1)

    def gray(p):
        return (0.299 * p[:, :1] + 0.587 * p[:, 1:2] + 0.114 * p[:, 2:]).expand_as(p)

    p = (x * std + mean) * factor()
    level = gray(p).mean(dim=(1, 2, 3, 4), keepdim=True)
    p = (p - level) * factor() + level
    g = gray(p)
    p = g + (p - g) * factor()
    to_gray = (torch.rand(B, generator=gen) < p_gray).to(x.device).view(B, 1, 1, 1, 1)
    p = torch.where(to_gray, gray(p), p).clamp_(0, 255)
    return (p - mean) / std


def train_step(forward, bank, optimizer, scaler, batch: dict, amp_dtype=None):
    """One VTHCL step: encode both clips, the hierarchical bank loss, SGD,
    then the bank update. A non-finite loss (on any rank) skips the update.
    Returns (loss, per-level loss, finite)."""
    device_type = batch["fast"].device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        q = forward(batch["slow"], batch["fast"])
    loss, per_level = bank.loss(q.float(), batch["index"])
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank skips together, or none does
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    optimizer.zero_grad(set_to_none=True)
    if not bool(finite):
        return loss.detach(), per_level.detach(), False
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    bank.update(q.detach().float(), batch["index"])
    return loss.detach(), per_level.detach(), True


@dataclass
class State:
    """Everything a step changes and a checkpoint holds."""
    model: VTHCL
    bank: MemoryBank
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: object
    lr: float
    step: int = 0
    epoch: int = 0
    nonfinite: int = 0


def build(cfg, rank: int, world: int, device) -> State:
    """The loader, the model, its banks, the optimizer and the schedule (in this
    order: it is the order of their random draws, which a resumed run replays)."""
    if cfg.backend != "synthetic" and not cfg.data:
        raise UsageError("--data SHARDS is required (or --backend synthetic)")
    try:
        loader = make_loader(cfg, rank, world, device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if len(loader) == 0:
        raise UsageError(f"no batches in {cfg.data}")
    model = VTHCL(cfg.arch, cfg.width, cfg.levels, input=cfg.input, head=cfg.head).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    bank_cls = ShardedMemoryBank if cfg.shard_banks else MemoryBank
    bank = bank_cls(loader.num_videos, cfg.levels, model.dim, cfg.num_negatives, cfg.temperature, cfg.bank_momentum,
                    cfg.level_weights, torch.bfloat16 if cfg.bank_dtype == "bf16" else torch.float32,
                    cfg.positive, seed=cfg.seed).to(device)
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 256  # linear scaling
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * len(loader))  # half cosine
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return State(model, bank, optimizer, scheduler, scaler, loader, lr)


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(s: State, cfg, out: Path, rank: int, world: int) -> None:
    """``out/last.pt`` (rank 0: everything to resume exactly; tensors and plain
    values only) and ``out/slow_encoder.pt``; with sharded banks every rank
    also writes its own rows and generator, ``out/bank_rank{r}.pt``."""
    rngs = [ckpt.rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, ckpt.rng_state())
    banks = {"bank": s.bank.state_dict(), "bank_generator": s.bank.generator.get_state()}
    sharded = cfg.shard_banks and world > 1
    if sharded:
        ckpt.save({**banks, "rank": rank, "world": world, "step": s.step}, out / f"bank_rank{rank}.pt")
    if rank != 0:
        return
    ckpt.save({"model": s.model.state_dict(), **(banks if not sharded else {"bank": None}),
               "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
               "scaler": s.scaler.state_dict(), "step": s.step, "nonfinite": s.nonfinite,
               "loader": s.loader.state_dict(), "rng": rngs, "config": vars(cfg), "num_videos": s.bank.num_videos},
              out / "last.pt")
    ckpt.save(s.model.slow.state_dict(), out / "slow_encoder.pt")


def load_checkpoint(s: State, cfg, out: Path, rank: int, world: int, device) -> bool:
    """Resume ``s`` from ``out/last.pt`` (and this rank's bank_rank{r}.pt with
    sharded banks): model, banks and their generator, optimizer, schedule,
    scaler, step, the loader's place in its epoch and this rank's RNG
    states. False if there is no checkpoint."""
    if not (out / "last.pt").exists():
        return False
    sharded = cfg.shard_banks and world > 1
    try:
        ck = ckpt.load(out / "last.pt", device, trust=cfg.trust_checkpoint)
        own = ckpt.load(out / f"bank_rank{rank}.pt", device, trust=cfg.trust_checkpoint) if sharded else ck
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if sharded and (own.get("world") != world or own.get("step") != ck["step"]):
        raise UsageError(f"{out / f'bank_rank{rank}.pt'} holds the bank rows of step "
                         f"{own.get('step')} of a {own.get('world')}-rank run, not of step {ck['step']} on "
                         f"{world} ranks: sharded banks resume on the same number of ranks")
    s.model.load_state_dict(ck["model"])
    s.bank.load_state_dict(own["bank"])
    s.bank.generator.set_state(own["bank_generator"])
    s.optimizer.load_state_dict(ck["optimizer"])
    s.scheduler.load_state_dict(ck["scheduler"])
    s.scaler.load_state_dict(ck["scaler"])
    s.step, s.nonfinite = ck["step"], ck.get("nonfinite", 0)
    s.loader.load_state_dict(ck["loader"])
    s.epoch = ck["loader"]["epoch"]
    ckpt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
    return True


# ---------------------------------------------------------------------------- logging
class Log:
    """Rank 0's record of a run: ``metrics.jsonl`` (a JSON line per logged
    step), TensorBoard scalars, a progress bar (not with ``quiet``) and
    messages; nothing on other ranks."""

    def __init__(self, cfg, out: Path, main_rank: bool, first_step: int, max_steps: int):
        self.main = main_rank
        self.metrics = open(out / "metrics.jsonl", "a" if cfg.resume else "w") if main_rank else None
        self.writer = self.bar = None
        if main_rank and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb"))
        if main_rank and not cfg.quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def say(self, text: str) -> None:
        if self.main:
            log.info(text)

    def step(self, record: dict | None, loss: torch.Tensor, epoch: int) -> None:
        """One step done; ``record`` (a logged step's figures) goes to the file and TensorBoard.
        ``loss`` is read (a device sync) only for the progress bar."""
        if record and self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            if self.writer:
                for k, v in record.items():
                    if k not in ("step", "epoch"):
                        self.writer.add_scalar(f"train/{k}", v, record["step"])
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)

    def close(self) -> None:
        for thing in (self.bar, self.writer, self.metrics):
            if thing:
                thing.close()


# ---------------------------------------------------------------------------- the loop
def train(cfg: options.Config | None = None, /, **values) -> dict:
    """Pretrain with ``cfg`` (``options.resolve("vthcl.train", ...)``; or the
    options as keywords). Returns the last logged step's metrics. Raises
    UsageError for bad options or data, JobError when the loss stays
    non-finite."""
    cfg = copy.copy(options.take("vthcl.train", cfg, values))  # the run fills in device, precision, ...
    rank, world, device = setup_distributed(cfg)
    out = Path(cfg.out)
    if cfg.precision is None:
        cfg.precision = "bf16" if device.type == "cuda" else "fp32"
    if cfg.channels_last is None:
        cfg.channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed + rank)
    s = build(cfg, rank, world, device)
    ddp = torch.nn.parallel.DistributedDataParallel(s.model) if world > 1 else s.model
    forward = torch.compile(ddp) if cfg.compile else ddp
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume and not load_checkpoint(s, cfg, out, rank, world, device) and rank == 0:
        log.info(f"no checkpoint in {out}, starting afresh")
    steps_per_epoch = len(s.loader)
    max_steps = min(cfg.max_steps or cfg.epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)
    run_log = Log(cfg, out, rank == 0, s.step, max_steps)
    run_log.say(f"{s.bank.num_videos} videos, {world} rank(s) x batch {cfg.batch_size // world}, {steps_per_epoch} "
            f"steps/epoch, {max_steps} steps, lr {s.lr:g}, {cfg.precision}, N={s.bank.num_negatives}")

    consecutive_nonfinite, last = 0, {}
    s.model.train()
    while s.step < max_steps and s.epoch < cfg.epochs:
        s.loader.set_epoch(s.epoch)
        t_prev, wait_before = time.perf_counter(), s.loader.stats.wait_s
        for batch in s.loader:
            wait = s.loader.stats.wait_s - wait_before
            if cfg.color_jitter:  # independent draws for the two clips, reproducible per step and rank
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + s.step * world + rank)
                batch["slow"] = color_jitter(batch["slow"], cfg.color_jitter, gen)
                batch["fast"] = color_jitter(batch["fast"], cfg.color_jitter, gen)
            loss, per_level, finite = train_step(forward, s.bank, s.optimizer, s.scaler, batch, amp_dtype)
            s.scheduler.step()
            s.step += 1
            consecutive_nonfinite = 0 if finite else consecutive_nonfinite + 1
            s.nonfinite += not finite
            if consecutive_nonfinite >= cfg.max_nonfinite:
                raise JobError(f"{consecutive_nonfinite} non-finite losses in a row at step {s.step}: stopping "
                               "(lower --lr, or try --precision fp32)")
            now = time.perf_counter()
            dt, t_prev, wait_before = now - t_prev, now, s.loader.stats.wait_s
            record = None
            if rank == 0 and (s.step % cfg.log_every == 0 or s.step == max_steps):
                record = last = {
                    "step": s.step, "epoch": s.epoch, "loss": loss.item(),
                    **{f"loss_{name}": float(v) for name, v in zip(s.model.level_names, per_level.detach())},
                    "lr": s.optimizer.param_groups[0]["lr"], "clips_per_s": batch["slow"].shape[0] * world / dt,
                    "data_wait": min(1.0, wait / dt), "nonfinite": s.nonfinite}
            run_log.step(record, loss, s.epoch)
            if s.step % cfg.ckpt_every == 0 or s.step >= max_steps:
                save_checkpoint(s, cfg, out, rank, world)
            if s.step >= max_steps:
                break
        else:
            s.epoch += 1
            s.loader.set_epoch(s.epoch)
            save_checkpoint(s, cfg, out, rank, world)
    run_log.close()
    if dist.is_initialized():
        dist.barrier()
    return last


def _job(cfg: options.Config) -> None:
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    return options.cli("vthcl.train", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
