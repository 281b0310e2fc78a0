"""vthcl.metrics: hand-worked EPIC-Kitchens top-k, mean top-k recall and action scores."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vthcl.metrics import METRIC_KEYS, action_topk, anticipation_metrics, mean_topk_recall, topk_accuracy


def test_topk_accuracy_from_scores_and_from_ranked_ids():
    scores = np.array([[0.1, 0.5, 0.4],     # ranks 1, 2, 0; label 2 -> rank 2
                       [0.7, 0.2, 0.1],     # ranks 0, 1, 2; label 0 -> rank 1
                       [0.25, 0.35, 0.4]])  # ranks 2, 1, 0; label 0 -> rank 3
    labels = np.array([2, 0, 0])
    # top-1: only row 1 -> 1/3; top-2: rows 0, 1 -> 2/3; top-3: all.
    assert [topk_accuracy(scores, labels, k) for k in (1, 2, 3)] == [1 / 3, 2 / 3, 1.0]
    ranked = np.array([[1, 2, 0], [0, 1, 2], [2, 1, 0]])
    assert [topk_accuracy(ranked, labels, k) for k in (1, 2, 3)] == [1 / 3, 2 / 3, 1.0]
    assert topk_accuracy(torch.tensor(scores), torch.tensor(labels), 2) == 2 / 3
    with pytest.raises(ValueError, match="predictions must be"):
        topk_accuracy(ranked[:2], labels, 1)


def test_mean_topk_recall_averages_over_the_classes_present():
    labels = np.array([0, 0, 0, 1, 2])
    ranked = np.array([[0, 3, 4, 5, 6],    # class 0: hit
                       [3, 4, 5, 6, 0],    # class 0: hit (5th)
                       [3, 4, 5, 6, 7],    # class 0: miss
                       [3, 1, 0, 2, 4],    # class 1: hit
                       [3, 4, 5, 6, 7]])   # class 2: miss
    # Per class 2/3, 1, 0 -> (2/3 + 1 + 0) / 3 = 5/9; class 3 is predicted everywhere but is never a
    # label, so it does not enter the mean (as a 0 it would give 5/12). Plain top-5 accuracy: 3/5.
    assert mean_topk_recall(ranked, labels, 5) == pytest.approx(5 / 9)
    assert topk_accuracy(ranked, labels, 5) == pytest.approx(3 / 5)
    # k = 1: class 0 -> 1/3, class 1 -> 0, class 2 -> 0 -> 1/9.
    assert mean_topk_recall(ranked, labels, 1) == pytest.approx(1 / 9)


def test_pairs_match_as_pairs():
    labels = np.array([[1, 2], [1, 2], [0, 3]])
    ranked = np.array([[[0, 0], [1, 1], [2, 2], [1, 2], [5, 5]],   # (1, 2) 4th: top-5 hit
                       [[2, 1], [1, 3], [0, 2], [4, 4], [5, 5]],   # verb 1 and noun 2 appear, the pair not
                       [[0, 3], [1, 2], [2, 2], [3, 3], [4, 4]]])  # top-1 hit
    assert topk_accuracy(ranked, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(ranked, labels, 5) == pytest.approx(2 / 3)
    # (1, 2): 1 of 2; (0, 3): 1 of 1 -> (.5 + 1) / 2.
    assert mean_topk_recall(ranked, labels, 5) == pytest.approx(0.75)


def test_action_topk_by_hand():
    verb = np.array([[0.6, 0.4]])
    noun = np.array([[0.5, 0.35, 0.15]])
    # Products: (0,0) .30, (0,1) .21, (1,0) .20, (1,1) .14, (0,2) .09, (1,2) .06.
    assert action_topk(verb, noun, 4).tolist() == [[[0, 0], [0, 1], [1, 0], [1, 1]]]
    with pytest.raises(ValueError, match="probabilities"):
        action_topk(np.log(verb), noun, 2)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_action_topk_matches_the_full_product(k):
    rng = np.random.default_rng(k)
    verb = rng.dirichlet(np.ones(7), size=6)
    noun = rng.dirichlet(np.ones(9) * 0.3, size=6)
    full = (verb[:, :, None] * noun[:, None, :]).reshape(6, -1)
    best = np.argsort(-full, axis=1)[:, :k]
    want = np.stack(np.unravel_index(best, (7, 9)), -1)
    got = action_topk(torch.from_numpy(verb), torch.from_numpy(noun), k)
    assert got.shape == (6, k, 2) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_anticipation_metrics_from_records(caplog):
    records = [
        {"id": "a", "verb": 1, "noun": 10, "verb_top5": [1, 2, 3, 4, 5], "noun_top5": [11, 10, 12, 13, 14],
         "action_top5": [[1, 11], [1, 10], [2, 10], [3, 10], [4, 10]]},
        {"id": "b", "verb": 1, "noun": 11, "verb_top5": [2, 3], "noun_top5": [11, 10, 12, 13, 14],
         "action_top5": [[1, 11], [2, 11], [3, 11], [4, 11], [5, 11]]},
        {"id": "c", "verb": 2, "noun": 10, "verb_top5": [3, 2, 4, 5, 6], "noun_top5": [12, 13, 14, 15, 10],
         "action_top5": [[2, 12], [3, 10], [1, 10], [2, 13], [2, 14]]},
        {"id": "d", "verb": 1, "noun": 10, "verb_top5": [1], "action_top5": [[1, 10]]},
    ]
    with caplog.at_level(logging.WARNING, logger="vthcl.metrics"):
        m = anticipation_metrics(records)
    assert "record 3 (id 'd'): no 'noun_top5'; skipped" in caplog.text
    # verb labels 1, 1, 2: top-1 T F F; top-5 T F T (b lists only two); per class 1: 1/2, 2: 1.
    # noun labels 10, 11, 10: top-1 F T F; top-5 T T T; per class all 1.
    # action labels (1,10), (1,11), (2,10): top-1 F T F; top-5 T T F (c has verb 2 and noun 10,
    # never the pair); three classes of one sample: (1 + 1 + 0) / 3.
    want = {"verb_top1": 1 / 3, "verb_top5": 2 / 3, "verb_mt5r": 0.75,
            "noun_top1": 1 / 3, "noun_top5": 1.0, "noun_mt5r": 1.0,
            "action_top1": 1 / 3, "action_top5": 2 / 3, "action_mt5r": 2 / 3}
    assert list(m)[:9] == list(METRIC_KEYS)
    assert {key: m[key] for key in want} == pytest.approx(want)
    assert m["segments"] == 3 and m["skipped_records"] == 1
    with pytest.raises(ValueError, match="no valid records"):
        anticipation_metrics(records[3:])
