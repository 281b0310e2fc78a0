"""Benchmark building blocks work (the figures themselves live in benchmarks/results)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import references
from benchmarks.shards import bare_transcode
from loaders.sampling import ClipSpec


def test_references_decode_the_clip(videos):
    data = (videos / "test.mp4").read_bytes()
    spec = ClipSpec()
    ids = spec.frame_ids(100, 300)
    rng = np.random.default_rng(0)
    for fn in (references.slowfast_style, references.decord_style):
        if fn is references.decord_style:
            pytest.importorskip("decord")
        clip = fn(data, ids, 30.0, 112, rng)
        assert clip.shape == (16, 3, 112, 112)
    assert references.slowfast_style(str(videos / "test.mp4"), ids, 30.0, 112, rng).shape == (16, 3, 112, 112)
    n = references.codec_limit(data, ids, 30.0, 112, rng)
    assert ids.max() - ids.min() + 1 <= n <= ids.max() + 1  # from the keyframe before the window to its end


def test_bare_transcode_matches_make_shards_frame_counts(h264_shards, real_tree):
    """FFmpeg's own fps filter and make_shards' resampler agree on frame counts
    (within the one frame FFmpeg's filter may drop at the end of a stream)."""
    manifest = json.loads((h264_shards / "manifest.json").read_text())
    from tests.test_make_shards import tar_samples
    for members in tar_samples(h264_shards).values():
        info = json.loads(members["json"])
        n = bare_transcode((str(real_tree / info["source"]), "h264", 30, 128, 16, 1))
        assert abs(n - info["num_frames"]) <= 1, info["source"]
    assert manifest["total_samples"] == 5


def test_step_trainer_runs_on_cpu():
    from benchmarks.step import Trainer, endless, measure_steps
    from loaders import build_loader
    trainer = Trainer("r18", 8, "fp32", True, False, "cpu", num_videos=32, num_negatives=8)
    data = endless(build_loader(None, backend="synthetic", num_videos=32, batch_size=2, crop_size=32,
                                device="cpu"))
    before = trainer.bank.banks.clone()
    assert measure_steps(trainer, data, warmup=1, steps=2) > 0
    assert not torch.equal(before, trainer.bank.banks)


def test_detection_step_trains_the_roi_head_on_cpu():
    from benchmarks.step import DetectionTrainer, endless, measure_steps
    from loaders import build_loader
    trainer = DetectionTrainer("r18", 8, "fp32", "cpu", classes=5)
    data = endless(build_loader(None, backend="synthetic", num_videos=8, batch_size=2, crop_size=64, device="cpu",
                                alpha=1))
    before = trainer.model.head.projection.weight.clone()
    assert measure_steps(trainer, data, warmup=1, steps=1) > 0
    assert not torch.equal(before, trainer.model.head.projection.weight)


def test_run_refuses_a_suite_without_its_inputs(capsys):
    from benchmarks.run import main, run
    from vthcl.options import UsageError
    with pytest.raises(UsageError, match="--shards"):
        run(suite="e2e")
    assert main(["--suite", "e2e"]) == 2
    assert "--shards" in capsys.readouterr().err


@pytest.mark.ffcv
def test_loader_suite_ffcv_helper_measures_size_and_setup(h264_shards, tmp_path):
    from benchmarks.loader import _beton
    beton, sizes, setup = _beton(str(h264_shards), tmp_path, 1)
    assert beton.endswith(".beton") and setup > 0
    assert sizes["tars_bytes"] > 0 and sizes["beton_video_bytes"] <= sizes["beton_bytes"]
    assert sizes["beton_over_tars"] == round(sizes["beton_bytes"] / sizes["tars_bytes"], 2)


def test_e2e_suite_quick_on_cpu(h264_shards, tmp_path):
    from benchmarks import e2e
    doc = json.loads(e2e.run(tmp_path, str(h264_shards), quick=True, workers=1).read_text())
    assert set(doc["results"]) == {"pyav_e2e_r18", "synthetic_r18"}
    assert doc["ratios"]["e2e_over_synthetic"] == doc["ratios"]["e2e_over_synthetic_r18"] > 0
    assert 0 <= doc["ratios"]["data_wait_fraction_r18"] <= 1
    assert "kinetics400_pretraining" not in doc["settings"]  # projected only from GPU figures
    assert (tmp_path / "e2e.png").exists()


def test_a_failing_configuration_is_reported_and_the_others_still_run(tmp_path, capsys):
    from benchmarks.common import ratio, repeat_rates, write_result
    calls = []

    def broken():
        calls.append("broken")
        raise RuntimeError("no NVDEC here")

    results = repeat_rates({"ok": lambda: 4.0, "broken": broken, "other": lambda: 2.0}, repeats=3)
    assert calls == ["broken"]  # not retried
    assert results["ok"]["runs"] == [4.0] * 3 and results["broken"] == {"error": "RuntimeError: no NVDEC here"}
    assert ratio(results, "ok", "other") == 2.0 and ratio(results, "ok", "broken") is None
    path = write_result(tmp_path, "demo", {}, results, {"ok_over_broken": None}, "items/s")
    doc = json.loads(path.read_text())
    assert doc["results"]["broken"]["error"].startswith("RuntimeError") and (tmp_path / "demo.png").exists()
    assert "no NVDEC here" in capsys.readouterr().err


def test_repeat_rates_reports_after_every_measurement(tmp_path):
    """A suite writes its JSON after each measurement, so a run stopped by a time
    limit keeps what it measured; a failing configuration is reported, the others go on."""
    from benchmarks.common import ratio, repeat_rates, write_result
    rates = iter([1.0, 2.0, 3.0, 4.0])

    def broken():
        raise RuntimeError("no decoder")

    seen = []

    def report(results, rounds):
        seen.append((sorted(results), rounds, ratio(results, "a", "b")))
        write_result(tmp_path, "t", {"rounds_done": rounds}, results, {}, "items/s", plot_png=False)

    results = repeat_rates({"a": lambda: next(rates), "bad": broken, "b": lambda: next(rates)}, 2, on_result=report)
    assert seen == [(["a"], 0, None), (["a", "bad"], 0, None), (["a", "b", "bad"], 1, 0.5),
                    (["a", "b", "bad"], 1, 1.0), (["a", "b", "bad"], 2, 2.0 / 3.0)]
    assert results["a"]["runs"] == [1.0, 3.0] and results["b"]["runs"] == [2.0, 4.0]
    assert "no decoder" in results["bad"]["error"]
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["settings"]["rounds_done"] == 2 and doc["results"]["b"]["median"] == 3.0
    assert not (tmp_path / "t.png").exists()  # interim writes leave the plot to the final one


NVIDIA_SMI_UTILIZATION = """
==============NVSMI LOG==============

Timestamp                                 : Tue Dec  1 12:00:00 2026
Driver Version                            : 580.159.04
CUDA Version                              : 13.0

Attached GPUs                             : 1
GPU 00000000:18:00.0
    Utilization
        Gpu                               : 37 %
        Memory                            : 5 %
        Encoder                           : 0 %
        Decoder                           : 91 %
        JPEG                              : 0 %
        OFA                               : 0 %
    GPU Utilization Samples
        Duration                          : 16.63 sec
        Number of Samples                 : 99
        Max                               : 64 %
        Min                               : 0 %
        Avg                               : 12 %
    DEC Utilization Samples
        Duration                          : 16.63 sec
        Number of Samples                 : 99
        Max                               : 100 %
        Min                               : 0 %
        Avg                               : 50 %
"""


def test_utilization_is_read_from_nvidia_smi(tmp_path):
    """The decode suite's sampler reads the instantaneous GPU and NVDEC
    percentages of ``nvidia-smi -q -d UTILIZATION`` (not its sample
    statistics), in a thread while a measurement runs."""
    from benchmarks.decode import Utilization, parse_utilization
    assert parse_utilization(NVIDIA_SMI_UTILIZATION) == {"gpu": 37, "memory": 5, "encoder": 0, "decoder": 91,
                                                         "jpeg": 0, "ofa": 0}
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVIDIA_SMI_UTILIZATION}EOF\n")
    fake.chmod(0o755)
    with Utilization(interval=0.05, command=(str(fake), "-q")) as util:
        import time
        time.sleep(0.4)
    summary = util.summary()
    assert summary["samples"] >= 2 and summary["decoder"] == {"median": 91, "max": 91}
    with Utilization(command=(str(tmp_path / "absent"),)) as none:
        pass
    assert none.summary() is None


