"""What only a GPU can show: DALI's "mixed" (NVDEC) decoder on H.264 shards
behind the same contract, and the bf16 train step fed by it.

Skipped where there is no CUDA device or no DALI (CI has neither); run on a
GPU machine with ``python -m pytest -m gpu``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from loaders import build_loader
from loaders.sampling import ClipSpec
from tests.test_core import _train
from tests.test_loaders import KEYS, check_exact, check_long_windows, corrupt_copy, long_numbers

pytest.importorskip("nvidia.dali")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (DALI mixed decode)")]


def gpu_batches(shards, **kw):
    opts = dict(backend="dali", batch_size=2, device="cuda", crop_size=48, normalize=False, num_workers=2)
    opts.update(kw)
    loader = build_loader(str(shards), **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = []
        for b in loader:
            assert all(v.device.type == "cuda" for v in b.values())
            out.append({k: v.cpu() for k, v in b.items()})
    return loader, out


@pytest.mark.parametrize("train", [True, False])
def test_mixed_decode_exact_sampling_on_h264(coded_h264_lossy, train):
    """NVDEC has no lossless (High 4:4:4) H.264 profile: these coded shards are crf 10."""
    loader, out = gpu_batches(coded_h264_lossy, train=train)
    assert len(out) == len(loader) == 2
    assert check_exact(out, ClipSpec(), train) == 3
    assert sorted(i for b in out for i in b["index"].tolist()) == [0, 1, 2]


def test_mixed_decode_agrees_with_pyav_on_real_h264(h264_shards):
    got = {}
    for backend, device, workers in (("pyav", "cpu", 0), ("dali", "cuda", 2)):
        loader = build_loader(str(h264_shards), backend=backend, batch_size=8, device=device, crop_size=64,
                              normalize=False, num_workers=workers, train=False)
        got[backend] = {int(i): (b["frame_ids"][k].cpu(), b["fast"][k].cpu())
                        for b in loader for k, i in enumerate(b["index"])}
    assert sorted(got["pyav"]) == sorted(got["dali"]) == [0, 1, 2, 3, 4]
    for idx, (ids_a, clip_a) in got["pyav"].items():
        ids_b, clip_b = got["dali"][idx]
        assert torch.equal(ids_a, ids_b)
        diff = float((clip_a - clip_b).abs().mean())
        print(f"video {idx}: mean abs difference pyav vs dali mixed {diff:.2f} levels")
        assert diff < 4.0, (idx, diff)  # NVDEC's YUV->RGB vs libswscale's, and the resize filters


def test_mixed_decode_contract_channels_last_and_views(h264_shards):
    _, out = gpu_batches(h264_shards, batch_size=4, normalize=True, channels_last=True)
    assert sum(x["fast"].shape[0] for x in out) == 5
    for x in out:  # (.cpu() keeps the memory format)
        assert set(x) == KEYS and x["fast"].is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.equal(x["slow"], x["fast"][:, :, ::2])
        assert -3 < float(x["fast"].mean()) < 3  # normalised
    _, views = gpu_batches(h264_shards, train=False, batch_size=5, num_clips=10, num_crops=1)
    assert sum(x["fast"].shape[0] for x in views) == 50
    assert all(set(x) == KEYS | {"view"} for x in views)


def test_corrupt_h264_member_is_reported_and_skipped(h264_shards, tmp_path):
    victim = corrupt_copy(h264_shards, tmp_path / "shards", "mp4")
    loader = build_loader(str(tmp_path / "shards"), backend="dali", batch_size=2, device="cuda", crop_size=32,
                          num_workers=2, train=False)
    with pytest.warns(RuntimeWarning, match="skipped"):
        out = list(loader)
    assert len(out) == len(loader) == 3
    assert len({i for b in out for i in b["index"].tolist()}) == 4
    assert loader.stats.skipped == 1 and victim in loader.stats.skip_reasons[0]["key"]


def test_mixed_decode_of_windows_cut_from_long_h264(long_h264):
    """The window-cut graph on NVDEC: training windows over several epochs
    (many far from frame 0), centre windows and 5 views of 610- and
    700-frame videos and a looped 40-frame one, each frame the one its id
    names; the same frames as the whole-member decode; both view cuts."""
    seen = {}
    for epoch in range(3):
        loader, out = gpu_batches(long_h264, batch_size=3, seed=epoch)
        assert loader.window_cut
        for idx, s in check_long_windows(out, long_h264, train=True).items():
            seen.setdefault(idx, set()).update(s)
    assert max(max(s) for s in seen.values()) > 300
    got = {}
    for cut in (True, False):
        _, out = gpu_batches(long_h264, train=False, batch_size=5, num_clips=5, window_cut=cut)
        check_long_windows(out, long_h264, train=False, num_clips=5)
        got[cut] = {(b["index"][i].item(), b["view"][i].item()): b["fast"][i] for b in out
                    for i in range(b["fast"].shape[0])}
    assert got[True].keys() == got[False].keys()
    for k, clip in got[True].items():
        assert long_numbers(clip) == long_numbers(got[False][k])
        assert float((clip - got[False][k]).abs().mean()) < 0.5, k
    _, out = gpu_batches(long_h264, train=False, batch_size=4, num_clips=4, view_cut="cover")
    check_long_windows(out, long_h264, train=False, num_clips=4)


def test_bf16_train_steps_on_dali(h264_shards, tmp_path):
    first = _train(tmp_path / "a", data=h264_shards, backend="dali", device="cuda", workers=2, precision="bf16",
                   channels_last=True, max_steps=4)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in first)
    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=True, map_location="cpu")
    assert ck["step"] == 4 and ck["bank"]["banks"].shape == (3, 2, 5, 128)
