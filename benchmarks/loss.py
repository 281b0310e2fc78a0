"""`loss` suite: the fused multi-level bank loss + backward + update against
two un-fused versions of the same math, at the paper's sizes.

* ``fused``: vthcl.memory.MemoryBank — one gather, one batched matmul over
  levels x directions, one scatter update.
* ``naive``: a Python loop over levels and directions; per pair its own
  gathers, matmul, cross entropy and bank update.
* ``cmc_style``: the CMC/lemniscate NCEAverage pattern — per sample, the
  positive and the N negatives gathered as a B x (N+1) x d tensor per level
  and direction, then ``bmm``.

All three use the same negatives, so their losses must agree; the suite
records the largest difference.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ratio, summarize, write_result
from vthcl.memory import MemoryBank


def naive_step(banks, q, index, neg, T, m):
    total = 0.0
    for k in range(q.shape[0]):
        for p in (0, 1):
            other = banks[k, 1 - p]
            pos = (q[k, p] * other[index]).sum(-1, keepdim=True)
            negs = q[k, p] @ other[neg].t()
            logits = torch.cat([pos, negs], 1) / T
            total = total + F.cross_entropy(logits, torch.zeros(len(index), dtype=torch.long, device=q.device))
    total.backward()
    with torch.no_grad():
        for k in range(q.shape[0]):
            for p in (0, 1):
                rows = banks[k, p, index] * m + q[k, p].detach() * (1 - m)
                banks[k, p, index] = F.normalize(rows, dim=-1)
    return total


def cmc_style_step(banks, q, index, neg, T, m):
    total = 0.0
    B = len(index)
    idx = torch.cat([index[:, None], neg[None, :].expand(B, -1)], 1)  # B x (N+1): positive first
    for k in range(q.shape[0]):
        for p in (0, 1):
            weight = banks[k, 1 - p][idx.reshape(-1)].view(B, -1, q.shape[-1])  # B x (N+1) x d
            logits = torch.bmm(weight, q[k, p].unsqueeze(2)).squeeze(2) / T
            total = total + F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=q.device))
    total.backward()
    with torch.no_grad():
        for k in range(q.shape[0]):
            for p in (0, 1):
                rows = banks[k, p].index_select(0, index).mul_(m).add_(q[k, p].detach(), alpha=1 - m)
                banks[k, p].index_copy_(0, index, F.normalize(rows, dim=-1))
    return total


def fused_step(bank: MemoryBank, q, index, neg):
    loss, _ = bank.loss(q, index, neg)
    loss.backward()
    bank.update(q.detach(), index)
    return loss


def run(out: Path, quick: bool, device: str = "cpu", num_videos: int | None = None) -> Path:
    dev = torch.device(device)
    n = num_videos or (20000 if quick else 240000)
    B, N, d, L = 256, 16384, 128, 3
    repeats = 3 if quick else 10
    torch.manual_seed(0)
    bank = MemoryBank(n, L, d, N, seed=0).to(dev)
    start = bank.banks.clone()
    q0 = F.normalize(torch.randn(L, 2, B, d, device=dev), dim=-1)
    index = torch.randperm(n, device=dev)[:B]
    neg = bank.sample_negatives()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def measure(step):
        times, loss = [], None
        for r in range(repeats + 1):  # the first call warms up
            bank.banks.copy_(start)
            q = q0.clone().requires_grad_(True)
            sync()
            t = time.perf_counter()
            loss = step(q)
            sync()
            if r:
                times.append(1.0 / (time.perf_counter() - t))
        return summarize(times), float(loss.detach())

    configs = {
        "fused": lambda q: fused_step(bank, q, index, neg),
        "naive": lambda q: naive_step(bank.banks, q, index, neg, bank.temperature, bank.momentum),
        "cmc_style": lambda q: cmc_style_step(bank.banks, q, index, neg, bank.temperature, bank.momentum),
    }
    results, losses, banks_after = {}, {}, {}
    for name, step in configs.items():
        results[name], losses[name] = measure(step)
        banks_after[name] = bank.banks.clone()
    ratios = {"fused_over_naive": ratio(results, "fused", "naive"),
              "fused_over_cmc_style": ratio(results, "fused", "cmc_style"),
              "max_loss_difference": max(abs(losses["fused"] - v) for v in losses.values()),
              "max_bank_difference": max(float((banks_after["fused"] - b).abs().max()) for b in banks_after.values())}
    settings = {"num_videos": n, "batch": B, "negatives": N, "dim": d, "levels": L, "device": device,
                "repeats": repeats, "threads": torch.get_num_threads(), "losses": losses,
                "goals": {"fused_over_naive": {"cpu": 1.0, "cuda": 2.0}, "fused_over_cmc_style": {"cpu": 3.0}}}
    return write_result(out, "loss", settings, results, ratios, "steps/s (loss + backward + bank update)")
