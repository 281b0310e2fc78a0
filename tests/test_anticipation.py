"""EPIC anticipation: the model, its records, the metrics that follow from them."""
from __future__ import annotations

import itertools

import pytest
import torch

from vthcl import anticipation as A
from vthcl.metrics import anticipation_metrics
from vthcl.model import Pathway


def test_the_model_pools_the_slow_encoder_into_two_heads():
    torch.manual_seed(0)
    model = A.Anticipator(Pathway("r18", 8, slow=True), verbs=5, nouns=7, hidden=16).eval()
    verb, noun = model(torch.randn(3, 3, 4, 32, 32))
    assert verb.shape == (3, 5) and noun.shape == (3, 7)
    loss, _ = A.step(model.train(), {"slow": torch.randn(3, 3, 4, 32, 32), "verb": torch.tensor([0, 4, -1]),
                                     "noun": torch.tensor([6, -1, 2])})
    loss.backward()  # a segment without a class (-1) is left out of that head's term
    assert torch.isfinite(loss) and model.encoder.stem[0].weight.grad is not None


class _Fixed(torch.nn.Module):
    """Returns the logits it is given for each clip (clip k: row k)."""

    def __init__(self, verbs, nouns):
        super().__init__()
        self.verbs, self.nouns = verbs, nouns

    def forward(self, clips):
        k = clips[:, 0, 0, 0, 0].long()
        return self.verbs[k], self.nouns[k]


def test_records_rank_verbs_nouns_and_actions_by_probability():
    torch.manual_seed(1)
    verbs, nouns = torch.randn(6, 4), torch.randn(6, 9)
    events = [{"id": f"P01_01_{e}", "verb_class": e % 4, "noun_class": (2 * e) % 9} for e in range(6)]
    # two batches, the second with a padding repeat of event 0 (a rank's short range)
    batches = [{"slow": torch.tensor(ids).float().view(-1, 1, 1, 1, 1).expand(-1, 3, 2, 2, 2).clone(),
                "event": torch.tensor(ids)} for ids in ([0, 1, 2, 3], [4, 5, 0])]
    records = A.predict(_Fixed(verbs, nouns), batches, events)
    assert [r["id"] for r in records] == [f"P01_01_{e}" for e in range(6)]  # each segment once
    for r in records:
        e = r["event"]
        pv, pn = verbs[e].softmax(0), nouns[e].softmax(0)
        assert r["verb_top5"] == pv.argsort(descending=True)[:5].tolist()
        assert r["noun_top5"] == pn.argsort(descending=True)[:5].tolist()
        pairs = sorted(itertools.product(range(4), range(9)), key=lambda p: -float(pv[p[0]] * pn[p[1]]))
        assert [tuple(a) for a in r["action_top5"]] == pairs[:5]
    metrics = anticipation_metrics(records)
    top1 = sum(r["verb_top5"][0] == r["verb"] for r in records) / 6
    assert metrics["verb_top1"] == top1 and metrics["verb_top5"] == 1.0  # 4 verbs: always in the top 5


@pytest.mark.parametrize("columns", [55, 100])
def test_anticipate_end_to_end_from_either_column_set(columns, tmp_path):
    """vthcl.eval anticipate on the embedded EPIC-format data (packed from the EPIC-55 or the EPIC-100
    files): anticipate.json's metrics are the ones predictions.jsonl gives."""
    import json

    from shard_tools.make_synthetic import make
    from vthcl import eval as vthcl_eval
    data = tmp_path / "data"
    make(data, task="epic", seed=2, videos=1, val_videos=1, participants=1, duration=12, short_side=48,
         epic_columns=columns, workers=2)
    out = tmp_path / "anticipate"
    result = vthcl_eval.run(mode="anticipate", init="random", arch="r18", width=8, train=str(data / "train"),
                            val=str(data / "val"), out=str(out), epochs=1, batch_size=4, crop_size=32, hidden=16,
                            workers=0, quiet=True)
    saved = json.loads((out / "anticipate.json").read_text())
    info = json.loads((data / "train" / "manifest.json").read_text())["event_info"]
    assert saved["columns"] == f"epic-{columns}"  # class counts: what the train annotations hold
    assert (saved["verb_classes"], saved["noun_classes"]) == (info["verb_classes"], info["noun_classes"])
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == json.loads((data / "val" / "manifest.json").read_text())["events"]
    assert all(len(r["verb_top5"]) == min(5, info["verb_classes"]) and len(r["action_top5"]) == 5 for r in records)
    ids = {r["id"] for r in records}
    assert all(("_" in i) == (columns == 100) for i in ids)  # narration_id (EPIC-100) or uid (EPIC-55)
    again = anticipation_metrics(records)
    for key in ("verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5", "verb_mt5r",
                "noun_mt5r", "action_mt5r"):
        assert saved[key] == pytest.approx(again[key]) == pytest.approx(result[key]), key
