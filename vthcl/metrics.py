"""Recognition / anticipation metrics as EPIC-Kitchens defines them.

* top-k accuracy: the fraction of samples whose label is among the first k
  ranked predictions (epic-kitchens-55-lib ``epic_kitchens/metrics.py``
  ``topk_accuracy``);
* mean top-k recall: for each class present in the labels, the top-k accuracy
  over that class's samples; the mean over those classes
  (epic-kitchens/C3-Action-Anticipation ``evaluate_anticipation_json_ek100.py``,
  ``mean_topk_recall``: the EPIC-100 anticipation challenge's mean top-5 recall);
* the action score of a (verb, noun) pair is the product of their
  probabilities, as in epic-kitchens-55-lib ``epic_kitchens/scoring.py``
  ``compute_action_scores``. That function ranks the pairs of the top 100 verbs
  and nouns; :func:`action_topk` ranks the pairs of the top ``k`` of each, which
  for non-negative probabilities holds the same k best pairs (a pair using a
  verb ranked below k is beaten or tied by the k pairs of that noun with the top
  k verbs, and likewise for nouns). It takes probabilities as given, where
  compute_action_scores softmaxes the top-100 scores first.

Labels are class ids, or (verb, noun) pairs for actions: a [N] label array goes
with [N, k] ranked ids or [N, C] float scores, a [N, 2] one with [N, k, 2] ranked
pairs. Rankings of scores break ties by the lower class id.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

METRIC_KEYS = ("verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5",
               "verb_mt5r", "noun_mt5r", "action_mt5r")


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _hits(predictions, labels, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(hit [N] bool: the label among the first k predictions, labels as an array)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pred, labels = _array(predictions), _array(labels)
    pairs = labels.ndim == 2
    if labels.ndim not in (1, 2) or (pairs and labels.shape[1] != 2):
        raise ValueError(f"labels must be [N] class ids or [N, 2] (verb, noun) pairs, got {labels.shape}")
    if pred.ndim != labels.ndim + 1 or len(pred) != len(labels) or (pairs and pred.shape[2] != 2):
        want = "[N, k, 2] ranked pairs" if pairs else "[N, C] scores or [N, k] ranked ids"
        raise ValueError(f"predictions must be {want} for {len(labels)} labels, got {pred.shape}")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    if not pairs and np.issubdtype(pred.dtype, np.floating):
        pred = np.argsort(-pred, axis=1, kind="stable")  # scores -> ranked ids
    top = pred[:, :k]
    hit = (top == labels[:, None, :]).all(-1) if pairs else top == labels[:, None]
    return hit.any(1), labels


def topk_accuracy(predictions, labels, k: int) -> float:
    """The fraction of samples whose label is among the top ``k`` predictions."""
    hit, _ = _hits(predictions, labels, k)
    return float(hit.mean())


def mean_topk_recall(ranked, labels, k: int = 5) -> float:
    """EPIC-100's mean top-k recall: top-k accuracy per class present in
    ``labels``, averaged over those classes (absent classes do not count)."""
    hit, labels = _hits(ranked, labels, k)
    _, cls = np.unique(labels, axis=0, return_inverse=True)
    cls = cls.reshape(-1)
    per_class = np.bincount(cls, weights=hit) / np.bincount(cls)
    return float(per_class.mean())


def action_topk(verb_probs, noun_probs, k: int = 5) -> np.ndarray:
    """The ``k`` best (verb, noun) pairs per sample by ``p(verb) * p(noun)``:
    [N, k, 2] int64. Only the top min(k, V) verbs and min(k, M) nouns are paired
    (exact for probabilities, see the module docstring), so nothing of size
    N x V x M is built."""
    verb, noun = _array(verb_probs).astype(np.float64), _array(noun_probs).astype(np.float64)
    if verb.ndim != 2 or noun.ndim != 2 or len(verb) != len(noun):
        raise ValueError(f"expected [N, V] and [N, M] probabilities, got {verb.shape} and {noun.shape}")
    if (verb < 0).any() or (noun < 0).any():
        raise ValueError("action_topk needs probabilities (non-negative), not logits")
    if not 1 <= k <= verb.shape[1] * noun.shape[1]:
        raise ValueError(f"k must lie in [1, V * M = {verb.shape[1] * noun.shape[1]}], got {k}")
    top_v = np.argsort(-verb, axis=1, kind="stable")[:, :k]  # [N, kv]
    top_n = np.argsort(-noun, axis=1, kind="stable")[:, :k]  # [N, kn]
    prod = np.take_along_axis(verb, top_v, 1)[:, :, None] * np.take_along_axis(noun, top_n, 1)[:, None, :]
    best = np.argsort(-prod.reshape(len(prod), -1), axis=1, kind="stable")[:, :k]
    vi, ni = np.unravel_index(best, prod.shape[1:])
    return np.stack([np.take_along_axis(top_v, vi, 1), np.take_along_axis(top_n, ni, 1)], -1).astype(np.int64)


def _padded(ranked: list, k: int, pair: bool) -> list:
    """The first k predictions, padded with ids no label has (labels are >= 0)."""
    fill = [-1, -1] if pair else -1
    return list(ranked[:k]) + [fill] * (k - len(ranked))


def _record_problem(r) -> str | None:
    if not isinstance(r, dict):
        return "not an object"
    for key in ("verb", "noun", "verb_top5", "noun_top5", "action_top5"):
        if key not in r:
            return f"no {key!r}"

    def is_id(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0

    if not (is_id(r["verb"]) and is_id(r["noun"])):
        return "verb and noun must be class ids >= 0"
    for key in ("verb_top5", "noun_top5"):
        if not isinstance(r[key], list) or not r[key] or not all(is_id(v) for v in r[key]):
            return f"{key!r} must be a non-empty list of class ids"
    a = r["action_top5"]
    if not isinstance(a, list) or not a or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                                  and all(is_id(v) for v in p) for p in a):
        return "'action_top5' must be a non-empty list of [verb, noun] pairs"
    return None


def anticipation_metrics(records) -> dict:
    """Verb / noun / action top-1, top-5 and mean top-5 recall (fractions) of
    per-segment records ``{"id", "verb", "noun", "verb_top5", "noun_top5",
    "action_top5": [[v, n], ...]}`` (a predictions.jsonl's lines), the action
    label being the (verb, noun) pair. A malformed record is logged with its
    index and id, counted in ``skipped_records`` and left out; ``segments`` is
    the number scored."""
    k = 5
    good, skipped = [], 0
    for i, r in enumerate(records):
        problem = _record_problem(r)
        if problem:
            skipped += 1
            log.warning("record %d (id %r): %s; skipped", i, r.get("id") if isinstance(r, dict) else None, problem)
        else:
            good.append(r)
    if not good:
        raise ValueError(f"no valid records to score ({skipped} skipped)")
    verbs = np.array([r["verb"] for r in good])
    nouns = np.array([r["noun"] for r in good])
    actions = np.stack([verbs, nouns], 1)
    ranked = {"verb": np.array([_padded(r["verb_top5"], k, False) for r in good]),
              "noun": np.array([_padded(r["noun_top5"], k, False) for r in good]),
              "action": np.array([_padded([list(p) for p in r["action_top5"]], k, True) for r in good])}
    labels = {"verb": verbs, "noun": nouns, "action": actions}
    out = {}
    for task in ("verb", "noun", "action"):
        out[f"{task}_top1"] = topk_accuracy(ranked[task], labels[task], 1)
        out[f"{task}_top5"] = topk_accuracy(ranked[task], labels[task], k)
        out[f"{task}_mt5r"] = mean_topk_recall(ranked[task], labels[task], k)
    out = {key: out[key] for key in METRIC_KEYS}
    out.update(segments=len(good), skipped_records=skipped)
    return out
