"""Action detection on AVA (the paper's Table 3a): the slow encoder with an RoI head, the official frame-mAP.

* Model: the slow encoder with res5 dilated (spatial stride 1, dilation 2:
  a stride-16 map; pretrained weights load unchanged) and PySlowFast's
  ``ResNetRoIHead``: the map averaged over all its frames, RoIAlign of each
  box on it (7x7, spatial scale 1/16, sampling ratio 0, aligned), a spatial
  max pool, dropout 0.5 and a linear layer to the action classes; sigmoid
  and binary cross-entropy against the multi-hot labels.
* Training boxes, per keyframe: the ground-truth boxes, plus the person
  proposals scoring at least ``score_thresh`` that overlap a ground-truth
  box by IoU >= 0.9, with that box's labels; proposals that carry labels of
  their own (PySlowFast's "include negative" files) are taken as they are.
* Test boxes: the proposals scoring at least ``score_thresh`` (a keyframe
  with none keeps its best one), scored for every class of the label map:
  ``detections.csv`` in the official format (``video_id, sec, x1, y1, x2, y2,
  action_id, score``, the proposals' own coordinates), scored by
  :mod:`vthcl.ava_eval` against the keyframes' ground truth.

Clips come from an AVA event dataset (make_shards ``--layout ava``; see
:mod:`loaders.events`): the keyframe's window, a random crop in training and
the whole frame in evaluation, boxes normalised to the clip as yielded.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vthcl import ava_eval, options
from vthcl import eval as _eval  # (the modes register with vthcl.eval, which imports this module)
from vthcl.model import Pathway
from vthcl.roi_align import RoIAlign

log = logging.getLogger(__name__)

PROPOSAL_IOU = 0.9  # a training proposal takes the labels of a ground-truth box it overlaps this much


class RoIHead(nn.Module):
    """PySlowFast's ResNetRoIHead for one pathway: temporal average pool over
    all frames, RoIAlign, spatial max pool, dropout, linear."""

    def __init__(self, dim_in: int, num_classes: int, resolution: int = 7, spatial_scale: float = 1 / 16,
                 dropout: float = 0.5, aligned: bool = True):
        super().__init__()
        self.roi_align = RoIAlign((resolution, resolution), spatial_scale=spatial_scale, sampling_ratio=0,
                                  aligned=aligned)
        self.spatial_pool = nn.MaxPool2d(resolution, stride=1)
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(dim_in, num_classes)

    def forward(self, fmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """fmap [B, C, T, H, W], boxes [K, 5] (clip index, x1, y1, x2, y2 in input pixels) -> logits [K, classes]."""
        x = fmap.mean(dim=2)
        x = self.spatial_pool(self.roi_align(x, boxes)).flatten(1)
        return self.projection(self.dropout(x))


class Detector(nn.Module):
    """The slow encoder (res5 dilated) and the RoI head on its res5 map."""

    def __init__(self, encoder: Pathway, num_classes: int, dropout: float = 0.5):
        super().__init__()
        if encoder.res5_dilation != 2:
            raise ValueError("the detector's encoder needs res5_dilation=2 (a stride-16 res5 map)")
        self.encoder = encoder
        self.head = RoIHead(encoder.dims["res5"], num_classes, dropout=dropout)

    def forward(self, clips: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(clips)["res5"], boxes)


def dilated(encoder: Pathway) -> Pathway:
    """``encoder`` rebuilt with res5 dilated, its weights (the same tensors) loaded unchanged."""
    out = Pathway(encoder.arch, encoder.stem[0].out_channels, slow=encoder.slow, residual=encoder.residual,
                  res5_dilation=2)
    out.load_state_dict(encoder.state_dict())
    return out


def pixel_boxes(boxes: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Boxes normalised to their clips [K, 4] -> [K, 5] (clip index, x1, y1, x2, y2 in pixels)."""
    hw = sizes[index].to(boxes.dtype)
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)
    return torch.cat([index[:, None].to(boxes.dtype), boxes * scale], 1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of [N, 4] and [M, 4] boxes (x1, y1, x2, y2)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-12)


