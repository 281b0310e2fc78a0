"""vthcl.ava_eval: hand-worked AVA frame-mAP cases (each AP worked out in a comment).

Notation in the comments: detections in descending score order, T = true
positive, F = false positive; P = precision, R = recall after each; the AP is
the sum over recall steps of the step times the best precision at or after it.
"""
from __future__ import annotations

import logging

import pytest

from vthcl.ava_eval import Boxes, frame_map, read_boxes, read_exclusions, read_labelmap, score_files

LABELMAP = """item {
  name: "bend/bow (at the waist)"
  id: 1
}
item {
  name: "crouch/kneel"
  id: 2
}
item {
  name: "dance"
  id: 3
}
"""
A = (0.1, 0.1, 0.4, 0.9)  # x1, y1, x2, y2
B = (0.6, 0.1, 0.9, 0.9)
FAR = (0.0, 0.0, 0.05, 0.05)


def rows(*entries) -> str:
    return "".join(",".join(str(v) for v in e) + "\n" for e in entries)


def gt(video, sec, box, action, person=0):
    return (video, f"{sec:04d}", *box, action, person)


def det(video, sec, box, action, score):
    return (video, f"{sec:04d}", *box, action, score)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "labelmap.pbtxt").write_text(LABELMAP)

    def make(groundtruth, detections, exclusions=None, **kw):
        (tmp_path / "gt.csv").write_text(rows(*groundtruth))
        (tmp_path / "det.csv").write_text(rows(*detections))
        ex = None
        if exclusions is not None:
            ex = tmp_path / "excluded.csv"
            ex.write_text(rows(*exclusions))
        return score_files(tmp_path / "gt.csv", tmp_path / "det.csv", tmp_path / "labelmap.pbtxt", ex, **kw)
    return make


def test_exclusions_drop_frames_from_both_sides(files):
    g = [gt("v1", 902, A, 1), gt("v1", 903, B, 1)]
    d = [det("v1", 902, A, 1, 0.9), det("v1", 903, FAR, 1, 0.95)]
    # Excluded 0903 on both sides: 1 gt; 0.9 T -> P [1], R [1] -> AP 1.
    assert files(g, d, [("v1", "903")])["per_class"][1] == 1.0
    # Nothing excluded: 2 gt; 0.95 F, 0.9 T -> P [0, .5], R [0, .5] -> AP .5 * .5 = .25.
    assert files(g, d)["per_class"][1] == pytest.approx(0.25)
    # (Dropping only the gt side would give 0.5 (F, T over 1 gt), only the detection side 0.5 (T over 2 gt).)
    # The exclusions file's timestamps are integers, written with or without zero padding.
    assert files(g, d, [("v1", "0903")])["mAP"] == 1.0


def test_detections_on_a_frame_without_ground_truth_are_false_positives(files):
    g = [gt("v1", 902, A, 1)]
    d = [det("v1", 902, A, 1, 0.8), det("v2", 100, A, 1, 0.9)]
    # 0.9 F (v2 has no gt at all), 0.8 T -> P [0, .5], R [0, 1] -> AP 1 * .5 = .5.
    r = files(g, d)
    assert r["per_class"][1] == pytest.approx(0.5)
    assert r["num_detections"][1] == 2 and r["num_groundtruth"][1] == 1


def test_class_without_ground_truth_is_none_and_left_out_of_the_mean(files):
    g = [gt("v1", 902, A, 1), gt("v1", 902, B, 2)]
    d = [det("v1", 902, A, 1, 0.9),
         det("v1", 902, FAR, 2, 0.9), det("v1", 902, B, 2, 0.5),
         det("v1", 902, A, 3, 0.7)]
    # class 1: T -> AP 1. class 2: F, T over 1 gt -> P [0, .5], R [0, 1] -> AP .5.
    # class 3: detections but no gt -> None, not a 0 in the mean: mAP = (1 + .5) / 2 = .75.
    r = files(g, d)
    assert r["per_class"] == {1: 1.0, 2: 0.5, 3: None}
    assert r["mAP"] == pytest.approx(0.75)
    assert r["names"][2] == "crouch/kneel"


def test_duplicate_detection_of_one_box_is_a_false_positive(files):
    g = [gt("v1", 902, A, 1), gt("v1", 902, B, 1)]
    d = [det("v1", 902, A, 1, 0.9), det("v1", 902, A, 1, 0.8), det("v1", 902, B, 1, 0.7)]
    # 0.9 T, 0.8 F (A is taken), 0.7 T -> P [1, .5, 2/3], R [.5, .5, 1]
    # -> monotone P [1, 2/3, 2/3] -> AP .5 * 1 + .5 * 2/3 = 5/6.
    assert files(g, d)["mAP"] == pytest.approx(5 / 6)


