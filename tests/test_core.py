"""The method: encoders, heads, fused bank loss vs a plain reference, DDP, ICM, vthcl.train."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import torchrun
from vthcl.icm import actor_auc, icm
from vthcl.memory import MemoryBank, ShardedMemoryBank
from vthcl.model import VTHCL


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("arch,expansion", [("r18", 1), ("r50", 4)])
def test_pathways_shapes_and_levels(arch, expansion):
    model = VTHCL(arch, width=8, levels=3)
    slow, fast = torch.randn(2, 3, 8, 64, 64), torch.randn(2, 3, 16, 64, 64)
    sm, fm = model.maps(slow, fast)
    for i, lvl in enumerate(("res3", "res4", "res5")):
        assert sm[lvl].shape == (2, 8 * 2 ** (i + 1) * expansion, 8, 8 // 2 ** i, 8 // 2 ** i)
        assert fm[lvl].shape == (2, 1 * 2 ** (i + 1) * expansion, 16, 8 // 2 ** i, 8 // 2 ** i)  # β = 1/8
    q = model(slow, fast)
    assert q.shape == (3, 2, 2, 128)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3, 2, 2), atol=1e-5)
    # temporal kernels: slow res2/res3 are 1 (no temporal mixing), res4/res5 3; fast 3 everywhere
    conv_a = {name: m.kernel_size[0] for name, m in model.slow.named_modules() if name.endswith(".a")}
    assert {k for n, k in conv_a.items() if n.startswith(("res2", "res3"))} == {1}
    assert {k for n, k in conv_a.items() if n.startswith(("res4", "res5"))} == {3}
    assert {m.kernel_size[0] for n, m in model.fast.named_modules() if n.endswith(".a")} == {3}
    assert VTHCL(arch, 8, levels=1).level_names == ("res5",)


def test_residual_input_removes_a_static_background():
    from vthcl.model import temporal_residual
    x = torch.randn(2, 3, 1, 8, 8).expand(2, 3, 4, 8, 8).clone()
    assert torch.equal(temporal_residual(x), torch.zeros_like(x))
    x[:, :, 2] += 1
    r = temporal_residual(x)
    assert r.shape == x.shape and torch.allclose(r[:, :, 2], torch.ones(2, 3, 8, 8))
    model = VTHCL("r18", width=8, input="residual")
    assert model.slow.residual and model.fast.residual
    assert model(torch.randn(1, 3, 8, 32, 32), torch.randn(1, 3, 16, 32, 32)).shape == (3, 2, 1, 128)


def test_head_dense_equals_pooled_head_on_constant_maps():
    model = VTHCL("r18", width=8)
    head = model.heads["slow_res5"]
    x = torch.randn(2, 64)
    fmap = x[:, :, None, None, None].expand(2, 64, 2, 3, 3)
    assert torch.allclose(F.normalize(head.dense(fmap), dim=1)[:, :, 1, 2, 0], head(x), atol=1e-5)


def test_icm_is_the_dense_head_against_the_other_clips_embedding():
    torch.manual_seed(0)
    model = VTHCL("r18", width=8).eval()
    slow, fast = torch.randn(1, 3, 8, 64, 64), torch.randn(1, 3, 16, 64, 64)
    maps = icm(model, slow, fast)
    assert set(maps) == {"res3", "res4", "res5"}
    assert maps["res5"]["slow"].shape == (1, 8, 2, 2) and maps["res5"]["fast"].shape == (1, 16, 2, 2)
    with torch.no_grad():
        sm, fm = model.maps(slow, fast)
        z = model(slow, fast)                                       # [levels, (slow, fast), B, d]
        dense = model.heads["fast_res4"].dense(fm["res4"])[0, :, 3, 1, 2]
    assert torch.allclose(maps["res4"]["fast"][0, 3, 1, 2], dense @ z[1, 0, 0], atol=1e-5)
    assert abs(float(dense.norm()) - 1) > 1e-3  # not cosines: the per-position magnitude is kept


def test_actor_auc():
    mask = torch.zeros(4, 16, 16)
    mask[:, 4:8, 8:12] = 1
    heat = F.avg_pool3d(mask[None, None], (1, 4, 4))[0, 0]         # the actor's cell hottest, on a 4x4 grid
    assert actor_auc(heat, mask) == 1.0 and actor_auc(-heat, mask) == 0.0
    assert actor_auc(torch.zeros(4, 4, 4), mask) == 0.5             # ties count half
    assert np.isnan(actor_auc(heat, torch.zeros(4, 16, 16)))        # no actor
    # in general: the pixel-level AUC of the map replicated over its cells
    torch.manual_seed(0)
    heat, mask = torch.randn(2, 4, 4), (torch.rand(4, 16, 16) < 0.3).float()
    pixels = heat.repeat_interleave(2, 0).repeat_interleave(4, 1).repeat_interleave(4, 2).flatten()
    pos, neg = pixels[mask.flatten() > 0], pixels[mask.flatten() == 0]
    expected = float(((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean())
    assert actor_auc(heat, mask) == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------- loss
def reference_loss(banks, q, index, negatives, T, weights):
    """The plain formula: loops over levels and directions, separate gathers."""
    total, per_level = 0.0, []
    for k in range(q.shape[0]):
        level = 0.0
        for p in (0, 1):  # query pathway p against the other pathway's bank
            other = banks[k, 1 - p]
            pos = (q[k, p] * other[index]).sum(-1, keepdim=True)
            neg = q[k, p] @ other[negatives].t()
            logits = torch.cat([pos, neg], 1) / T
            level = level + F.cross_entropy(logits, torch.zeros(len(index), dtype=torch.long))
        per_level.append(level)
        total = total + weights[k] * level
    return total, torch.stack(per_level)


def reference_update(banks, q, index, m):
    banks = banks.clone()
    for k in range(q.shape[0]):
        for p in (0, 1):
            for j, i in enumerate(index.tolist()):
                banks[k, p, i] = F.normalize(m * banks[k, p, i] + (1 - m) * q[k, p, j], dim=0)
    return banks


@pytest.mark.parametrize("levels,weights", [(3, None), (2, [0.5, 2.0]), (1, None)])
def test_fused_loss_equals_reference(levels, weights):
    torch.manual_seed(0)
    bank = MemoryBank(50, levels=levels, dim=16, num_negatives=20, level_weights=weights, seed=3)
    q = F.normalize(torch.randn(levels, 2, 6, 16), dim=-1).requires_grad_(True)
    index = torch.tensor([3, 7, 11, 0, 49, 20])
    neg = bank.sample_negatives()
    loss, per_level = bank.loss(q, index, neg)
    loss.backward()
    grad = q.grad.clone()
    q.grad = None
    start = bank.banks.clone()
    ref, ref_levels = reference_loss(start, q, index, neg, 0.07, weights or [1.0] * levels)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-5) and torch.allclose(per_level, ref_levels, atol=1e-5)
    assert torch.allclose(grad, q.grad, atol=1e-6)
    bank.update(q.detach(), index)
    assert torch.allclose(bank.banks, reference_update(start, q.detach(), index, 0.5), atol=1e-6)
    assert torch.allclose(bank.banks.norm(dim=-1), torch.ones(levels, 2, 50), atol=1e-5)


def test_bank_basics():
    with pytest.warns(UserWarning, match="using 9"):
        bank = MemoryBank(10, num_negatives=16384)
    assert bank.num_negatives == 9
    assert torch.allclose(bank.banks.norm(dim=-1), torch.ones(3, 2, 10), atol=1e-5)
    bf = MemoryBank(10, num_negatives=4, dtype=torch.bfloat16)
    q = F.normalize(torch.randn(3, 2, 2, 128), dim=-1)
    loss, _ = bf.loss(q, torch.tensor([1, 2]))
    assert torch.isfinite(loss) and bf.banks.dtype == torch.bfloat16
    bf.update(q, torch.tensor([1, 2]))
    # positive from the current batch: the other pathway's feature
    batch = MemoryBank(10, num_negatives=4, positive="batch")
    neg = batch.sample_negatives()
    loss, _ = batch.loss(q, torch.tensor([1, 2]), neg)
    pos = (q * q.flip(1)).sum(-1, keepdim=True)
    negl = q @ batch.banks.flip(1)[:, :, neg].transpose(-1, -2)
    logits = torch.cat([pos, negl], -1) / 0.07
    assert torch.allclose(loss, (torch.logsumexp(logits, -1) - logits[..., 0]).mean(-1).sum(), atol=1e-5)


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, init, result_path, sharded):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(100 + rank)
    cls = ShardedMemoryBank if sharded else MemoryBank
    bank = cls(40, levels=2, dim=8, num_negatives=12, seed=5)
    out = {"losses": [], "index": [], "q": []}
    for step in range(3):
        B = 4 if rank == 0 else 3  # unequal batches (a last partial batch)
        q = F.normalize(torch.randn(2, 2, B, 8), dim=-1)
        index = torch.randint(0, 40, (B,))
        if sharded:
            neg = bank.sample_negatives()
            loss, _ = bank.loss(q, index, neg)
            all_neg = [torch.empty_like(neg) for _ in range(world)]
            dist.all_gather(all_neg, neg)
            out["losses"].append((float(loss), torch.cat(all_neg)))
        bank.update(q, index)
        out["q"].append(q)
        out["index"].append(index)
    out["banks"] = bank.banks
    out["rows"] = (getattr(bank, "lo", 0), getattr(bank, "hi", 40))
    torch.save(out, f"{result_path}.{rank}")
    dist.destroy_process_group()


def _run_ddp(sharded: bool, tmp_path, world: int = 2):
    init = f"file://{tmp_path}/init_{int(sharded)}"
    mp.spawn(_ddp_worker, args=(world, init, str(tmp_path / "r"), sharded), nprocs=world, join=True)
    return [torch.load(f"{tmp_path}/r.{r}") for r in range(world)]


def test_ddp_banks_identical_on_every_rank(tmp_path):
    r0, r1 = _run_ddp(False, tmp_path)
    assert torch.equal(r0["banks"], r1["banks"])
    # and equal to one process updating with the concatenated global batches
    single = MemoryBank(40, levels=2, dim=8, num_negatives=12, seed=5)
    for s in range(3):
        single.update(torch.cat([r0["q"][s], r1["q"][s]], 2), torch.cat([r0["index"][s], r1["index"][s]]))
    assert torch.allclose(single.banks, r0["banks"], atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_banks_hold_their_rows_and_match_the_full_bank(tmp_path, world):
    ranks = _run_ddp(True, tmp_path, world)
    assert [r["rows"] for r in ranks] == [(40 * k // world, 40 * (k + 1) // world) for k in range(world)]
    assert ranks[0]["banks"].shape[2] == 40 // world
    full = MemoryBank(40, levels=2, dim=8, num_negatives=12, seed=5)
    for s in range(3):
        for r in ranks:  # the loss each rank computed, against the full bank with all ranks' negatives
            loss, negs = r["losses"][s]
            ref, _ = reference_loss(full.banks, r["q"][s], r["index"][s], negs, 0.07, [1.0, 1.0])
            assert abs(loss - float(ref)) < 1e-4
        full.update(torch.cat([r["q"][s] for r in ranks], 2), torch.cat([r["index"][s] for r in ranks]))
    assert torch.allclose(torch.cat([r["banks"] for r in ranks], 2), full.banks, atol=1e-6)


# ----------------------------------------------------------------------------- vthcl.train
TRAIN = dict(backend="pyav", batch_size=2, crop_size=32, width=8, epochs=2, num_negatives=3, quiet=True, workers=0,
             seed=1, tensorboard=False)


def _train(out, **options):
    from vthcl.train import train
    train(out=out, **{**TRAIN, **options})
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("backend,shards", [("pyav", "h264_shards"),
                                            pytest.param("ffcv", "real_beton", marks=pytest.mark.ffcv)])
def test_three_steps_on_real_video_shards_and_exact_resume(backend, shards, request, tmp_path):
    data = request.getfixturevalue(shards)
    train = dict(data=data, backend=backend, workers=0 if backend == "pyav" else 1)
    straight = _train(tmp_path / "a", **train, max_steps=6)
    first = _train(tmp_path / "b", **train, max_steps=3)
    assert [m["step"] for m in first] == [1, 2, 3]
    for m in first:
        assert {"step", "epoch", "loss", "loss_res3", "loss_res4", "loss_res5", "lr", "clips_per_s",
                "data_wait"} <= set(m)
        assert m["loss"] == pytest.approx(m["loss_res3"] + m["loss_res4"] + m["loss_res5"], rel=1e-5)
    resumed = _train(tmp_path / "b", **train, max_steps=6, resume=True)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed[3:]] == [m["loss"] for m in straight[3:]]
    assert [m["epoch"] for m in straight] == [0, 0, 0, 1, 1, 1]  # 5 videos, batch 2: 3 steps an epoch
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert ck["step"] == 6 and ck["bank"]["banks"].shape == (3, 2, 5, 128)
    slow = torch.load(tmp_path / "b" / "slow_encoder.pt")
    from vthcl.model import Pathway
    Pathway("r18", 8).load_state_dict(slow)


def test_color_jitter_per_clip_and_reproducible():
    from loaders import MEAN, STD
    from vthcl.train import color_jitter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 8, 8, generator=g)
    same = color_jitter(x, 0.0, torch.Generator().manual_seed(1), p_gray=0.0)
    assert torch.allclose(same, x.clamp((0 - MEAN[0]) / STD[0], (255 - MEAN[0]) / STD[0]), atol=1e-4)
    a = color_jitter(x, 0.4, torch.Generator().manual_seed(1), p_gray=0.5)
    b = color_jitter(x, 0.4, torch.Generator().manual_seed(1), p_gray=0.5)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    pix = a * STD[0] + MEAN[0]
    is_gray = [bool(torch.allclose(pix[i, 0], pix[i, 1], atol=1e-3)) for i in range(6)]
    assert 0 < sum(is_gray) < 6  # some clips turned grayscale, not all
    shift = (a - x).mean(dim=(1, 2, 3, 4))  # one draw per clip, different across clips
    assert float(shift.std()) > 0.05


def test_lr_schedule_and_config_file(tmp_path):
    from vthcl.train import train
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backend: synthetic\nnum_videos: 16\nbatch_size: 4\ncrop_size: 16\nwidth: 8\nepochs: 1\n"
                   "num_negatives: 5\nlevels: 2\ntensorboard: false\nquiet: true\n")
    train(config=cfg, out=tmp_path / "o")
    metrics = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert len(metrics) == 4 and set(metrics[0]) >= {"loss_res4", "loss_res5"} and "loss_res3" not in metrics[0]
    lrs = [m["lr"] for m in metrics]
    base = 0.03 * 4 / 256
    assert lrs == pytest.approx([base * 0.5 * (1 + torch.cos(torch.tensor(3.14159265 * s / 4)).item())
                                 for s in range(1, 5)], rel=1e-4)


def test_nonfinite_losses_stop_with_a_message(tmp_path):
    from vthcl.options import JobError
    from vthcl.train import train
    with pytest.raises(JobError, match="non-finite"):
        train(out=tmp_path, backend="synthetic", num_videos=8, batch_size=4, crop_size=16, width=8,
              temperature=1e-45, max_nonfinite=2, quiet=True, tensorboard=False, num_negatives=3)


def test_missing_or_empty_dataset_is_a_clear_error(tmp_path):
    from vthcl.options import UsageError
    from vthcl.train import train
    with pytest.raises(UsageError, match="nothing"):
        train(out=tmp_path / "o", data=tmp_path / "nothing", quiet=True)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"shards": [], "total_samples": 0}))
    with pytest.raises(UsageError, match="no samples"):
        train(out=tmp_path / "o", data=tmp_path / "m" / "manifest.json", quiet=True)


def _torchrun(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """vthcl.train under torchrun: 2 CPU processes, gloo; its stderr and metrics."""
    r = torchrun("-m", "vthcl.train", "--backend", "synthetic", "--num-videos", "12", "--batch-size", "4",
                 "--crop-size", "16", "--width", "8", "--num-negatives", "5", "--no-tensorboard", "--device", "cpu",
                 "--out", str(out), *args, timeout=180)
    return r, [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_torchrun_two_ranks_gloo(tmp_path):
    """The same command under torchrun: 2 CPU processes, gloo, global batch split."""
    r, metrics = _torchrun(tmp_path, "--max-steps", "3")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "2 rank(s) x batch 2" in r.stderr


def test_sharded_banks_resume_exactly_on_two_ranks(tmp_path):
    """--shard-banks: each rank checkpoints its own bank rows and negative
    generator (bank_rank{r}.pt) and resumes from them: stopped after 3 steps
    and resumed to 6, the losses of steps 4-6 are those of a run straight to 6
    (rank 0's loss scores the negatives both ranks drew)."""
    _, straight = _torchrun(tmp_path / "a", "--shard-banks", "--max-steps", "6", "--epochs", "4")
    _torchrun(tmp_path / "b", "--shard-banks", "--max-steps", "3", "--epochs", "4")
    ranks = [torch.load(tmp_path / "b" / f"bank_rank{r}.pt", weights_only=True) for r in range(2)]
    assert [(k["rank"], k["world"], k["step"]) for k in ranks] == [(0, 2, 3), (1, 2, 3)]
    assert not torch.equal(ranks[0]["bank"]["banks"], ranks[1]["bank"]["banks"])  # each its own rows
    _, resumed = _torchrun(tmp_path / "b", "--shard-banks", "--max-steps", "6", "--epochs", "4", "--resume")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed[3:]] == [m["loss"] for m in straight[3:]]