def test_decode_suite_quick_on_cpu(videos, tmp_path):
    """On a CPU the suite measures DALI's CPU decoder on VP9: decode-only and
    the full graph, cut and whole, per thread count, and the window's
    position (the figures themselves are the suite's, not this test's)."""
    pytest.importorskip("nvidia.dali")
    from benchmarks import decode
    doc = json.loads(decode.run(videos, tmp_path, quick=True, workers=1, long_seconds=8).read_text())
    assert doc["settings"]["complete"] and doc["settings"]["threads"] == [1]
    for what in ("decode_only", "full"):
        for mode in ("cut", "whole"):
            assert doc["results"][f"dali_{what}_{mode}_t1"]["median"] > 0
    assert {f"position_{m}_at_{s:04d}" for m in ("cut", "whole") for s in decode.POSITIONS} <= set(doc["results"])
    assert doc["settings"]["position_member_frames"] == 1200
    assert all(doc["ratios"][f"position_{m}_last_over_first"] > 0 for m in ("cut", "whole"))
    assert any("PyNvVideoCodec" in n for n in doc["notes"])
    # the long video: keyframe clips at its start and end from shards and from JPEG frames, bytes side by side
    long = doc["settings"]["long_video"]
    assert long["keyframes"] == 5 and long["jpeg_bytes"] > long["shard_bytes_h264"] > 0
    for name in ("pyav", "dali", "jpeg"):
        assert all(doc["results"][f"long_{name}_{w}"]["median"] > 0 for w in ("start", "end")), name
    assert 0 < long["pyav_bytes_read_per_clip"] < long["member_bytes_h264"]
    assert doc["ratios"]["long_shard_bytes_over_jpeg_bytes"] < 1