def test_taken_best_box_makes_a_false_positive_without_falling_back(files):
    g1, g2 = (0.0, 0.0, 0.6, 1.0), (0.1, 0.0, 0.7, 1.0)
    d = (0.05, 0.0, 0.6, 1.0)  # IoU .55/.6 = .92 with g1, .5/.65 = .77 with g2
    g = [gt("v1", 902, g1, 1), gt("v1", 902, g2, 1)]
    # 0.9 takes g1 (T); 0.8's best box is g1 again, taken -> F (the VOC rule does not try g2).
    # P [1, .5], R [.5, .5] -> AP .5 * 1 = .5.
    assert files(g, [det("v1", 902, d, 1, 0.9), det("v1", 902, d, 1, 0.8)])["mAP"] == pytest.approx(0.5)


def test_iou_exactly_half_matches_and_uses_no_plus_one(files):
    full = (0.0, 0.0, 1.0, 1.0)
    g = [gt("v1", 902, full, 1)]
    # IoU (0.5 * 1) / (1 + 0.5 - 0.5) = 0.5 exactly, >= 0.5 -> T -> AP 1.
    assert files(g, [det("v1", 902, (0.0, 0.0, 0.5, 1.0), 1, 0.9)])["mAP"] == 1.0
    # IoU .49 -> F -> AP 0 (a "+1" pixel formula would give (1.49 * 2) / 4 = .745 and match).
    assert files(g, [det("v1", 902, (0.0, 0.0, 0.49, 1.0), 1, 0.9)])["mAP"] == 0.0


def test_fifty_detections_per_frame_across_classes(files):
    g = [gt("v1", 902, A, 1)]
    others = [det("v1", 902, FAR, 2, round(0.5 + i / 100, 2)) for i in range(50)]  # class 2 has no gt
    hit = det("v1", 902, A, 1, 0.1)
    # 51 detections on the frame: the lowest (the class-1 hit) is dropped -> class 1 has no
    # detection -> AP 0; class 2 has no gt -> None; mAP = 0.
    r = files(g, others + [hit])
    assert r["per_class"] == {1: 0.0, 2: None, 3: None} and r["num_detections"][2] == 50
    # No capacity: T -> AP 1.
    assert files(g, others + [hit], capacity=0)["mAP"] == 1.0
    # The official min-heap: a row only replaces the minimum when its score is higher, so of
    # 51 ties the first 50 in the file stay ...
    ties = [det("v1", 902, FAR, 2, 0.5) for _ in range(50)]
    assert files(g, ties + [det("v1", 902, A, 1, 0.5)])["mAP"] == 0.0
    assert files(g, [det("v1", 902, A, 1, 0.5)] + ties)["mAP"] == 1.0
    # ... and a higher score evicts the smallest (score, action, y1, ...) tuple: the class-1 hit.
    assert files(g, [det("v1", 902, A, 1, 0.5)] + ties[:49] + [det("v1", 902, FAR, 2, 0.9)])["mAP"] == 0.0


def test_class_outside_the_label_map_is_ignored(files, tmp_path):
    g = [gt("v1", 902, A, 1), gt("v1", 902, B, 4)]
    d = [det("v1", 902, B, 4, 0.99), det("v1", 902, FAR, 1, 0.95), det("v1", 902, A, 1, 0.9)]
    # class 4 is not in the map: neither its gt nor its detection count, and it takes no
    # capacity. class 1: F, T over 1 gt -> AP .5.
    r = files(g, d)
    assert set(r["per_class"]) == {1, 2, 3} and r["mAP"] == pytest.approx(0.5)
    only_mapped = read_boxes(tmp_path / "det.csv", {1, 2, 3}, capacity=50, detections=True)
    assert only_mapped.labels == {"v1,0902": [1, 1]}


