"""The loader contract, for every backend that runs on a CPU."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders import build_loader
from loaders.batching import Normalizer
from loaders.ranks import rank_indices
from loaders.sampling import ClipSpec
from shard_tools.reindex import reindex
from shard_tools.wds_index import write_index
from tests import media

KEYS = {"slow", "fast", "label", "index", "frame_ids"}
pytest.importorskip("nvidia.dali")


def batches(shards, backend, **kw):
    opts = dict(backend=backend, batch_size=2, device="cpu", crop_size=48, normalize=False, num_workers=0)
    if backend in ("dali", "ffcv"):
        opts["num_workers"] = 1
    opts.update(kw)
    loader = build_loader(str(shards), **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = list(loader)
    return loader, out


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """[3, T, H, W] 0..255 -> the number coded in each frame."""
    return [media.read_frame_number(clip[:, t].numpy()) for t in range(clip.shape[1])]


NUM_FRAMES = {"coded_150": 150, "coded_90": 90, "coded_40": 40}


def check_exact(out, spec: ClipSpec, train: bool):
    seen = 0
    for b in out:
        assert set(b) == KEYS
        B = b["fast"].shape[0]
        assert b["fast"].shape[1:3] == (3, spec.fast_frames) and b["slow"].shape[1:3] == (3, spec.slow_frames)
        assert b["fast"].dtype == torch.float32 and b["index"].dtype == b["label"].dtype == torch.int64
        assert b["frame_ids"].shape == (B, spec.fast_frames) and b["frame_ids"].dtype == torch.int64
        assert torch.equal(b["slow"], b["fast"][:, :, :: spec.alpha])
        assert 0 <= float(b["fast"].min()) and float(b["fast"].max()) <= 255
        for i in range(B):
            ids = b["frame_ids"][i].tolist()
            n = max(ids) + 1 if ids[0] > 0 or len(set(ids)) == len(ids) else None
            # content matches frame_ids exactly
            assert frame_numbers(b["fast"][i]) == ids
            steps = np.diff(ids)
            if len(set(ids)) == len(ids) and (steps > 0).all():  # no wrap: a long enough video
                assert (steps == spec.stride).all()
                if not train:
                    assert ids[0] in [(nf - spec.window) // 2 for nf in NUM_FRAMES.values()]
            else:  # the 40-frame video is looped: ids wrap modulo 40, from 0
                assert ids[0] == 0 and ids == [(k * spec.stride) % 40 for k in range(spec.fast_frames)], n
            seen += 1
    return seen


FFCV = pytest.mark.ffcv
# every backend on the five real videos (ffcv: their .beton)
EVERY_BACKEND = [("pyav", "h264_shards"), ("dali", "vp9_shards"), ("synthetic", "h264_shards"),
                 pytest.param("ffcv", "real_beton", marks=FFCV)]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend,shards", [("pyav", "coded_h264"), ("pyav", "coded_vp9"), ("dali", "coded_vp9"),
                                            pytest.param("ffcv", "coded_beton", marks=FFCV)])
def test_exact_sampling_on_frame_coded_videos(backend, shards, train, request):
    path = request.getfixturevalue(shards)
    spec = ClipSpec()
    loader, out = batches(path, backend, train=train)
    assert len(out) == len(loader) == 2
    assert check_exact(out, spec, train) == 3
    assert sorted(i for b in out for i in b["index"].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("alpha,tau,slow", [(1, 8, 4), (4, 8, 4), (2, 4, 6)])
def test_other_tempos(coded_h264, alpha, tau, slow):
    spec = ClipSpec(tau=tau, alpha=alpha, slow_frames=slow)
    _, out = batches(coded_h264, "pyav", alpha=alpha, tau=tau, slow_frames=slow, train=False)
    for b in out:
        assert torch.equal(b["slow"], b["fast"][:, :, ::alpha])
        for i in range(b["fast"].shape[0]):
            assert frame_numbers(b["fast"][i]) == b["frame_ids"][i].tolist()
            if alpha == 1:
                assert torch.equal(b["slow"][i], b["fast"][i])
    assert sum(b["fast"].shape[0] for b in out) == 3 and out[0]["fast"].shape[2] == spec.fast_frames


def gradient_offset(clip: torch.Tensor) -> float:
    """The B channel is a horizontal ramp in the coded videos: its mean over a
    crop tells where (and how wide) the crop was taken."""
    return float(clip[2].mean())


def test_pyav_skips_disposable_frames_and_returns_the_same_pixels(h264_shards):
    """decode_frames leaves out the B-frames nothing refers to when it does
    not keep them: the kept frames must equal a plain decode of every frame."""
    import av

    from loaders.pyav import decode_frames
    skipped = 0
    for tar in sorted(h264_shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t if m.name.endswith((".mp4", ".json"))}
        for name, data in members.items():
            if not name.endswith(".mp4"):
                continue
            info = json.loads(members[name[:-4] + ".json"])
            with av.open(io.BytesIO(data)) as c:
                every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            with av.open(io.BytesIO(data)) as c:
                c.streams.video[0].codec_context.skip_frame = "NONREF"
                skipped += len(every) - sum(1 for _ in c.decode(video=0))
            spec = ClipSpec()
            n = info["num_frames"]
            for start in sorted({0, max(0, n - spec.window) // 2, max(0, n - spec.window), 3}):
                ids = spec.frame_ids(start, n)
                got = decode_frames(data, ids, info["fps"])
                assert all(np.array_equal(f.to_ndarray(format="rgb24"), every[i]) for f, i in zip(got, ids)), name
    assert skipped > 0  # the real videos' shards do have disposable frames: the skipping was exercised


@pytest.mark.parametrize("cut", [True, False])
def test_pyav_finds_every_window_of_a_fragmented_member(h264_shards, cut):
    """Every window start of a 300-frame H.264 member (B-frames) gives the
    frames of a plain whole decode, cut to its fragments and by a seek in the
    whole member (FFmpeg seeks fragmented MP4 by decode time: a window
    starting on a GOP's last frame made the seek land one GOP late)."""
    import av

    from loaders.fragments import Fragments
    from loaders.pyav import decode_frames
    from tests.test_make_shards import tar_samples
    spec = ClipSpec()
    members = next(m for m in tar_samples(h264_shards).values() if json.loads(m["json"])["num_frames"] == 300)
    frags = Fragments.from_members(members["frag_bytes"], members["frag_frames"]) if cut else None
    with av.open(io.BytesIO(members["mp4"])) as c:
        whole = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for start in range(0, 300 - spec.window + 1, 3):  # every position in a 16-frame GOP, and far ones
        ids = spec.frame_ids(start, 300)
        got = decode_frames(members["mp4"], ids, 30.0, fragments=frags)
        assert all(np.array_equal(f.to_ndarray(format="rgb24"), whole[i]) for f, i in zip(got, ids)), start


def test_crop_clip_resizes_only_the_window_on_the_whole_frame_grid():
    """crop_clip resizes only the source window its square reads: pixel for
    pixel the whole-frame resize -> crop -> mirror where that window's grid
    coincides with the frame's (no resize; a window at the frame's edge; a
    window start found up to 8 pixels further out, which scale 5/4 always
    has), and within a sub-pixel shift of it elsewhere (a smooth image: small
    differences)."""
    import av
    import torch.nn.functional as F

    from loaders.pyav import crop_clip
    from loaders.sampling import Crop
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (3, 3, 6, 8), generator=g).float()
    imgs = F.interpolate(coarse, size=(96, 128), mode="bicubic").clamp(0, 255).round().to(torch.uint8)
    frames = [av.VideoFrame.from_ndarray(i.permute(1, 2, 0).contiguous().numpy(), format="rgb24") for i in imgs]
    size = 48
    for crop, exact in [(Crop(96, 128, 10, 20, False), True), (Crop(96, 128, 48, 80, True), True),
                        (Crop(120, 160, 0, 0, True), True), (Crop(120, 160, 0, 112, False), True),
                        (Crop(120, 160, 37, 51, True), True), (Crop(61, 81, 5, 19, False), False),
                        (Crop(133, 177, 70, 90, False), False)]:
        whole = F.interpolate(imgs, size=(crop.height, crop.width), mode="bilinear", align_corners=False,
                              antialias=True)[:, :, crop.y0:crop.y0 + size, crop.x0:crop.x0 + size]
        whole = (whole.flip(-1) if crop.flip else whole).permute(1, 0, 2, 3)
        got = crop_clip(frames[:2] + frames[:1], crop, size)  # a repeated frame (looped videos) as well
        assert got.shape == (3, 3, size, size) and got.is_contiguous()
        diff = (got.int() - whole[:, [0, 1, 0]].int()).abs()
        if exact:
            assert diff.max() == 0, crop
        else:
            assert 0 < diff.float().mean() < 1.5 and diff.max() < 24, (crop, diff.float().mean(), diff.max())