class _Payload:
    """Unpickling this runs a shell command (here: it touches a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_carries_code_is_refused_and_never_runs(h264_shards, tmp_path, caplog):
    """vthcl.train --resume, vthcl.eval and vthcl.icm_maps load checkpoints as
    tensors and plain values only: a last.pt with a pickled payload is
    refused with an error naming the file, and its code never runs; each CLI
    says so as its usage error (exit 2)."""
    from vthcl import eval as veval
    from vthcl import icm_maps
    from vthcl.checkpoint import CheckpointRefused
    from vthcl.train import main as train_main
    from vthcl.train import train
    out = tmp_path / "run"
    _train(out, data=h264_shards, max_steps=1)
    ck = torch.load(out / "last.pt", weights_only=True)  # our own checkpoint needs nothing more
    marker = tmp_path / "payload_ran"
    ck["extra"] = _Payload(marker)
    torch.save(ck, out / "last.pt")
    runs = {
        "vthcl.train": lambda: train(out=out, data=h264_shards, **TRAIN, max_steps=2, resume=True),
        "vthcl.eval": lambda: veval.run(mode="knn", checkpoint=out / "last.pt", train=h264_shards, val=h264_shards,
                                        out=tmp_path / "e"),
        "vthcl.icm_maps": lambda: icm_maps.run(checkpoint=out / "last.pt", score=1, out=tmp_path / "i"),
    }
    for name, run in runs.items():
        with pytest.raises(CheckpointRefused, match=r".*last\.pt: refused.*posix\.system.*--trust-checkpoint"):
            run()
        assert not marker.exists(), f"{name} ran the payload"
    caplog.clear()
    argv = ["--out", str(out), "--data", str(h264_shards), "--resume", "--quiet", "--workers", "0"]
    assert train_main(argv) == 2
    assert not marker.exists()
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert re.match(r".*last\.pt: refused.*posix\.system.*--trust-checkpoint", message)


def test_checkpoints_written_before_are_loaded_only_when_trusted(h264_shards, tmp_path):
    """A last.pt that holds NumPy's RNG state as NumPy objects (as vthcl.train
    once wrote it) is refused, and with trust_checkpoint resumes exactly."""
    import numpy as np

    from vthcl.checkpoint import CheckpointRefused
    from vthcl.train import train
    straight = _train(tmp_path / "a", data=h264_shards, max_steps=4)
    _train(tmp_path / "b", data=h264_shards, max_steps=2)
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for state in ck["rng"]:  # the old layout: np.random.get_state()'s tuple
        n = state["numpy"]
        state["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                          n["cached_gaussian"])
    torch.save(ck, tmp_path / "b" / "last.pt")
    with pytest.raises(CheckpointRefused, match="refused.*numpy"):
        train(out=tmp_path / "b", data=h264_shards, **{**TRAIN, "max_steps": 4, "resume": True})
    with pytest.warns(RuntimeWarning, match="unpickled in full"):
        resumed = _train(tmp_path / "b", data=h264_shards, max_steps=4, resume=True, trust_checkpoint=True)
    assert [m["loss"] for m in resumed[2:]] == [m["loss"] for m in straight[2:]]
