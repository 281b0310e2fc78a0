"""`step` suite: train-step clips/s on synthetic input (R18/R50, fp32 vs bf16,
channels_last_3d on/off, torch.compile on/off), and AVA detection's step
(vthcl.eval detect: the dilated slow encoder and the RoI head, 8 frames, 4
boxes a clip); the data costs nothing here.

On a GPU at the paper's settings (crop 224, 8+16 frames, N=16384, 240k-video
banks); on a CPU a small configuration (the ratios, not the absolute figures,
are what carry over).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import failure, progress, ratio, summarize, write_result
from loaders import build_loader
from vthcl.memory import MemoryBank
from vthcl.model import VTHCL
from vthcl.train import train_step

AMP = {"fp32": None, "fp32_strict": None, "bf16": torch.bfloat16}


class Trainer:
    """A model, bank and optimizer as vthcl.train builds them, and its step."""

    def __init__(self, arch: str, width: int, precision: str, channels_last: bool, compile: bool, device: str,
                 num_videos: int, num_negatives: int = 16384):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as vthcl.train: fixed shapes, cuDNN picks its fastest kernels
        model = VTHCL(arch, width).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        self.bank = MemoryBank(num_videos, 3, 128, min(num_negatives, num_videos - 1)).to(self.device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.forward = torch.compile(model) if compile else model
        self.amp = AMP[precision]
        self.strict = precision == "fp32_strict"
        self.channels_last = channels_last

    def __call__(self, batch: dict) -> None:
        if self.channels_last:
            batch = dict(batch, slow=batch["slow"].contiguous(memory_format=torch.channels_last_3d),
                         fast=batch["fast"].contiguous(memory_format=torch.channels_last_3d))
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = not self.strict  # fp32 (PyTorch's default) runs cuDNN convolutions as TF32
        try:
            train_step(self.forward, self.bank, self.optimizer, self.scaler, batch, self.amp)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class DetectionTrainer:
    """vthcl.eval detect's model and step (the slow encoder with res5 dilated, the RoI head, BCE) on the
    slow clip of a synthetic batch with ``boxes`` boxes per clip."""

    def __init__(self, arch: str, width: int, precision: str, device: str, boxes: int = 4, classes: int = 80):
        from vthcl.detection import Detector
        from vthcl.model import Pathway
        self.device = torch.device(device)
        self.model = Detector(Pathway(arch, width, slow=True, res5_dilation=2), classes).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-7)
        self.amp, self.boxes, self.classes = AMP[precision], boxes, classes

    def __call__(self, batch: dict) -> None:
        from vthcl.detection import pixel_boxes
        clips = batch["slow"]
        b, h, w = clips.shape[0], clips.shape[-2], clips.shape[-1]
        g = torch.Generator().manual_seed(0)
        corner = torch.rand(b * self.boxes, 2, generator=g) * 0.5
        boxes = torch.cat([corner, corner + 0.3 + 0.2 * torch.rand(b * self.boxes, 2, generator=g)], 1).clamp(0, 1)
        index = torch.arange(b).repeat_interleave(self.boxes)
        rois = pixel_boxes(boxes, index, torch.tensor([[h, w]] * b)).to(self.device)
        labels = (torch.rand(len(rois), self.classes, generator=g) < 0.05).float().to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(clips, rois)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def measure_steps(trainer: Trainer, batches, warmup: int, steps: int, max_seconds: float = float("inf")) -> float:
    """clips/s over ``steps`` steps after ``warmup``; a slow configuration stops
    after the step that passes ``max_seconds`` (at least one step) and is rated on those."""
    it = iter(batches)
    for _ in range(warmup):
        trainer(next(it))
    trainer.sync()
    t, clips = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        trainer(batch)
        clips += batch["fast"].shape[0]
        if time.perf_counter() - t > max_seconds:
            break
    trainer.sync()
    return clips / (time.perf_counter() - t)


def endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run(out: Path, quick: bool, device: str = "cpu") -> Path:
    gpu = device == "cuda"
    crop, batch = (224, 32) if gpu else (64, 4)
    width = 64 if gpu else 16
    n = 240000 if gpu else 4096
    warmup, steps, repeats = (3, 15, 3) if gpu else (1, 3, 2)
    max_seconds = 20.0 if gpu else float("inf")  # per measurement: a slow configuration cannot stall the run
    if quick:
        steps, repeats = max(2, steps // 4), 1
    archs = ["r18", "r50"]
    variants = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False)]
    notes = []
    if gpu:
        notes.append("torch.compile measured on R18 only (compiling R50 takes minutes of a scarce GPU lease); "
                     "fp32 convolutions run as TF32 (PyTorch's cuDNN default); fp32_strict turns TF32 off (R50)")
    else:
        notes.append("CPU: a small configuration (width 16, crop 64, batch 4); torch.compile is measured on GPU only")
    settings = {"device": device, "crop": crop, "batch_per_gpu": batch, "width": width, "num_videos": n,
                "negatives": 16384, "warmup": warmup, "steps": steps, "repeats": repeats,
                "goals": {"bf16_cl3d_over_fp32": {"cuda": 2.0}}}

    def report(results: dict, complete: bool) -> Path:
        """The JSON of what is measured so far (after every configuration: a run cut short by a GPU
        lease's time limit keeps its figures); the plot once complete."""
        ratios = {f"{a}_bf16_cl3d_over_fp32": ratio(results, f"{a}_bf16_cl3d", f"{a}_fp32") for a in archs}
        ratios["bf16_cl3d_over_fp32"] = ratios["r50_bf16_cl3d_over_fp32"]
        if gpu:  # against fp32 without TF32: the bf16 gain a user sees who had turned TF32 off
            ratios["r50_bf16_cl3d_over_fp32_strict"] = ratio(results, "r50_bf16_cl3d", "r50_fp32_strict")
        return write_result(out, "step", dict(settings, complete=complete), results, ratios,
                            "clips/s (train step)", notes, plot_png=complete)

    results = {}

    def run(name: str, make_trainer, alpha: int = 2) -> None:
        """``results[name]``: the steps of the trainer ``make_trainer()`` makes, on synthetic clips."""
        try:
            trainer = make_trainer()
            data = endless(build_loader(None, backend="synthetic", num_videos=n, batch_size=batch, crop_size=crop,
                                        device=device, alpha=alpha))
            results[name] = summarize([measure_steps(trainer, data, warmup, steps, max_seconds)
                                       for _ in range(repeats)])
            progress(f"{name}: {results[name]['median']:.4g} clips/s")
        except Exception as e:
            results[name] = failure(e)
        report(results, False)

    for arch in archs:
        # torch.compile on GPU for R18 only: compiling R50's two pathways and their backward costs minutes
        extra = ([("bf16", True, True)] if arch == "r18" else [("fp32_strict", False, False)]) if gpu else []
        for precision, cl, comp in variants + extra:
            run(f"{arch}_{precision}" + ("_cl3d" if cl else "") + ("_compile" if comp else ""),
                lambda: Trainer(arch, width, precision, cl, comp, device, n))
    for arch in archs:  # AVA detection's step (vthcl.eval detect), 8 frames, the slow clip alone
        for precision in ("fp32", "bf16") if gpu else ("fp32",):
            run(f"{arch}_detect_{precision}", lambda: DetectionTrainer(arch, width, precision, device), alpha=1)
    return report(results, True)
