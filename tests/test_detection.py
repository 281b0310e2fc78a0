"""AVA detection: the dilated encoder, the RoI head, which boxes train and test, detections and their score."""
from __future__ import annotations

import csv

import pytest
import torch

from vthcl import ava_eval
from vthcl import detection as D
from vthcl.model import Pathway
from vthcl.roi_align import roi_align


def test_res5_dilation_keeps_res4s_resolution_and_the_weights():
    torch.manual_seed(0)
    plain = Pathway("r18", 8, slow=True)
    wide = D.dilated(plain)
    assert wide.res5_dilation == 2 and plain.state_dict().keys() == wide.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), wide.state_dict().values()))
    x = torch.randn(1, 3, 4, 64, 96)
    plain.eval(), wide.eval()
    maps, dilated = plain(x), wide(x)
    assert maps["res4"].shape[-2:] == dilated["res5"].shape[-2:] == (4, 6)  # stride 16
    assert maps["res5"].shape[-2:] == (2, 3)
    assert torch.equal(maps["res4"], dilated["res4"])  # only res5 changes
    with pytest.raises(ValueError, match="res5_dilation=2"):
        D.Detector(plain, 5)


def test_roi_head_pools_time_then_aligns_each_box():
    """PySlowFast's ResNetRoIHead: mean over frames, RoIAlign 7x7 at 1/16 (aligned), max, linear."""
    torch.manual_seed(0)
    head = D.RoIHead(8, 3, dropout=0.5).eval()
    fmap = torch.randn(2, 8, 4, 6, 10)
    boxes = torch.tensor([[0, 0.0, 0.0, 160.0, 96.0], [1, 32.0, 16.0, 80.0, 64.0], [1, 8.0, 8.0, 9.0, 9.0]])
    want = roi_align(fmap.mean(2), boxes, (7, 7), spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    want = head.projection(want.amax(dim=(2, 3)))
    assert torch.allclose(head(fmap, boxes), want, atol=1e-6)
    fmap2 = fmap.clone()
    fmap2[1] += 1  # a box sees only its own clip
    got = head(fmap2, boxes)
    assert torch.allclose(got[0], want[0], atol=1e-6) and not torch.allclose(got[1:], want[1:])


def _batch(proposal_labels=False):
    """Two keyframes: clip 0 with two ground-truth boxes, clip 1 with one; proposals near and far."""
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.9, 0.8], [0.2, 0.2, 0.6, 0.6]])
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    proposals = torch.tensor([[0.1, 0.1, 0.5, 0.51],   # clip 0, IoU 0.975 with its first box
                              [0.6, 0.2, 0.9, 0.65],   # clip 0, IoU 0.75 with its second: not a training box
                              [0.1, 0.1, 0.5, 0.5],    # clip 0, the first box but a low score
                              [0.2, 0.2, 0.6, 0.6],    # clip 1, its box exactly
                              [0.1, 0.1, 0.5, 0.5]])   # clip 1, clip 0's first box: another keyframe's
    scores = torch.tensor([0.95, 0.99, 0.5, 0.9, 0.97])
    plabels = torch.zeros(5, 4)
    if proposal_labels:
        plabels[0, 2] = 1
    return {"boxes": boxes, "box_labels": labels, "box_batch": torch.tensor([0, 0, 1]), "proposals": proposals,
            "proposal_scores": scores, "proposal_labels": plabels, "proposal_batch": torch.tensor([0, 0, 0, 1, 1]),
            "event": torch.tensor([7, 8]), "size": torch.tensor([[100, 200], [100, 200]])}


def test_training_boxes_are_the_truth_and_the_proposals_that_overlap_it():
    boxes, index, labels = D.training_boxes(_batch(), 0.9, labelled_proposals=False)
    assert index.tolist() == [0, 0, 1, 0, 1]  # 3 ground truth, then proposals 0 and 3
    assert torch.equal(boxes[3], _batch()["proposals"][0]) and torch.equal(labels[3], _batch()["box_labels"][0])
    assert torch.equal(labels[4], _batch()["box_labels"][2])
    # an "include negative" file: the confident proposals with the labels they carry, negatives included
    boxes, index, labels = D.training_boxes(_batch(True), 0.9, labelled_proposals=True)
    assert index.tolist() == [0, 0, 1, 0, 0, 1, 1] and labels[3].tolist() == [0, 0, 1, 0] and labels[4].sum() == 0


