"""Action anticipation on EPIC-Kitchens (the paper's Table 3b): verb and noun one second ahead.

* Model: the slow encoder, global average pooling, a shared MLP (fc, ReLU,
  dropout) and two linear heads, the verb's and the noun's (class counts
  from the annotations: EPIC-55 125 and 352, EPIC-100 97 and 300);
  cross-entropy on both.
* Clips: the ``tau_o`` seconds of video that end ``tau_a`` seconds before
  each segment starts (1 and 1, the paper's), from an EPIC event dataset
  (make_shards ``--layout epic``; :class:`loaders.sampling.ObservedClips`).
* Output: one record per segment — its id, the true verb and noun, the five
  best verbs, nouns and (verb, noun) actions (an action's score is the
  product of its verb's and noun's probabilities) — from which
  :func:`vthcl.metrics.anticipation_metrics` computes top-1/top-5 accuracy
  and EPIC-100's mean top-5 recall.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vthcl import eval as _eval  # (the mode registers with vthcl.eval, which imports this module)
from vthcl import options
from vthcl.metrics import action_topk, anticipation_metrics
from vthcl.model import Pathway

log = logging.getLogger(__name__)


class Anticipator(nn.Module):
    """The slow encoder, a shared MLP and the verb and noun heads."""

    def __init__(self, encoder: Pathway, verbs: int, nouns: int, hidden: int = 512, dropout: float = 0.5):
        super().__init__()
        if verbs < 1 or nouns < 1:
            raise ValueError(f"anticipation needs verb and noun classes (got {verbs} and {nouns})")
        self.encoder = encoder
        dim = encoder.dims["res5"]
        self.shared = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.verb = nn.Linear(hidden, verbs)
        self.noun = nn.Linear(hidden, nouns)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.shared(self.encoder(clips)["res5"].mean(dim=(2, 3, 4)))
        return self.verb(x), self.noun(x)


def step(model, batch):
    """The anticipation task's training step for :func:`vthcl.downstream.fit`: CE on verb and noun
    (segments without a class, -1, are left out of its term)."""
    verb, noun = model(batch["slow"])
    loss = F.cross_entropy(verb, batch["verb"], ignore_index=-1) + F.cross_entropy(noun, batch["noun"],
                                                                                   ignore_index=-1)
    return loss, {}


@torch.no_grad()
def predict(model: Anticipator, loader, events: list[dict], k: int = 5) -> list[dict]:
    """One record per segment of this rank (a padding repeat once): id, true verb and noun, the k best
    verbs, nouns and actions, best first."""
    model.eval()
    records, seen = [], set()
    for batch in loader:
        verb, noun = model(batch["slow"])
        pv, pn = verb.float().softmax(1), noun.float().softmax(1)
        top_v = pv.topk(min(k, pv.shape[1]), 1).indices.tolist()
        top_n = pn.topk(min(k, pn.shape[1]), 1).indices.tolist()
        actions = action_topk(pv, pn, k).tolist()
        for i, e in enumerate(batch["event"].tolist()):
            if e in seen:
                continue
            seen.add(e)
            event = events[e]
            records.append({"event": e, "id": event["id"], "verb": event["verb_class"], "noun": event["noun_class"],
                            "verb_top5": top_v[i], "noun_top5": top_n[i], "action_top5": actions[i]})
    return records


# ----------------------------------------------------------------------------- vthcl.eval anticipate
TAKES = ("init", "checkpoint", "random_init", "trust_checkpoint", "train", "val", "out", "arch", "width", "backend",
         "batch_size", "epochs", "max_steps", "lr", "momentum", "weight_decay", "milestones", "warmup_epochs",
         "warmup_start_lr", "dropout", "hidden", "tau_a", "tau_o", "crop_size", "tau", "alpha", "slow_frames",
         "workers", "seed", "device", "resume", "log_every")
# the paper's EPIC recipe: 80 epochs, lr 0.1 divided by 10 at 40 and 60; the slow clip alone (8 frames spread
# over the observed second: alpha 1 decodes no other frame)
RECIPE = {"epochs": 80, "batch_size": 64, "lr": 0.1, "milestones": [40, 60], "alpha": 1, "crop_size": 224,
          "out": "runs/anticipate"}


@_eval.mode("anticipate", "EPIC-Kitchens action anticipation: verb and noun tau_a seconds ahead of tau_o observed",
            takes=TAKES, recipe=RECIPE)
def anticipate_mode(cfg: options.Config) -> dict:
    from vthcl import downstream
    sampling = {"tau_a": cfg.tau_a, "tau_o": cfg.tau_o}
    job = downstream.start(cfg, "epic", "EPIC-Kitchens shards (make_shards --layout epic)", sampling, sampling)
    info = job.info
    model = Anticipator(job.encoder, info["verb_classes"], info["noun_classes"], cfg.hidden, cfg.dropout)
    last = job.fit(model, step)
    records = sorted(downstream.gather(predict(model, job.val, job.val_events), key=lambda r: r["event"]),
                     key=lambda r: r["event"])
    result = job.result(last, ("epochs", "batch_size", "lr", "milestones", "weight_decay", "tau_a", "tau_o",
                               "crop_size", "tau", "alpha", "slow_frames"))
    result.update(verb_classes=info["verb_classes"], noun_classes=info["noun_classes"], columns=info.get("columns"))
    if job.rank == 0:
        path = Path(cfg.out) / "predictions.jsonl"
        path.write_text("".join(json.dumps({k: r[k] for k in ("id", "verb", "noun", "verb_top5", "noun_top5",
                                                              "action_top5")}) + "\n" for r in records))
        result.update(anticipation_metrics(records), predictions=str(path))
        log.info("verb top-1 %.3f, noun top-1 %.3f, action top-1 %.3f", result["verb_top1"], result["noun_top1"],
                 result["action_top1"])
    return result