@pytest.mark.parametrize("backend,shards", [("pyav", "coded_h264"), ("dali", "coded_vp9"),
                                            pytest.param("ffcv", "coded_beton", marks=FFCV)])
def test_same_crop_for_the_pair_and_different_crops_across_samples(backend, shards, request):
    path = request.getfixturevalue(shards)
    crops = []
    for epoch in range(3):
        loader = build_loader(str(path), backend=backend, batch_size=3, device="cpu", crop_size=48,
                              normalize=False, num_workers=0 if backend == "pyav" else 1, seed=epoch)
        assert loader.num_videos == 3
        loader.set_epoch(epoch)
        for b in loader:
            assert torch.equal(b["slow"], b["fast"][:, :, ::2])  # one crop and flip for both clips
            crops += [round(gradient_offset(c), 1) for c in b["fast"]]
            for c in b["fast"]:  # one crop for every frame of a clip
                per_frame = c[2].mean(dim=(1, 2))
                assert float(per_frame.max() - per_frame.min()) < 4
    assert len(set(crops)) >= 6, crops  # random crops differ across samples


@pytest.mark.parametrize("backend,shards", [("pyav", "coded_h264"), ("dali", "coded_vp9")])
def test_independent_crops_option(backend, shards, request):
    _, out = batches(request.getfixturevalue(shards), backend, independent_crops=True, batch_size=3)
    (b,) = out
    # the same frames, but (for at least one sample) another crop
    for i in range(3):
        assert frame_numbers(b["slow"][i]) == b["frame_ids"][i, ::2].tolist()
    assert any(abs(gradient_offset(b["slow"][i]) - gradient_offset(b["fast"][i, :, ::2])) > 1 for i in range(3))


