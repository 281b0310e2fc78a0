"""Event datasets: time-anchored samples in long videos (``events.jsonl``).

make_shards' ``--layout ava`` and ``--layout epic`` pack each long video once
and write one JSON line per event beside the shards (see the README). A
loader over such a dataset yields one clip per event, chosen by the event's
time (see :mod:`loaders.sampling`), and the contract's keys plus:

- ``event`` int64 [B] (the event's row in events.jsonl), ``time`` float64 [B]
  (its time on the annotations' clock), ``size`` int64 [B, 2] (the clip's
  height and width before any padding: evaluation batches of whole frames
  are padded to the largest);
- AVA: ``boxes`` float32 [N, 4] (x1, y1, x2, y2 of the keyframe's ground-truth
  boxes, normalised to the clip as yielded: cropped, mirrored),
  ``box_labels`` float32 [N, A] (multi-hot: action id a is column a - 1),
  ``box_batch`` int64 [N] (the clip each box belongs to), and the same for
  the person proposals: ``proposals`` [M, 4], ``proposal_scores`` [M],
  ``proposal_labels`` [M, A] (zeros unless the proposals file carried
  labels), ``proposal_batch`` [M];
- EPIC: ``verb`` and ``noun`` int64 [B] (-1 where the file has none).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from loaders.sampling import Crop
from loaders.shards import Shards

TASKS = ("ava", "epic")


class EventTable:
    """The events of a dataset, with what a batch needs of each."""

    def __init__(self, shards: Shards):
        manifest = shards.manifest
        self.task = manifest.get("task")
        if self.task not in TASKS:
            raise ValueError(f"not an event dataset (its manifest has task {self.task!r})")
        self.info = manifest.get("event_info", {})
        root = os.path.dirname(shards.tars[0])
        path = os.path.join(root, manifest.get("events_file", "events.jsonl"))
        try:
            with open(path, encoding="utf-8") as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot read the events of {root}: {path}: {e}") from None
        if len(self.rows) != manifest.get("events", len(self.rows)):
            raise ValueError(f"{path} holds {len(self.rows)} events, its manifest says {manifest['events']}")
        if not self.rows:
            raise ValueError(f"{path}: the dataset holds no events")
        self.video = np.array([r["index"] for r in self.rows], np.int64)
        self.time = np.array([r["time"] for r in self.rows], np.float64)
        self.num_actions = int(self.info.get("num_actions", 0))

    def __len__(self) -> int:
        return len(self.rows)

    def _multi_hot(self, actions: list[list[int]]) -> torch.Tensor:
        out = torch.zeros(len(actions), self.num_actions)
        for i, ids in enumerate(actions):
            for a in ids:
                if 1 <= a <= self.num_actions:
                    out[i, a - 1] = 1
        return out

    def fields(self, events: list[int], crops: list[Crop], crop_size: int) -> dict[str, torch.Tensor]:
        """The task's fields of a batch of clips (``events[i]`` taken with ``crops[i]``)."""
        out = {"event": torch.tensor(events, dtype=torch.int64),
               "time": torch.from_numpy(self.time[np.asarray(events, np.int64)]),
               "size": torch.tensor([c.shape(crop_size) for c in crops], dtype=torch.int64).reshape(-1, 2)}
        rows = [self.rows[e] for e in events]
        if self.task == "epic":
            out["verb"] = torch.tensor([r["verb_class"] for r in rows], dtype=torch.int64)
            out["noun"] = torch.tensor([r["noun_class"] for r in rows], dtype=torch.int64)
            return out
        for name, key in (("boxes", "boxes"), ("proposals", "proposals")):
            boxes, actions, batch, scores = [], [], [], []
            for i, (row, crop) in enumerate(zip(rows, crops)):
                items = row[key]
                if items:
                    boxes.append(crop.boxes(np.array([b["box"] for b in items]), crop_size))
                actions += [b["actions"] for b in items]
                batch += [i] * len(items)
                scores += [b.get("score", 1.0) for b in items]
            prefix = "box" if name == "boxes" else "proposal"
            out[name] = torch.from_numpy(np.concatenate(boxes)) if boxes else torch.zeros(0, 4)
            out[f"{prefix}_labels"] = self._multi_hot(actions)
            out[f"{prefix}_batch"] = torch.tensor(batch, dtype=torch.int64)
            if name == "proposals":
                out["proposal_scores"] = torch.tensor(scores, dtype=torch.float32)
        return out
