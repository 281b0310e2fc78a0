"""AVA frame-mAP (``PascalBoxes_Precision/mAP@0.5IOU``) as the ActivityNet evaluator computes it.

A compact numpy reimplementation of PySlowFast's copy of the ActivityNet / TF
object-detection evaluator: ``slowfast/utils/ava_eval_helper.py`` (read_csv,
read_exclusions, read_labelmap, run_evaluation) and ``ava_evaluation/``
(object_detection_evaluation.py, per_image_evaluation.py, metrics.py,
np_box_ops.py, label_map_util.py), plus the per-frame detection capacity of
ActivityNet's ``Evaluation/get_ava_performance.py`` read_csv (a min-heap that
keeps the 50 best-scored detections of a frame across classes, then sorts them
by descending score).

What is scored, as in that code:

* a frame key is ``"%s,%04d" % (video_id, int(sec))``; boxes are stored as
  ``[y1, x1, y2, x2]``; rows whose action is not in the label map are dropped;
* excluded frames are dropped from ground truth and detections;
* per frame, detections with ``x1 >= x2`` or ``y1 >= y2`` are removed (neither
  true nor false positives; they still took a capacity slot);
* per class and frame, detections in descending score order take the
  ground-truth box of highest IoU (plain area ratio, no +1); a true positive if
  that IoU is >= 0.5 and the box is not yet taken, else a false positive (the
  VOC rule: no fallback to the next-best box). Detections on a frame without
  ground truth of their class, or without ground truth at all, are false
  positives. AVA marks no box difficult or group-of, so no detection is ignored;
* per class, precision/recall over the scores sorted the same way numpy sorts
  them there, VOC AP (precision made monotone from the right, summed over recall
  steps); a class without ground truth has no AP (NaN there, ``None`` here);
  mAP is the mean over the classes that have ground truth.

Where the official code asserts or crashes (wrong column count, a timestamp or
number that does not parse, a non-finite value, a detection without a score),
the row is logged with ``file:line`` and the reason, counted, and skipped.
Boxes outside [0, 1] are scored as given, as the official reader does.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shard_tools.annotations import csv_rows, finite, read_labelmap

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
DETECTION_CAPACITY = 50  # get_ava_performance.py: read_csv(detections, class_whitelist, 50)
_LOGGED_BAD_ROWS = 20  # per file; the rest are summarised in one line


@dataclass
class Boxes:
    """Frame key -> parallel lists, as the official read_csv returns them."""
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)  # [y1, x1, y2, x2]
    labels: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    skipped_rows: int = 0


def frame_key(video_id: str, sec) -> str:
    return "%s,%04d" % (video_id, int(sec))


# ----------------------------------------------------------------------------- readers
class _BadRows:
    """Logs bad rows of one file with their line and reason, and counts them."""

    def __init__(self, path):
        self.path, self.count = path, 0

    def __call__(self, line: int, reason: str) -> None:
        self.count += 1
        if self.count <= _LOGGED_BAD_ROWS:
            log.warning("%s:%d: %s; row skipped", self.path, line, reason)

    def summary(self) -> int:
        if self.count > _LOGGED_BAD_ROWS:
            log.warning("%s: %d bad rows skipped in all (the first %d are logged above)", self.path, self.count,
                        _LOGGED_BAD_ROWS)
        return self.count


def _read_exclusions(path) -> tuple[set[str], int]:
    bad, excluded = _BadRows(path), set()
    for line, row in csv_rows(path):
        if len(row) != 2:
            bad(line, f"expected 2 columns (video_id, sec), got {len(row)}")
            continue
        try:
            excluded.add(frame_key(row[0], int(row[1])))
        except ValueError:
            bad(line, f"timestamp {row[1]!r} is not an integer")
    return excluded, bad.summary()


def read_exclusions(path) -> set[str]:
    """Frame keys of an exclusions CSV (``video_id,sec`` rows)."""
    return _read_exclusions(path)[0]


def read_boxes(path, class_ids: set[int] | None = None, capacity: int | None = None,
               detections: bool = False) -> Boxes:
    """Read an AVA CSV: ``video_id, sec, x1, y1, x2, y2, action_id[, col8]``.

    Column 8 is the score when ``detections`` (required then) and is ignored
    otherwise (the person id of ground truth). Actions outside ``class_ids``
    are dropped (an empty or None set keeps all). Two-column rows (a frame with
    no boxes) are accepted and add nothing. With ``capacity``, each frame keeps
    its ``capacity`` best-scored boxes across classes through the official
    min-heap (no limit when < 1), listed by descending score; with None, rows
    stay in file order."""
    bad, heaps, out = _BadRows(path), {}, Boxes()
    for line, row in csv_rows(path):
        if len(row) == 2:
            try:
                int(row[1])
            except ValueError:
                bad(line, f"timestamp {row[1]!r} is not an integer")
            continue
        if len(row) not in (7, 8):
            bad(line, f"expected 7 or 8 columns, got {len(row)}")
            continue
        if detections and len(row) != 8:
            bad(line, "a detection row needs its score in column 8")
            continue
        try:
            key = frame_key(row[0], int(row[1]))
        except ValueError:
            bad(line, f"timestamp {row[1]!r} is not an integer")
            continue
        try:
            x1, y1, x2, y2 = (finite(v) for v in row[2:6])
            action = int(row[6])
            score = finite(row[7]) if detections else 1.0
        except ValueError as e:
            bad(line, f"not a number: {e}")
            continue
        if class_ids and action not in class_ids:
            continue
        entry = (score, action, y1, x1, y2, x2)
        if capacity is None:
            append(out, key, entry)
            continue
        heap = heaps.setdefault(key, [])
        if capacity < 1 or len(heap) < capacity:
            heapq.heappush(heap, entry)
        elif score > heap[0][0]:
            heapq.heapreplace(heap, entry)
    for key, heap in heaps.items():
        for entry in sorted(heap, key=lambda e: -e[0]):
            append(out, key, entry)
    out.skipped_rows = bad.summary()
    return out


def append(out: Boxes, key: str, entry: tuple) -> None:
    """Add a box to frame ``key`` of ``out``: ``entry`` is (score, action, y1, x1, y2, x2)."""
    score, action, y1, x1, y2, x2 = entry
    out.boxes.setdefault(key, []).append([y1, x1, y2, x2])
    out.labels.setdefault(key, []).append(action)
    out.scores.setdefault(key, []).append(score)


# ----------------------------------------------------------------------------- scoring
def iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [N, 4] and [M, 4] boxes ([y1, x1, y2, x2]), np_box_ops.iou."""
    y1a, x1a, y2a, x2a = np.split(boxes1, 4, axis=1)
    y1b, x1b, y2b, x2b = (c.T for c in np.split(boxes2, 4, axis=1))
    heights = np.maximum(0.0, np.minimum(y2a, y2b) - np.maximum(y1a, y1b))
    widths = np.maximum(0.0, np.minimum(x2a, x2b) - np.maximum(x1a, x1b))
    inter = heights * widths
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area1[:, None] + area2[None, :] - inter)