@pytest.mark.parametrize("backend,shards", [("pyav", "coded_h264"), ("dali", "coded_vp9")])
def test_eval_centre_crop_and_views(backend, shards, request):
    path = request.getfixturevalue(shards)
    _, out = batches(path, backend, train=False, batch_size=4)
    for b in out:  # centre crop of a horizontal ramp: mean ~ the middle value
        for c in b["fast"]:
            assert abs(gradient_offset(c) - 127.5) < 3
    loader, out = batches(path, backend, train=False, batch_size=5, num_clips=5, num_crops=3)
    assert len(loader) == 9 and set(out[0]) == KEYS | {"view"}
    views = {}
    for b in out:
        for i, idx in enumerate(b["index"].tolist()):
            views.setdefault(idx, []).append((b["view"][i].item(), b["frame_ids"][i, 0].item(),
                                              round(gradient_offset(b["fast"][i]) / 20)))
    assert sorted(views) == [0, 1, 2] and all(len(v) == 15 for v in views.values())
    for b in out:
        for i in range(b["fast"].shape[0]):
            assert frame_numbers(b["fast"][i]) == b["frame_ids"][i].tolist()
    info = {json.loads(m)["index"]: json.loads(m)["num_frames"] for m in _jsons(path)}
    for idx, vs in views.items():
        n = info[idx]
        starts = sorted({s for _, s, _ in vs})
        if n >= 64:  # 5 evenly spaced windows
            assert starts == [((n - 64) * (2 * k + 1)) // 10 for k in range(5)]
        offsets = sorted({o for _, _, o in vs})
        assert len(offsets) == 3  # left, centre, right


def _jsons(shard_dir: Path):
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".json"):
                    yield t.extractfile(m).read()