def training_boxes(batch: dict, score_thresh: float, labelled_proposals: bool) -> tuple[torch.Tensor, ...]:
    """(boxes [K, 4], clip index [K], labels [K, A]) to train on: every
    ground-truth box, and the confident proposals with the labels of the
    ground-truth box they overlap by IoU >= 0.9 (or their own labels, where
    the proposals file carries them)."""
    boxes, index, labels = [batch["boxes"]], [batch["box_batch"]], [batch["box_labels"]]
    keep = batch["proposal_scores"] >= score_thresh
    props, pidx = batch["proposals"][keep], batch["proposal_batch"][keep]
    if labelled_proposals:
        boxes.append(props)
        index.append(pidx)
        labels.append(batch["proposal_labels"][keep])
    elif len(props) and len(batch["boxes"]):
        iou = box_iou(props, batch["boxes"])
        iou[pidx[:, None] != batch["box_batch"][None, :]] = -1  # only boxes of the same keyframe
        best, which = iou.max(1)
        take = best >= PROPOSAL_IOU
        boxes.append(props[take])
        index.append(pidx[take])
        labels.append(batch["box_labels"][which[take]])
    return torch.cat(boxes), torch.cat(index), torch.cat(labels)


def test_boxes(batch: dict, score_thresh: float) -> torch.Tensor:
    """Indices of the proposals to score: those at least ``score_thresh``, or a keyframe's best where none is."""
    scores, index = batch["proposal_scores"], batch["proposal_batch"]
    keep = scores >= score_thresh
    for i in range(len(batch["event"])):
        mine = index == i
        if mine.any() and not (keep & mine).any():
            keep[torch.nonzero(mine).flatten()[scores[mine].argmax()]] = True
    return torch.nonzero(keep).flatten()


def step(score_thresh: float, labelled_proposals: bool):
    """The detection task's training step for :func:`vthcl.downstream.fit`."""
    def loss_of(model, batch):
        boxes, index, labels = training_boxes(batch, score_thresh, labelled_proposals)
        if len(boxes) == 0:  # a batch without a box: nothing to learn from, a zero loss keeps DDP in step
            return sum(p.sum() * 0 for p in model.parameters()), {"boxes": 0}
        logits = model(batch["slow"], pixel_boxes(boxes, index, batch["size"]))
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return loss, {"boxes": len(boxes)}
    return loss_of


@torch.no_grad()
def detect(model: Detector, loader, events: list[dict], classes: list[int], score_thresh: float) -> list[tuple]:
    """``(event, row)`` for this rank's keyframes, ``row`` in the official format ``(video_id, sec, x1, y1, x2,
    y2, action_id, score)``: every test proposal (its own coordinates) x every evaluated class."""
    model.eval()
    rows, seen = [], set()
    for batch in loader:
        fresh = []  # (a rank's padding repeats an event, in this batch or a later one)
        for e in batch["event"].tolist():
            fresh.append(e not in seen)
            seen.add(e)
        take = test_boxes(batch, score_thresh)
        take = take[torch.tensor(fresh, dtype=torch.bool)[batch["proposal_batch"][take]]] if len(take) else take
        if len(take) == 0:
            continue
        index = batch["proposal_batch"][take]
        probs = torch.sigmoid(model(batch["slow"], pixel_boxes(batch["proposals"][take], index, batch["size"])))
        probs = probs.float().cpu().numpy()
        for k, (p, i) in enumerate(zip(take.tolist(), index.tolist())):
            e = int(batch["event"][i])
            event = events[e]
            n = p - int(torch.nonzero(batch["proposal_batch"] == i).flatten()[0])  # the proposal's place in its event
            box = event["proposals"][n]["box"]
            for c in classes:
                rows.append((e, (event["video_id"], int(round(event["time"])), *box, c, float(probs[k, c - 1]))))
    return rows


def write_detections(rows: list[tuple], path: Path) -> None:
    """``rows`` as the official detections CSV (no header; boxes and scores with 3 and 6 decimals)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        for video, sec, x1, y1, x2, y2, action, score in sorted(rows, key=lambda r: (r[0], r[1], r[6], -r[7])):
            w.writerow([video, f"{sec:04d}", f"{x1:.3f}", f"{y1:.3f}", f"{x2:.3f}", f"{y2:.3f}", action,
                        f"{score:.6f}"])


def groundtruth(events: list[dict], class_ids: set[int]) -> ava_eval.Boxes:
    """The keyframes' ground-truth boxes (as :func:`ava_eval.read_boxes` reads a ground-truth CSV)."""
    out = ava_eval.Boxes()
    for e in events:
        key = ava_eval.frame_key(e["video_id"], e["time"])
        for b in e["boxes"]:
            for a in b["actions"]:
                if a in class_ids:
                    x1, y1, x2, y2 = b["box"]
                    ava_eval.append(out, key, (1.0, a, y1, x1, y2, x2))
    return out