def test_bad_rows_are_reported_with_their_line_and_skipped(files, caplog):
    g = [gt("v1", 902, A, 1), ("v1", "0902", 0.1, 0.2, 1.3, 0.9, 2)]  # a box beyond 1 is scored as given
    d = [det("v1", 902, A, 1, 0.9),
         ("v1", "0902", 0.1, 0.1, 0.4, 1),            # line 2: too few columns
         det("v1", 902, ("x", 0.1, 0.4, 0.9), 1, 0.8),  # line 3: not a number
         ("v1", "0902", *A, 1),                       # line 4: no score
         ("v1", "902.5", *A, 1, 0.7),                 # line 5: timestamp not whole
         det("v1", 902, (0.1, 0.2, 1.3, 0.9), 2, 0.6)]
    with caplog.at_level(logging.WARNING, logger="vthcl.ava_eval"):
        r = files(g, d)
    assert r["skipped_rows"] == 4
    text = caplog.text
    assert "det.csv:2: expected 7 or 8 columns, got 6" in text
    assert "det.csv:3: not a number" in text
    assert "det.csv:4: a detection row needs its score in column 8" in text
    assert "det.csv:5: timestamp '902.5' is not an integer" in text
    # The good rows still count: class 1 T -> 1; class 2 (box beyond 1) T -> 1.
    assert r["per_class"] == {1: 1.0, 2: 1.0, 3: None}


def test_invalid_detection_boxes_are_removed_not_false_positives():
    g = Boxes({"v,0001": [[0.1, 0.1, 0.9, 0.4]]}, {"v,0001": [1]})
    d = Boxes({"v,0001": [[0.5, 0.5, 0.5, 0.9], [0.1, 0.1, 0.9, 0.4]]}, {"v,0001": [1, 1]},
              {"v,0001": [0.9, 0.8]})
    # The 0.9 box has y1 == y2: removed; 0.8 T -> AP 1 (as an F it would be .5).
    r = frame_map(g, d, [{"id": 1, "name": "a"}])
    assert r["mAP"] == 1.0 and r["num_detections"][1] == 1


def test_frame_map_orders_in_memory_detections_by_score():
    # Two gt, detections given out of order: 0.3 F (far), 0.9 T, 0.6 T. By score: T, T, F
    # -> P [1, 1, 2/3], R [.5, 1, 1] -> AP 1. (In the given order it would be F, T, T -> .5 * .5 + .5 * 2/3.)
    key = "v,0001"
    g = Boxes({key: [[0.1, 0.1, 0.9, 0.4], [0.1, 0.6, 0.9, 0.9]]}, {key: [1, 1]})
    d = Boxes({key: [[0.0, 0.0, 0.05, 0.05], [0.1, 0.1, 0.9, 0.4], [0.1, 0.6, 0.9, 0.9]]}, {key: [1, 1, 1]},
              {key: [0.3, 0.9, 0.6]})
    assert frame_map(g, d, [{"id": 1, "name": "a"}], exclusions=set())["mAP"] == 1.0
    # No class with gt at all: no mAP.
    assert frame_map(Boxes(), d, [{"id": 1, "name": "a"}])["mAP"] is None


def test_read_boxes_stores_y_first_and_keys_frames_by_whole_seconds(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("v1,902,0.1,0.2,0.3,0.4,5,7\nv1,0902,0.5,0.6,0.7,0.8,5,8\n")
    b = read_boxes(path)
    assert b.boxes == {"v1,0902": [[0.2, 0.1, 0.4, 0.3], [0.6, 0.5, 0.8, 0.7]]}
    assert b.labels == {"v1,0902": [5, 5]} and b.scores == {"v1,0902": [1.0, 1.0]} and b.skipped_rows == 0


def test_read_labelmap_forms_and_errors(tmp_path):
    path = tmp_path / "v22.pbtxt"
    path.write_text('label {\n  name: "stand"\n  label_id: 11\n  label_type: PERSON_MOVEMENT\n}\n'
                    'label {\n  label_id: 12\n  name: "walk"\n}\n')
    assert read_labelmap(path) == ([{"id": 11, "name": "stand"}, {"id": 12, "name": "walk"}], {11, 12})
    (tmp_path / "m.pbtxt").write_text(LABELMAP)
    assert read_labelmap(tmp_path / "m.pbtxt")[1] == {1, 2, 3}
    path.write_text('item {\n  name: "a"\n  id: one\n}\n')
    with pytest.raises(ValueError, match=r"v22.pbtxt:3: id 'one' is not an integer"):
        read_labelmap(path)
    path.write_text('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n  id: 1\n}\n')
    with pytest.raises(ValueError, match=r"v22.pbtxt:5: class id 1 appears twice"):
        read_labelmap(path)


def test_read_exclusions_skips_bad_rows(tmp_path, caplog):
    path = tmp_path / "ex.csv"
    path.write_text("v1,0902\nv1,0903,extra\nv2,7\n")
    with caplog.at_level(logging.WARNING, logger="vthcl.ava_eval"):
        assert read_exclusions(path) == {"v1,0902", "v2,0007"}
    assert "ex.csv:2: expected 2 columns" in caplog.text