def test_dali_crop_resizes_only_the_window_on_the_whole_frame_grid(vp9_shards):
    """loaders.dali.resized_crop (a resize of the source window the square
    reads) gives the square of the whole-frame resize, shrinking and enlarging."""
    from nvidia.dali import fn, pipeline_def, types

    from loaders.dali import resized_crop
    from loaders.shards import resolve_shards
    found = resolve_shards(str(vp9_shards))
    cases = [(100.0, 7.0, 30.0, 64), (160.0, 33.0, 5.0, 96), (150.0, 0.0, 41.0, 128)]  # short side, y0, x0, size

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def graph():
        video = fn.readers.webdataset(paths=found.tars, index_paths=[found.idx(t) for t in found.tars],
                                      ext=["mp4"], dtypes=[types.UINT8])
        frames = fn.decoders.video(video, device="cpu", frames=types.Constant(np.array([0, 5], dtype=np.int32)))
        shape = frames.shape()
        h, w = fn.cast(shape[1], dtype=types.FLOAT), fn.cast(shape[2], dtype=types.FLOAT)
        outs = []
        for short, y0, x0, size in cases:
            sh, sw = h * 0.0 + short, fn.cast(fn.cast(w * short / h + 0.5, dtype=types.INT32), dtype=types.FLOAT)
            whole = fn.resize(frames, size=fn.stack(sh, sw), antialias=True, interp_type=types.INTERP_LINEAR)
            outs.append(fn.crop(whole, crop=[size, size], crop_pos_y=y0 / (sh - size), crop_pos_x=x0 / (sw - size),
                                out_of_bounds_policy="error"))
            outs.append(resized_crop(frames, h, w, sh, sw, y0, x0, size, fn, types))
        return tuple(outs)

    pipe = graph()
    pipe.build()
    out = pipe.run()
    for k, (_, _, _, size) in enumerate(cases):
        for i in range(2):
            whole, window = (np.array(out[2 * k + j][i]).astype(int) for j in (0, 1))
            assert whole.shape == window.shape == (2, size, size, 3)
            assert np.abs(whole - window).max() <= 1, cases[k]  # float rounding only


@pytest.mark.parametrize("shards", ["coded_vp9", "vp9_shards"])
def test_dali_and_pyav_agree_on_the_same_window(shards, request):
    path = request.getfixturevalue(shards)
    got = {}
    for backend in ("pyav", "dali"):
        _, out = batches(path, backend, train=False, crop_size=64, batch_size=8)
        got[backend] = {int(i): (b["frame_ids"][k], b["fast"][k]) for b in out for k, i in enumerate(b["index"])}
    assert sorted(got["pyav"]) == sorted(got["dali"])
    for idx in got["pyav"]:
        ids_a, clip_a = got["pyav"][idx]
        ids_b, clip_b = got["dali"][idx]
        assert torch.equal(ids_a, ids_b)
        diff = (clip_a - clip_b).abs()
        assert float(diff.mean()) < 3.0, (idx, float(diff.mean()))  # codec/colour-conversion tolerance