def test_videos_are_found_in_a_dataset_tree_or_a_flat_folder(videos, real_tree, tmp_path):
    """--videos takes what users have: <class>/<video> trees of any depth, or a flat folder."""
    from benchmarks.common import replicate, video_files
    flat = video_files(videos)
    assert [p.name for p in flat] == sorted(p.name for p in videos.iterdir() if p.suffix in (".mp4", ".avi"))
    deep = tmp_path / "k400" / "train"
    for f in video_files(real_tree):
        target = deep / f.relative_to(real_tree).parent / "more" / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f)
    (deep / "other" / "more" / "demo.mp4").symlink_to(videos / "demo.mp4")  # one name in two classes
    (deep / ".cache").mkdir()
    (deep / ".cache" / "hidden.mp4").write_bytes(b"")
    found = video_files(tmp_path / "k400")
    assert len(found) == 6 and all("more" in p.parts for p in found)
    links = replicate(tmp_path / "k400", tmp_path / "src", 2)
    assert len(links) == 12 and len({p.name for p in links}) == 12  # the two demo.mp4 stay apart
    empty = tmp_path / "empty" / "class"
    empty.mkdir(parents=True)
    from vthcl.options import UsageError
    with pytest.raises(UsageError, match="no videos"):
        video_files(tmp_path / "empty")


def test_scale_simulation_quick(tmp_path):
    """The scale suite's small run: the shard index probes on sparse shards,
    each rank's own rows and files under a 1,024-file limit, and a 2-rank
    sharded bank whose counted traffic and bank bytes are the formula's."""
    pytest.importorskip("nvidia.dali")
    from benchmarks import scale
    doc = json.loads(scale.run(tmp_path, quick=True).read_text())
    for kind in ("manifest", "sample_index", "fragment_check", "dali_reader", "write_index"):
        for n in (100, 1000):
            r = doc["results"][f"{kind}_{n}_shards"]
            assert r["samples"] == n * scale.SAMPLES_PER_SHARD and r["seconds"] >= 0, (kind, n, r)
    total = 1000 * scale.SAMPLES_PER_SHARD
    for world in scale.WORLDS:
        for backend in ("pyav", "dali"):
            r = doc["results"][f"rank_{backend}_{world}_ranks_1000_shards"]
            assert r["samples"] == -(-total // world) and r["open_files_limit"] == 1024, r
            assert r["startup_files"] == {"tars": 0, "tars_outside_range": 0, "idx": 0,
                                          "other": ["index.npy", "manifest.json"]}, r
            read = r["read"]["files"]
            assert read["tars"] >= 1 and read["tars_outside_range"] == read["idx"] == 0, r
            assert r["read"]["peak_fds"] <= r["fds_before"] + 64 + 2, r  # the reader's bound, whatever the range
    assert doc["results"]["rank_dali_8_ranks_1000_shards"]["epoch_boundary_files"]["tars_outside_range"] == 0
    assert all(g["own_range_only"] and g["open_files"] for g in doc["results"]["goals_1000_shards"].values())
    bank = doc["results"]["sharded_bank_20000_rows_2_ranks"]
    for key in ("bank_mb_per_rank", "received_mb_per_step_per_rank"):
        assert bank[key] == pytest.approx(bank["formula"][key], rel=0.01), key
    plan = doc["settings"]["plan_10m_videos"]
    assert plan["8"]["bank_gb_per_rank_fp32"] == pytest.approx(2 * plan["16"]["bank_gb_per_rank_fp32"], rel=1e-3)