def test_test_boxes_keep_the_confident_proposals_or_a_keyframes_best():
    b = _batch()
    assert D.test_boxes(b, 0.9).tolist() == [0, 1, 3, 4]
    assert D.test_boxes(b, 0.999).tolist() == [1, 4]  # none is confident: each keyframe's best
    pix = D.pixel_boxes(b["proposals"][:1], torch.tensor([1]), b["size"])
    assert pix.tolist() == [[1.0, 20.0, 10.0, 100.0, 51.0]]


def test_detections_file_is_scored_like_the_official_files(tmp_path):
    """write_detections' CSV read back by ava_eval gives the mAP of the same rows scored in memory,
    and against the events' ground truth: every class right gives 1, a swapped class loses its AP."""
    events = [{"video_id": "v", "time": 902, "boxes": [{"box": [0.1, 0.1, 0.5, 0.5], "actions": [1]}],
               "proposals": [{"box": [0.1, 0.1, 0.5, 0.5], "score": 0.9}]},
              {"video_id": "v", "time": 903, "boxes": [{"box": [0.5, 0.5, 0.9, 0.9], "actions": [2]}],
               "proposals": [{"box": [0.5, 0.5, 0.9, 0.9], "score": 0.9}]}]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    right = [("v", 902, 0.1, 0.1, 0.5, 0.5, 1, 0.9), ("v", 902, 0.1, 0.1, 0.5, 0.5, 2, 0.1),
             ("v", 903, 0.5, 0.5, 0.9, 0.9, 1, 0.2), ("v", 903, 0.5, 0.5, 0.9, 0.9, 2, 0.8)]
    path = tmp_path / "detections.csv"
    D.write_detections(right, path)
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["v", "0902", "0.100", "0.100", "0.500", "0.500", "1", "0.900000"] and len(rows) == 4
    # class 1: the true box first (AP 1); class 2: the true box first too
    assert D.score(path, events, categories)["mAP"] == pytest.approx(1.0)
    wrong = [r[:6] + (3 - r[6], r[7]) for r in right]  # the scores of each box go to the other class
    D.write_detections(wrong, path)
    res = D.score(path, events, categories)
    assert res["per_class"] == {1: pytest.approx(0.5), 2: pytest.approx(0.5)}  # the true box ranked second
    gt = tmp_path / "gt.csv"
    gt.write_text("v,0902,0.1,0.1,0.5,0.5,1,0\nv,0903,0.5,0.5,0.9,0.9,2,0\n")
    labelmap = tmp_path / "labelmap.pbtxt"
    labelmap.write_text('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n  id: 2\n}\n')
    assert ava_eval.score_files(gt, path, labelmap)["mAP"] == pytest.approx(res["mAP"])


@pytest.fixture(scope="session")
def synthetic_ava(tmp_path_factory):
    """The embedded AVA-format data, small: one train and one val video of 8 s."""
    from shard_tools.make_synthetic import make
    out = tmp_path_factory.mktemp("synthetic_ava")
    make(out, task="ava", seed=1, videos=1, val_videos=1, duration=8, short_side=48, workers=2)
    return out


def test_detect_end_to_end_and_the_official_scorer_agree(synthetic_ava, tmp_path):
    """vthcl.eval detect trains, writes detections.csv in the official format and detect.json; ava-map
    re-scores the file against the ground-truth CSV (label map, exclusions) to the same mAP."""
    import json

    from vthcl import eval as vthcl_eval
    d = synthetic_ava
    out = tmp_path / "detect"
    result = vthcl_eval.run(mode="detect", random_init=True, arch="r18", width=8, train=str(d / "train"),
                            val=str(d / "val"), out=str(out), epochs=1, batch_size=4, crop_size=32,
                            eval_short_side=48, warmup_epochs=0.5, workers=0, quiet=True)
    saved = json.loads((out / "detect_random.json").read_text())
    assert saved["mAP"] == pytest.approx(result["mAP"]) and 0 <= saved["mAP"] <= 1
    assert saved["train_steps"] >= 1 and set(saved["per_class"]) == {"1", "2", "3", "4", "5", "6", "7"}
    rows = list(csv.reader(open(out / "detections.csv")))
    assert rows and all(len(r) == 8 and len(r[1]) == 4 for r in rows)
    scorer = tmp_path / "ava_map.json"
    vthcl_eval.run(mode="ava-map", groundtruth=str(d / "ava_val_v2.2.csv"), detections=str(out / "detections.csv"),
                   labelmap=str(d / "ava_action_list.pbtxt"), exclusions=str(d / "ava_val_excluded_timestamps.csv"),
                   out=str(scorer))
    assert json.loads(scorer.read_text())["mAP"] == pytest.approx(saved["mAP"], abs=1e-9)
    from vthcl.options import UsageError
    with pytest.raises(UsageError, match="EPIC-Kitchens shards"):  # a task's shards and mode go together
        vthcl_eval.run(mode="anticipate", init="random", train=str(d / "train"), val=str(d / "val"),
                       out=str(tmp_path / "x"), width=8, quiet=True)
    with pytest.raises(UsageError, match="not both"):
        vthcl_eval.run(mode="detect", init="random", checkpoint="last.pt", train=str(d / "train"),
                       val=str(d / "val"), out=str(tmp_path / "x"), quiet=True)