def epoch_on_every_rank(path, backend: str, batch_size: int, world: int, epoch: int, crop_size: int = 32):
    """One epoch on each of ``world`` ranks: [(len(loader), its batches)] in rank order."""
    runs = []
    for rank in range(world):
        loader = build_loader(str(path), backend=backend, batch_size=batch_size, device="cpu", crop_size=crop_size,
                              rank=rank, world_size=world, num_workers=1 if backend in ("dali", "ffcv") else 0)
        loader.set_epoch(epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs.append((len(loader), list(loader)))
    return runs


@pytest.mark.parametrize("backend,shards", EVERY_BACKEND)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_two_ranks_see_every_video_with_equal_steps(backend, shards, batch_size, request):
    path = request.getfixturevalue(shards)
    packed = request.getfixturevalue("h264_shards") if backend == "ffcv" else path  # the .beton's source
    total = json.loads((packed / "manifest.json").read_text())["total_samples"]
    assert total == 5
    for epoch in range(2):
        runs = epoch_on_every_rank(path, backend, batch_size, 2, epoch)
        assert len({(n, len(out)) for n, out in runs}) == 1 and all(n == len(out) for n, out in runs)
        seen = []
        for _, out in runs:
            idx = [i for b in out for i in b["index"].tolist()]
            assert len(idx) - len(set(idx)) <= 1  # at most one padded repeat per rank
            seen += idx
        assert set(seen) == set(range(total))


def test_rank_indices_partition():
    for total in range(1, 30):
        for world in (1, 2, 3, 8):
            if world > total:
                continue
            for epoch in range(3):
                parts = [rank_indices(total, r, world, epoch) for r in range(world)]
                lens = {len(p) for p, _ in parts}
                assert lens == {-(-total // world)}
                assert sorted({i for p, _ in parts for i in p}) == list(range(total))
                assert all(pad <= 1 for _, pad in parts)


def corrupt_copy(src: Path, dst: Path, victim_ext: str, how: str = "replace") -> str:
    """Copy a shard folder, replacing one video member (not the short one) with garbage
    (``how="zero"``: zeroing every byte after its init segment, which keeps its size and
    its fragment table valid, so only a decoder can tell)."""
    shutil.copytree(src, dst)
    for tar in sorted(dst.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = [(m, t.extractfile(m).read()) for m in t]
        victims = [m.name for m, _ in members if m.name.endswith("." + victim_ext) and "part_0" not in m.name]
        if victims:
            victim = victims[0]
            break
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name == victim and how == "zero":
                init = int(np.frombuffer(dict((x.name, d) for x, d in members)[victim.split(".")[0] + ".frag_bytes"],
                                         "<i8")[0])
                data = data[:init] + bytes(len(data) - init)
            elif m.name == victim:
                data = b"not a video at all " * 100
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    write_index(str(tar), str(tar.with_suffix(".idx")))
    reindex(str(dst))  # (the rewritten tar's members moved: the compact index follows)
    return victim.split(".")[0]


@pytest.mark.parametrize("backend,shards,ext", [("pyav", "h264_shards", "mp4"), ("dali", "vp9_shards", "mp4")])
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_member_and_short_video_do_not_stop_an_epoch(backend, shards, ext, workers, request, tmp_path):
    """Evaluation over a pack with a corrupt member: every good video exactly
    once (its views too), the bad one reported and left out, not replaced."""
    if backend == "dali" and workers == 2:
        workers = 1
    path = request.getfixturevalue(shards)
    victim = corrupt_copy(path, tmp_path / "shards", ext)
    index_of = {json.loads(m)["key"]: json.loads(m)["index"] for m in _jsons(path)}
    good = sorted(set(range(5)) - {index_of[victim]})
    for num_clips in (1, 2):
        loader = build_loader(str(tmp_path / "shards"), backend=backend, batch_size=2, device="cpu", crop_size=32,
                              num_workers=workers, train=False, num_clips=num_clips)
        with pytest.warns(RuntimeWarning, match="skipped"):
            out = list(loader)
        seen = sorted((i, v) for b in out for i, v in zip(b["index"].tolist(),
                                                          b["view"].tolist() if "view" in b else [0] * 5))
        assert seen == [(i, v) for i in good for v in range(num_clips)]  # each good video once, all its views
        assert all(b["fast"].shape[0] >= 1 for b in out) and len(out) <= len(loader)
        assert loader.stats.skipped == 1 and victim in loader.stats.skip_reasons[0]["key"]
        assert loader.stats.substituted == 0
    # the 32-frame real video (33 frames at 30 fps) is looped, not dropped
    ids = {i: f for b in out for i, f in zip(b["index"].tolist(), b["frame_ids"].tolist())}
    assert any(f[0] == 0 and max(f) < 33 and f != sorted(f) for f in ids.values())


@pytest.mark.parametrize("backend,shards,ext", [("pyav", "h264_shards", "mp4"), ("dali", "vp9_shards", "mp4")])
@pytest.mark.parametrize("how", ["replace", "zero"])
def test_training_keeps_its_steps_past_a_corrupt_member(backend, shards, ext, how, request, tmp_path):
    """Training substitutes a lost clip to keep batch sizes and step counts; stats says how many.
    A member whose bytes cannot be read as a video and one that only a decoder finds corrupt alike
    (dali: the sample that fails alone among the failed batches' samples)."""
    victim = corrupt_copy(request.getfixturevalue(shards), tmp_path / "shards", ext, how)
    loader = build_loader(str(tmp_path / "shards"), backend=backend, batch_size=2, device="cpu", crop_size=32,
                          num_workers=1 if backend == "dali" else 0)
    with pytest.warns(RuntimeWarning, match="skipped"):
        out = list(loader)
    assert len(out) == len(loader) == 3
    assert loader.stats.skipped == 1 and victim in loader.stats.skip_reasons[0]["key"]
    assert loader.stats.substituted == 1
    assert sum(b["fast"].shape[0] for b in out) == 5  # the bad sample's place is taken by a good one


def test_dali_refuses_h264_on_cpu_with_a_clear_error(h264_shards):
    with pytest.raises(ValueError, match=r'backend="pyav".*--codec vp9'):
        build_loader(str(h264_shards), backend="dali", batch_size=2, device="cpu")


def test_normalize_and_channels_last(h264_shards):
    loader = build_loader(str(h264_shards), backend="pyav", batch_size=5, device="cpu", crop_size=32,
                          num_workers=0, train=False, channels_last=True)
    raw = build_loader(str(h264_shards), backend="pyav", batch_size=5, device="cpu", crop_size=32,
                       num_workers=0, train=False, normalize=False)
    (b,), (r,) = list(loader), list(raw)
    assert b["fast"].is_contiguous(memory_format=torch.channels_last_3d)
    expected = (r["fast"] - 0.45 * 255) / (0.225 * 255)
    assert torch.allclose(b["fast"], expected, atol=1e-4)
    assert loader.stats.clips == 5 and loader.stats.batches == 1


def test_pyav_clips_are_the_batches_before_finishing(h264_shards):
    loader = build_loader(str(h264_shards), backend="pyav", batch_size=8, device="cpu", crop_size=32,
                          num_workers=0, train=False, normalize=False)
    clips = [c for c in loader.clips()]
    (b,) = list(loader)
    assert all(c["fast"].dtype == torch.uint8 for c in clips)
    assert torch.equal(torch.stack([c["fast"] for c in clips]).float(), b["fast"])
    assert [c["index"] for c in clips] == b["index"].tolist()


def test_cpu_batches_reuse_a_buffer_only_when_nothing_holds_it():
    """The CPU batches of per-clip inputs come from reused buffers: a buffer
    goes out again only when no batch, view or autograd graph holds it."""
    finish = Normalizer(2, True, "cpu")
    gen = torch.Generator().manual_seed(0)

    def batch():
        clips = [torch.randint(0, 256, (3, 4, 8, 8), dtype=torch.uint8, generator=gen) for _ in range(3)]
        b = finish(clips, None, {})
        assert torch.allclose(b["fast"], (torch.stack(clips).float() - 0.45 * 255) / (0.225 * 255))
        assert torch.equal(b["slow"], b["fast"][:, :, ::2])
        return b

    b1 = batch()
    first, kept = b1["fast"].data_ptr(), b1["fast"].clone()
    b2 = batch()  # b1 is held: another buffer, b1 untouched
    assert b2["fast"].data_ptr() != first and torch.equal(b1["fast"], kept)
    second = b2["fast"].data_ptr()
    del b1
    b3 = batch()  # nothing holds b1's buffer any more
    assert b3["fast"].data_ptr() == first and b3["slow"].data_ptr() != b2["slow"].data_ptr()
    w = torch.ones(1, requires_grad=True)
    loss = (b3["fast"] * w).sum()  # the graph keeps b3's fast for w's gradient
    want = b3["fast"].sum()
    del b3, b2
    b4 = batch()  # b2's buffer is free, b3's is held by the graph
    assert b4["fast"].data_ptr() == second
    b5 = batch()  # both kept buffers are held: a new one
    assert b5["fast"].data_ptr() not in (first, second)
    loss.backward()
    assert torch.allclose(w.grad, want.view(1))


def test_batches_finished_on_the_threads_asked_for(monkeypatch):
    """The pyav loader finishes batches on one intra-op thread while its
    workers occupy the cores; the caller's thread count comes back after."""
    threads = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(Normalizer, "_finish", lambda self, *a: seen.append(torch.get_num_threads()))
    Normalizer(2, True, "cpu", threads=1)([torch.zeros(3, 4, 8, 8, dtype=torch.uint8)], None, {})
    Normalizer(2, True, "cpu")([torch.zeros(3, 4, 8, 8, dtype=torch.uint8)], None, {})
    assert seen == [1, threads] and torch.get_num_threads() == threads


def test_shard_sources_accepted(h264_shards):
    tars = sorted(str(p) for p in h264_shards.glob("*.tar"))
    manifest = json.loads((h264_shards / "manifest.json").read_text())
    for shards in (h264_shards / "manifest.json", h264_shards, str(h264_shards / manifest["pattern"]), tars):
        loader = build_loader(shards, backend="pyav", batch_size=8, device="cpu", crop_size=32, num_workers=0)
        assert len(loader) == 1
    with pytest.raises(FileNotFoundError):
        build_loader(str(h264_shards / "nope-{000000..000003}.tar"), backend="pyav", batch_size=1, device="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        build_loader(str(h264_shards), backend="nope", batch_size=1, device="cpu")


@pytest.mark.parametrize("backend,shards", [("pyav", "h264_shards"), pytest.param("ffcv", "real_beton", marks=FFCV)])
def test_resume_replays_the_rest_of_an_epoch(backend, shards, request):
    path = request.getfixturevalue(shards)

    def make():
        return build_loader(str(path), backend=backend, batch_size=2, device="cpu", crop_size=32,
                            num_workers=0 if backend == "pyav" else 1, seed=3)
    full = [b["index"].tolist() + b["frame_ids"][:, 0].tolist() for b in make()]
    loader = make()
    it = iter(loader)
    first = [next(it)["index"].tolist()]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 1}
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["index"].tolist() + b["frame_ids"][:, 0].tolist() for b in resumed]
    assert first[0] == full[0][:2] and rest == full[1:]


def test_synthetic_contract():
    loader = build_loader(None, backend="synthetic", num_videos=10, batch_size=4, device="cpu", crop_size=16)
    out = list(loader)
    assert len(out) == len(loader) == 3
    for b in out:
        assert set(b) == KEYS and torch.equal(b["slow"], b["fast"][:, :, ::2])
    assert sorted(i for b in out for i in b["index"].tolist()) == list(range(10))


# --------------------------------------------------------------------------- window cuts


def long_numbers(clip: torch.Tensor) -> list[int]:
    """[3, T, H, W] 0..255 of a long-coded video -> the number coded in each frame."""
    return [media.read_long_frame_number(clip[:, t].numpy()) for t in range(clip.shape[1])]


def check_long_windows(out, path: Path, train: bool, num_clips: int = 1) -> dict:
    """Every clip shows exactly its frame_ids; windows are the contract's (a
    valid start, stride tau/alpha; evaluation: the num_clips evenly spaced
    windows; a video shorter than the window looped from 0). Returns
    index -> the window starts seen."""
    spec = ClipSpec()
    frames = {json.loads(m)["index"]: json.loads(m)["num_frames"] for m in _jsons(path)}
    starts = {}
    for b in out:
        assert torch.equal(b["slow"], b["fast"][:, :, ::2])
        for i, idx in enumerate(b["index"].tolist()):
            ids = b["frame_ids"][i].tolist()
            assert long_numbers(b["fast"][i]) == ids, (idx, ids)
            n = frames[idx]
            assert ids == spec.frame_ids(ids[0], n).tolist()
            if n < spec.window:
                assert ids[0] == 0  # looped
            elif not train:
                assert ids[0] in spec.starts(n, False, num_clips=num_clips)
            starts.setdefault(idx, set()).add(ids[0])
    return starts


@pytest.mark.parametrize("backend", ["dali", "pyav"])
def test_windows_anywhere_in_long_videos_decode_exactly(long_vp9, backend):
    """Training windows over several epochs (many far from frame 0), the
    centre windows and 5 evaluation views of 610- and 700-frame videos, and
    a 40-frame video looped: each decoded from the member cut to its
    window's fragments, each frame the one its frame id names."""
    seen = {}
    for epoch in range(4):
        loader = build_loader(str(long_vp9), backend=backend, batch_size=3, device="cpu", crop_size=48,
                              normalize=False, num_workers=1 if backend == "dali" else 0, seed=epoch)
        assert loader.window_cut
        loader.set_epoch(epoch)
        for idx, s in check_long_windows(list(loader), long_vp9, train=True).items():
            seen.setdefault(idx, set()).update(s)
    assert max(max(s) for s in seen.values()) > 300 and len(seen) == 3
    _, out = batches(long_vp9, backend, train=False, batch_size=3)
    assert sum(b["fast"].shape[0] for b in out) == 3
    check_long_windows(out, long_vp9, train=False)
    _, out = batches(long_vp9, backend, train=False, batch_size=5, num_clips=5)
    views = check_long_windows(out, long_vp9, train=False, num_clips=5)
    assert sorted(len(v) for v in views.values()) == [1, 5, 5]  # the looped video: 5 views of one window


def test_dali_cut_decodes_the_same_pixels_as_the_whole_member(long_vp9):
    got = {}
    for cut in (True, False):
        _, out = batches(long_vp9, "dali", train=False, batch_size=3, num_clips=2, window_cut=cut)
        got[cut] = sorted((b["index"][i].item(), b["view"][i].item(), b["fast"][i]) for b in out
                          for i in range(b["fast"].shape[0]))
    assert [k[:2] for k in got[True]] == [k[:2] for k in got[False]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(got[True], got[False]))


@pytest.mark.parametrize("view_cut", ["each", "cover"])
def test_dali_view_cuts_and_independent_crops(long_vp9, view_cut):
    _, out = batches(long_vp9, "dali", train=False, batch_size=4, num_clips=4, view_cut=view_cut)
    check_long_windows(out, long_vp9, train=False, num_clips=4)
    _, out = batches(long_vp9, "dali", batch_size=3, independent_crops=True)
    for b in out:
        for i in range(3):
            assert long_numbers(b["slow"][i]) == b["frame_ids"][i, ::2].tolist()
    with pytest.raises(ValueError, match="view_cut"):
        build_loader(str(long_vp9), backend="dali", batch_size=1, device="cpu", view_cut="some")


@pytest.mark.parametrize("backend", ["dali", "pyav"])
def test_shards_packed_before_fragment_tables_still_load(old_long_vp9, backend):
    """Old shards (plain WebM members, no KEY.frag_*) decode whole members:
    the same exact frames; the dali backend warns once with the remedy."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_loader(str(old_long_vp9), backend=backend, batch_size=3, device="cpu", crop_size=48,
                              normalize=False, num_workers=1 if backend == "dali" else 0, train=False)
        out = list(loader)
    check_long_windows(out, old_long_vp9, train=False)
    remedy = [w for w in caught if "Re-pack" in str(w.message)]
    assert len(remedy) == (1 if backend == "dali" else 0)
    if backend == "dali":
        assert loader.window_cut is False
        with pytest.raises(ValueError, match="no fragment tables"):
            build_loader(str(old_long_vp9), backend="dali", batch_size=1, device="cpu", window_cut=True)


def test_dali_refuses_a_mix_of_old_and_new_shards(long_vp9, old_long_vp9, tmp_path):
    for name, src in (("train-000000", long_vp9), ("train-000001", old_long_vp9)):
        for ext in (".tar", ".idx"):
            shutil.copy(src / ("train-000000" + ext), tmp_path / (name + ext))
    with pytest.raises(ValueError, match=r"train-000000.tar carries fragment tables.*train-000001.tar does not"):
        build_loader(str(tmp_path), backend="dali", batch_size=1, device="cpu")
    assert len(build_loader(str(tmp_path), backend="pyav", batch_size=1, device="cpu")) == 6  # per sample


@pytest.mark.parametrize("backend,shards", EVERY_BACKEND)
def test_every_backend_refuses_unknown_options_the_same_way(backend, shards, request):
    path = request.getfixturevalue(shards)
    refused = rf"^{backend} backend: unknown options \['shuffle', 'spead'\] \(it takes .*drop_last"
    with pytest.raises(TypeError, match=refused):
        build_loader(str(path), backend=backend, batch_size=2, device="cpu", spead=1, shuffle=True)


@pytest.mark.parametrize("backend,shards", [("pyav", "many_vp9"), ("dali", "many_vp9"), ("synthetic", "many_vp9"),
                                            pytest.param("ffcv", "many_beton", marks=FFCV)])
def test_sixteen_ranks_take_equal_steps_and_see_every_video(backend, shards, request):
    """WORLD_SIZE 16 over 21 videos: every rank the same number of steps, no
    empty batch (DALI's own reader sharding trims a shorter shard's padding
    down to empty batches: the rank repeats a video instead), at most one
    repeat per rank, every video seen, in each epoch."""
    path = request.getfixturevalue(shards)
    for epoch in range(1 if backend == "ffcv" else 2):  # (an FFCV pipeline compiles per loader: 2 s each)
        # a batch of one: a shard of one video is what DALI's reader padded with an empty second batch
        runs = epoch_on_every_rank(path, backend, 1, 16, epoch, crop_size=16)
        assert {(n, len(out)) for n, out in runs} == {(2, 2)}
        seen = []
        for _, out in runs:
            assert all(b["fast"].shape[0] == 1 for b in out)
            idx = [i for b in out for i in b["index"].tolist()]
            assert len(idx) - len(set(idx)) <= 1  # ceil(21/16) = 2 videos, at most one a padded repeat
            seen += idx
        assert set(seen) == set(range(21))