def score(detections_csv: Path, events: list[dict], categories: list[dict]) -> dict:
    """The frame-mAP of a detections file against the events' ground truth (the label map's classes only)."""
    ids = {int(c["id"]) for c in categories}
    dets = ava_eval.read_boxes(detections_csv, ids, capacity=ava_eval.DETECTION_CAPACITY, detections=True)
    return ava_eval.frame_map(groundtruth(events, ids), dets, categories)


def class_list(categories: list[dict]) -> list[int]:
    return sorted(int(c["id"]) for c in categories)


# ----------------------------------------------------------------------------- vthcl.eval detect, ava-map
TAKES = ("init", "checkpoint", "random_init", "trust_checkpoint", "train", "val", "out", "arch", "width", "backend",
         "batch_size", "epochs", "max_steps", "lr", "momentum", "weight_decay", "milestones", "warmup_epochs",
         "warmup_start_lr", "dropout", "detection_score_thresh", "eval_short_side", "crop_size", "tau", "alpha",
         "slow_frames", "labelmap", "workers", "seed", "device", "resume", "log_every")
# the paper's AVA recipe (PySlowFast's): 24 epochs, lr 0.1 warmed up over 5 epochs, x0.1 at 16 and 22, weight
# decay 1e-7; the slow clip alone (8 frames at tau 8: alpha 1 decodes no other frame)
RECIPE = {"epochs": 24, "batch_size": 64, "lr": 0.1, "milestones": [16, 22], "warmup_epochs": 5.0,
          "warmup_start_lr": 0.000125, "weight_decay": 1e-7, "alpha": 1, "crop_size": 224, "out": "runs/detect"}


def _categories(cfg, info: dict) -> list[dict]:
    if cfg.labelmap:
        from shard_tools.annotations import read_labelmap
        return read_labelmap(cfg.labelmap)[0]
    if not info.get("actions"):
        raise options.UsageError(f"{cfg.train}: its manifest names no action classes: give --labelmap")
    return info["actions"]


@_eval.mode("detect", "AVA action detection: the slow encoder (res5 dilated) with an RoI head, frame-mAP",
            takes=TAKES, recipe=RECIPE)
def detect_mode(cfg: options.Config) -> dict:
    from vthcl import downstream
    job = downstream.start(cfg, "ava", "AVA shards (make_shards --layout ava)",
                           val_sampling={"eval_short_side": cfg.eval_short_side})
    info, val_events = job.info, job.val_events
    categories = _categories(cfg, info)
    model = Detector(dilated(job.encoder), info["num_actions"], cfg.dropout)
    last = job.fit(model, step(cfg.detection_score_thresh, bool(info.get("proposals_labelled"))))
    found = downstream.gather(detect(model, job.val, val_events, class_list(categories), cfg.detection_score_thresh),
                              key=lambda r: r[0])
    result = job.result(last, ("epochs", "batch_size", "lr", "milestones", "warmup_epochs", "weight_decay",
                               "detection_score_thresh", "eval_short_side", "crop_size", "tau", "alpha",
                               "slow_frames"))
    if job.rank == 0:
        path = Path(cfg.out) / "detections.csv"
        write_detections([row for _, row in found], path)
        scored = score(path, val_events, categories)
        result.update(mAP=scored["mAP"], per_class={str(k): v for k, v in scored["per_class"].items()},
                      detections=str(path), keyframes=len(val_events))
        log.info("frame-mAP@0.5 %s over %d classes", scored["mAP"], len(categories))
    return result


@_eval.mode("ava-map", "ActivityNet's AVA frame-mAP@0.5IOU of a detections CSV against the ground truth",
            takes=("groundtruth", "detections", "labelmap", "exclusions", "out"), recipe={"out": "runs/ava-map"},
            required=("groundtruth", "detections", "labelmap"))
def ava_map_mode(cfg: options.Config) -> dict:
    try:
        scored = ava_eval.score_files(cfg.groundtruth, cfg.detections, cfg.labelmap, cfg.exclusions)
    except (OSError, ValueError) as e:
        raise options.UsageError(str(e)) from None
    scored["per_class"] = {str(k): v for k, v in scored["per_class"].items()}
    for key in ("names", "num_groundtruth", "num_detections"):
        scored[key] = {str(k): v for k, v in scored[key].items()}
    log.info("frame-mAP@0.5 %s", scored["mAP"])
    return scored
