"""Pretrain VTHCL: ``python -m vthcl.train --data SHARDS --out DIR [options]``.

Also under ``torchrun --nproc_per_node=K -m vthcl.train ...`` (NCCL on GPUs,
gloo on CPUs). ``--batch-size`` is the global batch, split across ranks.
Defaults are the paper's: SGD lr 0.03 for a global batch of 256 (scaled
linearly), momentum 0.9, weight decay 1e-4, half-cosine schedule, 200 epochs,
α=2, τ=8, 3 levels, T=0.07, 16384 negatives, bank momentum 0.5.

Writes ``DIR/metrics.jsonl`` (a JSON line per logged step), TensorBoard logs,
``DIR/last.pt`` (everything needed to resume exactly) and
``DIR/slow_encoder.pt`` (the slow encoder's state_dict, for fine-tuning).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from loaders import BACKENDS
from vthcl import checkpoint as ckpt
from vthcl.memory import MemoryBank, ShardedMemoryBank
from vthcl.model import VTHCL

DEFAULTS = dict(data=None, backend="pyav", arch="r18", out="runs/pretrain", max_steps=None, epochs=200,
                batch_size=256, crop_size=224, num_negatives=16384, levels=3, alpha=2, tau=8, slow_frames=8,
                width=64, seed=0, device=None, resume=False, lr=None, base_lr=0.03, momentum=0.9,
                weight_decay=1e-4, temperature=0.07, bank_momentum=0.5, level_weights=None, bank_dtype="fp32",
                shard_banks=False, positive="bank", input="rgb", precision=None, channels_last=None, compile=False,
                num_workers=None, log_every=1, ckpt_every=500, max_nonfinite=5, num_videos=None,
                independent_crops=False, color_jitter=0.0, tensorboard=True, progress=True, trust_checkpoint=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vthcl.train", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--config", help="YAML file of options (the command line wins)")
    a("--data", help="shards: manifest.json, folder, brace pattern (a .beton for --backend ffcv)")
    a("--backend", choices=BACKENDS)
    a("--arch", choices=["r18", "r50"])
    a("--out")
    a("--max-steps", type=int, help="stop after this many steps (the schedule still spans --epochs)")
    a("--epochs", type=int)
    a("--batch-size", type=int, help="global batch size (all ranks together)")
    a("--crop-size", type=int)
    a("--num-negatives", type=int)
    a("--levels", type=int, choices=[1, 2, 3])
    a("--alpha", type=int)
    a("--tau", type=int)
    a("--slow-frames", type=int)
    a("--width", type=int, help="stem channels (64 = the paper's R18/R50)")
    a("--seed", type=int)
    a("--device", choices=["cpu", "cuda"])
    a("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    ckpt.add_trust_flag(p)
    a("--lr", type=float, help="learning rate (default: 0.03 x batch/256)")
    a("--momentum", type=float)
    a("--weight-decay", type=float)
    a("--temperature", type=float)
    a("--bank-momentum", type=float)
    a("--level-weights", type=float, nargs="+", help="λ^k per level, res3 first (default: 1 each)")
    a("--bank-dtype", choices=["fp32", "bf16"])
    a("--shard-banks", action="store_true", default=None, help="each rank keeps n/world_size bank rows")
    a("--positive", choices=["bank", "batch"], help="positive from the other bank (paper) or the other clip")
    a("--input", choices=["rgb", "residual"], help="RGB frames (paper) or residual frames (x[t] - x[t-1])")
    a("--precision", choices=["fp32", "bf16", "fp16"], help="autocast (default: bf16 on GPU, fp32 on CPU)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    a("--compile", action="store_true", default=None)
    a("--num-workers", type=int, help="loader workers per rank")
    a("--num-videos", type=int, help="synthetic backend without --data")
    a("--independent-crops", action="store_true", default=None, help="a crop of its own for the slow clip")
    a("--color-jitter", type=float, metavar="S",
      help="colour jitter drawn independently for the two clips: brightness, contrast and saturation factors "
           "in [1-S, 1+S], grayscale with p=0.2, one draw per clip (default 0: off, the loaders' spatial "
           "augmentation only)")
    a("--log-every", type=int)
    a("--ckpt-every", type=int)
    a("--max-nonfinite", type=int, help="stop after this many non-finite losses in a row")
    a("--no-tensorboard", dest="tensorboard", action="store_false", default=None)
    a("--no-progress", dest="progress", action="store_false", default=None)
    return p


def parse_config(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    cfg = dict(DEFAULTS)
    if args.config:
        import yaml
        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        unknown = set(loaded) - set(cfg)
        if unknown:
            raise SystemExit(f"vthcl.train: unknown keys in {args.config}: {sorted(unknown)}")
        cfg.update(loaded)
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return argparse.Namespace(**cfg)


# ---------------------------------------------------------------------------- setup
def setup_distributed(cfg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(cfg, rank: int, world: int, device):
    from loaders import build_loader
    per_rank = cfg.batch_size // world
    if per_rank < 1 or cfg.batch_size % world:
        raise SystemExit(f"vthcl.train: --batch-size {cfg.batch_size} must be a multiple of the {world} ranks")
    extra = {"independent_crops": True} if cfg.independent_crops else {}
    if cfg.backend == "synthetic" and not cfg.data:
        extra["num_videos"] = cfg.num_videos or 1024
    return build_loader(cfg.data, backend=cfg.backend, batch_size=per_rank, tau=cfg.tau, alpha=cfg.alpha,
                        slow_frames=cfg.slow_frames, crop_size=cfg.crop_size, train=True, normalize=True,
                        device=str(device), rank=rank, world_size=world, num_workers=cfg.num_workers,
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


def train(cfg) -> dict:
    rank, world, device = setup_distributed(cfg)
    main_rank = rank == 0
    out = Path(cfg.out)
    if cfg.precision is None:
        cfg.precision = "bf16" if device.type == "cuda" else "fp32"
    if cfg.channels_last is None:
        cfg.channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed + rank)
    if cfg.backend != "synthetic" and not cfg.data:
        raise SystemExit("vthcl.train: --data SHARDS is required (or --backend synthetic)")
    try:
        loader = make_loader(cfg, rank, world, device)
        n = loader.num_videos
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"vthcl.train: error: {e}") from None
    if len(loader) == 0:
        raise SystemExit(f"vthcl.train: error: no batches in {cfg.data}")

    model = VTHCL(cfg.arch, cfg.width, cfg.levels, input=cfg.input).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    bank_cls = ShardedMemoryBank if cfg.shard_banks else MemoryBank
    bank = bank_cls(n, cfg.levels, model.dim, cfg.num_negatives, cfg.temperature, cfg.bank_momentum,
                    cfg.level_weights, torch.bfloat16 if cfg.bank_dtype == "bf16" else torch.float32,
                    cfg.positive, seed=cfg.seed).to(device)
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)  # half cosine to 0
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(ddp) if cfg.compile else ddp
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    step, epoch, nonfinite_total = 0, 0, 0
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"
    sharded = cfg.shard_banks and world > 1  # every rank keeps (and checkpoints) its own bank rows
    if cfg.resume and ckpt_path.exists():
        try:
            ck = ckpt.or_exit("vthcl.train", ckpt.load, ckpt_path, device, trust=cfg.trust_checkpoint)
            own = ckpt.or_exit("vthcl.train", ckpt.load, out / f"bank_rank{rank}.pt", device,
                               trust=cfg.trust_checkpoint) if sharded else ck
        except FileNotFoundError as e:
            raise SystemExit(f"vthcl.train: error: {e}") from None
        if sharded and (own.get("world") != world or own.get("step") != ck["step"]):
            raise SystemExit(f"vthcl.train: error: {out / f'bank_rank{rank}.pt'} holds the bank rows of step "
                             f"{own.get('step')} of a {own.get('world')}-rank run, not of step {ck['step']} on "
                             f"{world} ranks: sharded banks resume on the same number of ranks")
        model.load_state_dict(ck["model"])
        bank.load_state_dict(own["bank"])
        bank.generator.set_state(own["bank_generator"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        step, nonfinite_total = ck["step"], ck.get("nonfinite", 0)
        loader.load_state_dict(ck["loader"])
        epoch = ck["loader"]["epoch"]
        ckpt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
    elif cfg.resume and main_rank:
        print(f"vthcl.train: no checkpoint in {out}, starting afresh", file=sys.stderr)
    max_steps = min(cfg.max_steps or total_steps, total_steps)

    def checkpoint():
        rngs = [ckpt.rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, ckpt.rng_state())
        banks = {"bank": bank.state_dict(), "bank_generator": bank.generator.get_state()}
        if sharded:  # every rank writes its own rows and negative generator
            ckpt.save({**banks, "rank": rank, "world": world, "step": step}, out / f"bank_rank{rank}.pt")
        if not main_rank:
            return
        ckpt.save({"model": model.state_dict(), **(banks if not sharded else {"bank": None}),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "step": step, "nonfinite": nonfinite_total,
                   "loader": loader.state_dict(), "rng": rngs, "config": vars(cfg), "num_videos": n},
                  ckpt_path)
        ckpt.save(model.slow.state_dict(), out / "slow_encoder.pt")

    writer = None
    if main_rank and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    metrics = open(out / "metrics.jsonl", "a" if cfg.resume else "w") if main_rank else None
    bar = None
    if main_rank and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True)
    if main_rank:
        print(f"vthcl.train: {n} videos, {world} rank(s) x batch {cfg.batch_size // world}, {steps_per_epoch} "
              f"steps/epoch, {max_steps} steps, lr {lr:g}, {cfg.precision}, N={bank.num_negatives}",
              file=sys.stderr)

    consecutive_nonfinite = 0
    last = {}
    model.train()
    while step < max_steps and epoch < cfg.epochs:
        loader.set_epoch(epoch)
        t_prev = time.perf_counter()
        wait_before = loader.stats.wait_s
        for batch in loader:
            wait = loader.stats.wait_s - wait_before
            if cfg.color_jitter:  # independent draws for the two clips, reproducible per step and rank
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
                batch["slow"] = color_jitter(batch["slow"], cfg.color_jitter, gen)
                batch["fast"] = color_jitter(batch["fast"], cfg.color_jitter, gen)
            slow = batch["slow"]
            loss, per_level, finite = train_step(forward, bank, optimizer, scaler, batch, amp_dtype)
            scheduler.step()
            step += 1
            if finite:
                consecutive_nonfinite = 0
            else:
                nonfinite_total += 1
                consecutive_nonfinite += 1
                if consecutive_nonfinite >= cfg.max_nonfinite:
                    raise SystemExit(f"vthcl.train: {consecutive_nonfinite} non-finite losses in a row at step "
                                     f"{step}: stopping (lower --lr, or try --precision fp32)")
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            wait_before = loader.stats.wait_s
            if main_rank and (step % cfg.log_every == 0 or step == max_steps):
                last = {"step": step, "epoch": epoch, "loss": loss.item(),
                        **{f"loss_{name}": float(v) for name, v in zip(model.level_names, per_level.detach())},
                        "lr": optimizer.param_groups[0]["lr"], "clips_per_s": slow.shape[0] * world / dt,
                        "data_wait": min(1.0, wait / dt), "nonfinite": nonfinite_total}
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                if writer:
                    for k, v in last.items():
                        if k not in ("step", "epoch"):
                            writer.add_scalar(f"train/{k}", v, step)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            if step % cfg.ckpt_every == 0 or step >= max_steps:
                checkpoint()
            if step >= max_steps:
                break
        else:
            epoch += 1
            loader.set_epoch(epoch)
            checkpoint()
    if bar:
        bar.close()
    if writer:
        writer.close()
    if metrics:
        metrics.close()
    if dist.is_initialized():
        dist.barrier()
    return last


def main(argv=None) -> int:
    cfg = parse_config(argv)
    train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