def test_detect_under_torchrun_scores_every_keyframe_once_and_resumes(synthetic_ava, tmp_path):
    """``python -m vthcl.eval detect`` on 2 gloo ranks: each rank scores its share of the keyframes and
    detections.csv holds every test box of every keyframe once per class; ``--resume`` with more epochs
    continues from the checkpointed step."""
    import json

    from loaders.events import EventTable
    from loaders.shards import resolve_shards
    from tests.conftest import torchrun
    d, out = synthetic_ava, tmp_path / "ddp"
    args = ["-m", "vthcl.eval", "detect", "--init", "random", "--arch", "r18", "--width", "8", "--train",
            str(d / "train"), "--val", str(d / "val"), "--out", str(out), "--batch-size", "4", "--crop-size", "32",
            "--eval-short-side", "48", "--warmup-epochs", "0.5", "--workers", "0", "--device", "cpu",
            "--log-every", "1"]
    torchrun(*args, "--epochs", "1", "--quiet")
    first = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert first == list(range(1, len(first) + 1)) and first
    rows = [tuple(r) for r in csv.reader(open(out / "detections.csv"))]
    assert len(rows) == len(set(rows))  # (a keyframe a rank's padding repeats is scored once)
    events = EventTable(resolve_shards(d / "val")).rows
    classes = json.loads((out / "detect.json").read_text())["per_class"]
    per_keyframe = {(e["video_id"], f"{int(round(e['time'])):04d}"): len(D.test_boxes(
        {"proposal_scores": torch.tensor([p["score"] for p in e["proposals"]]),
         "proposal_batch": torch.zeros(len(e["proposals"]), dtype=torch.long), "event": torch.tensor([0])},
        0.9)) * len(classes) for e in events}
    counts = {}
    for r in rows:
        counts[r[:2]] = counts.get(r[:2], 0) + 1
    assert counts == {k: n for k, n in per_keyframe.items() if n}
    r = torchrun(*args, "--epochs", "2", "--resume")
    assert f"step {len(first)}" in r.stderr, r.stderr  # (a run from scratch logs the same steps)
    resumed = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert resumed == list(range(1, 2 * len(first) + 1))
    assert json.loads((out / "detect.json").read_text())["train_steps"] == 2 * len(first)


def _gather_worker(rank, world, init, out):
    import torch.distributed as dist

    from loaders.ranks import rank_indices
    from vthcl.downstream import gather
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    samples = rank_indices(2, rank, world)[0]  # 2 samples, 3 ranks: one rank reads another's as padding
    records = [(s, rank, k) for s in samples for k in range(2)]  # two records a sample (a keyframe's boxes)
    torch.save({"all": gather(records), "once": gather(records, key=lambda r: r[0])}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gather_takes_each_samples_records_from_one_rank(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_gather_worker, args=(3, f"file://{tmp_path}/init", str(tmp_path / "r")), nprocs=3, join=True)
    got = [torch.load(f"{tmp_path}/r.{r}") for r in range(3)]
    assert got[0] == got[1] == got[2]  # the same on every rank
    assert len(got[0]["all"]) == 6  # every rank's records, the padding repeat's too
    assert got[0]["once"] == [(0, 0, 0), (0, 0, 1), (1, 2, 0), (1, 2, 1)]