def voc_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """metrics.compute_average_precision: precision made non-increasing from the
    right, summed over the points where recall changes."""
    if precision.size == 0:
        return 0.0
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def _true_positives(det: np.ndarray, gt: np.ndarray, threshold: float) -> np.ndarray:
    """per_image_evaluation._compute_tp_fp_for_single_class without difficult or
    group-of boxes: each detection, in order, takes its highest-IoU box."""
    tp = np.zeros(len(det), dtype=bool)
    if len(gt) == 0:
        return tp
    overlaps = iou(det, gt)
    best = np.argmax(overlaps, axis=1)
    taken = np.zeros(len(gt), dtype=bool)
    for i, g in enumerate(best):
        if overlaps[i, g] >= threshold and not taken[g]:
            tp[i] = taken[g] = True
    return tp


def _arrays(data, key: str, with_scores: bool):
    boxes = np.asarray(data.boxes[key], dtype=float).reshape(-1, 4)
    labels = np.asarray(data.labels[key], dtype=int)
    scores = np.asarray(data.scores[key], dtype=float) if with_scores else None
    return boxes, labels, scores


def frame_map(groundtruth: Boxes, detections: Boxes, categories: list[dict], exclusions=(),
              iou_threshold: float = IOU_THRESHOLD) -> dict:
    """Frame-mAP of ``detections`` against ``groundtruth`` (both :class:`Boxes`)
    over the label map's ``categories``; frame keys in ``exclusions`` are dropped.

    Returns ``{"mAP": float | None, "per_class": {id: AP | None}, "names": {id: name},
    "num_groundtruth": {id: n}, "num_detections": {id: n}}`` (fractions; mAP is None
    when no class has ground truth)."""
    ids = sorted({int(c["id"]) for c in categories})
    if not ids or ids[0] < 1:
        raise ValueError("categories need ids >= 1")
    gt = {}
    for key in groundtruth.boxes:
        if key in exclusions:
            log.info("excluded frame %s in the ground truth is ignored", key)
            continue
        boxes, labels, _ = _arrays(groundtruth, key, False)
        keep = np.isin(labels, ids)
        gt[key] = boxes[keep], labels[keep]
    num_gt = {c: int(sum(np.sum(labels == c) for _, labels in gt.values())) for c in ids}

    scores_per_class = {c: [] for c in ids}
    tp_per_class = {c: [] for c in ids}
    empty = (np.zeros((0, 4)), np.zeros(0, dtype=int))
    for key in detections.boxes:
        if key in exclusions:
            log.info("excluded frame %s in the detections is ignored", key)
            continue
        boxes, labels, scores = _arrays(detections, key, True)
        keep = np.isin(labels, ids) & (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
        order = np.argsort(-scores[keep], kind="stable")  # the reader's order already; kept when tied
        boxes, labels, scores = boxes[keep][order], labels[keep][order], scores[keep][order]
        gt_boxes, gt_labels = gt.get(key, empty)
        for c in np.unique(labels).tolist():
            mine = labels == c
            scores_per_class[c].append(scores[mine])
            tp_per_class[c].append(_true_positives(boxes[mine], gt_boxes[gt_labels == c], iou_threshold))

    per_class, num_det = {}, {}
    for c in ids:
        scores = np.concatenate(scores_per_class[c]) if scores_per_class[c] else np.zeros(0)
        tp = np.concatenate(tp_per_class[c]) if tp_per_class[c] else np.zeros(0, dtype=bool)
        num_det[c] = len(scores)
        if num_gt[c] == 0:
            per_class[c] = None
            continue
        # metrics.compute_precision_recall's ordering, so that tied scores rank as there
        hits = tp[np.argsort(scores)[::-1]].astype(int)
        cum_tp = np.cumsum(hits)
        precision = cum_tp.astype(float) / np.arange(1, len(hits) + 1)
        recall = cum_tp.astype(float) / num_gt[c]
        per_class[c] = voc_ap(precision, recall)
    missing = [c for c in ids if per_class[c] is None]
    if missing:
        log.info("classes without ground truth (left out of the mean): %s", missing)
    aps = [ap for ap in per_class.values() if ap is not None]
    return {"mAP": float(np.mean(aps)) if aps else None, "per_class": per_class,
            "names": {int(c["id"]): c["name"] for c in categories}, "num_groundtruth": num_gt,
            "num_detections": num_det}


def score_files(groundtruth_csv, detections_csv, labelmap, exclusions=None,
                capacity: int = DETECTION_CAPACITY) -> dict:
    """Frame-mAP from the official files: :func:`frame_map`'s result plus
    ``skipped_rows`` (bad rows of all three CSVs) and the file names."""
    categories, class_ids = read_labelmap(labelmap)
    excluded, skipped = _read_exclusions(exclusions) if exclusions else (set(), 0)
    groundtruth = read_boxes(groundtruth_csv, class_ids)
    detections = read_boxes(detections_csv, class_ids, capacity=capacity, detections=True)
    result = frame_map(groundtruth, detections, categories, excluded)
    result["skipped_rows"] = skipped + groundtruth.skipped_rows + detections.skipped_rows
    result["files"] = {"groundtruth": str(Path(groundtruth_csv)), "detections": str(Path(detections_csv)),
                       "labelmap": str(Path(labelmap)), "exclusions": str(Path(exclusions)) if exclusions else None}
    return result
