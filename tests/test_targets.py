"""Pose and keypoint objects against the official label files (labels.json) and dataloader targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kapao.data.coco import load_keypoint_annotations
from kapao.data.targets import (
    format_label_lines,
    image_labels,
    labels_by_stem,
    letterbox_labels,
    round_like_label_text,
)


@pytest.fixture(scope="module")
def labels_golden(golden):
    return json.loads((golden / "labels.json").read_text())


def _load(tmp: Path, name: str, obj: dict, k: int, **kw):
    p = tmp / name
    p.write_text(json.dumps(obj))
    return load_keypoint_annotations(p, None, k, cache=False, **kw)


def _parse(lines: list[str]) -> np.ndarray:
    return np.array([[float(v) for v in ln.split()] for ln in lines])


@pytest.mark.parametrize("split,keep_crowd", [("train2017", False), ("val2017", True)])
def test_coco_label_lines_match_official(labels_golden, tmp_path, split, keep_crowd):
    ann = _load(tmp_path, "coco.json", labels_golden["coco_input_json"], 17, keep_crowd=keep_crowd)
    kp_bbox = labels_golden["coco_data_dict"]["kp_bbox"]
    ours = labels_by_stem(ann, kp_bbox, 17)
    ref = labels_golden["coco_labels"][split]
    assert sorted(ours) == sorted(ref) == ["100024", "100025", "100026"]
    for stem, lines in ref.items():
        assert format_label_lines(ours[stem]) == lines, stem  # the same text, character for character
        np.testing.assert_allclose(ours[stem], _parse(lines), rtol=0, atol=5.01e-7)  # half a unit of the 6th decimal
    assert [Path(p).name for p in labels_golden["coco_labels"][f"{split}_img_txt"]] == [
        ann[i].file.name for i in range(len(ann))
    ]


def test_coco_label_structure(labels_golden, tmp_path):
    ann = _load(tmp_path, "coco.json", labels_golden["coco_input_json"], 17, keep_crowd=True)
    lab = labels_by_stem(ann, 0.05, 17)["100024"]
    assert lab.shape == (135, 5 + 51)
    persons = np.flatnonzero(lab[:, 0] == 0)
    assert len(persons) == 10
    # each pose object is followed by one keypoint object per visible keypoint, in keypoint order
    vis = ann[0].keypoints[..., 2] > 0
    for i, row in enumerate(persons):
        ks = lab[row + 1 : row + 1 + vis[i].sum(), 0]
        np.testing.assert_array_equal(ks, np.flatnonzero(vis[i]) + 1)
    kp_rows = lab[lab[:, 0] > 0]
    np.testing.assert_allclose(kp_rows[:, 3], 0.05 * 640 / 640)
    np.testing.assert_allclose(kp_rows[:, 4], 0.05 * 640 / 426)
    assert (kp_rows[:, 5:] == 0).all()
    # the crowd region and the num_keypoints=0 person are pose objects without keypoint objects
    assert (lab[persons[8], 5:] == 0).all() and (lab[persons[9], 5:] == 0).all()


def test_crowdpose_label_lines_match_official(labels_golden, tmp_path):
    parts = []
    for split in ("trainval", "test"):  # both splits go into the same label folder
        ann = _load(tmp_path, f"{split}.json", labels_golden["crowdpose_input_json"][split], 14, clip_keypoints=True)
        parts.extend(ann)
    ours = labels_by_stem(parts, 0.05, 14)
    for stem in ("100024", "100025", "100026"):
        assert format_label_lines(ours[stem]) == labels_golden["crowdpose_labels"][stem], stem
    # without clipping, the keypoints placed outside the image would differ
    raw = labels_by_stem(_load(tmp_path, "tv.json", labels_golden["crowdpose_input_json"]["trainval"], 14), 0.05, 14)
    assert format_label_lines(raw["100024"]) != labels_golden["crowdpose_labels"]["100024"]


def test_appended_duplicates_keep_both(labels_golden, tmp_path):
    ann = _load(tmp_path, "tv.json", labels_golden["crowdpose_input_json"]["trainval"], 14, clip_keypoints=True)
    twice = labels_by_stem(list(ann) + list(ann), 0.05, 14)
    once = labels_by_stem(ann, 0.05, 14)
    np.testing.assert_array_equal(twice["100025"], np.concatenate([once["100025"]] * 2))


def test_any_k_and_empty():
    boxes = np.array([[10.0, 20.0, 30.0, 40.0]])
    kps = np.array([[[15.0, 25.0, 2], [0, 0, 0], [35.0, 50.0, 1]]])
    lab = image_labels(boxes, kps, height=100, width=200, kp_bbox=0.1)
    assert lab.shape == (3, 5 + 9)
    np.testing.assert_allclose(lab[0, :5], [0, 25 / 200, 40 / 100, 30 / 200, 40 / 100])
    np.testing.assert_allclose(lab[0, 5:], [15 / 200, 25 / 100, 2, 0, 0, 0, 35 / 200, 50 / 100, 1])
    np.testing.assert_allclose(lab[1, :5], [1, 15 / 200, 25 / 100, 20 / 200, 20 / 100])
    np.testing.assert_allclose(lab[2, :5], [3, 35 / 200, 50 / 100, 20 / 200, 20 / 100])
    assert image_labels(np.zeros((0, 4)), np.zeros((0, 3, 3)), 100, 200, 0.1).shape == (0, 14)


def test_letterboxed_targets_match_official_dataloader(labels_golden, golden, tmp_path):
    """val2017 labels of A and B through the val dataloader's letterbox (rect batch 512x640):
    A no resize, pad (0, 43); B resized x1.6 to 640x480, pad (0, 16). Official labels are parsed
    from text as float32, so we round-trip through the same text."""
    ann = _load(tmp_path, "coco.json", labels_golden["coco_input_json"], 17, keep_crowd=True)
    lab = labels_by_stem(ann, 0.05, 17)
    rows = []
    for b, (stem, content_wh, pad) in enumerate((("100024", (640, 426), (0.0, 43.0)), ("100025", (640, 480), (0.0, 16.0)))):
        as_text = _parse(format_label_lines(lab[stem])).astype(np.float32)
        np.testing.assert_array_equal(round_like_label_text(lab[stem]), as_text)  # same, without text
        out = letterbox_labels(as_text, content_wh, pad, (512, 640))
        rows.append(np.concatenate([np.full((len(out), 1), b, np.float32), out], 1))
    ours = np.concatenate(rows)
    ref = np.load(golden / "loss.npz")["targets"]
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (235, 57)
    np.testing.assert_array_equal(ours, ref)  # bit for bit
    # quirk: keypoints of v=0 and of keypoint-object rows become (padw/W, padh/H, 0), not zero
    kp_obj = ours[ours[:, 1] > 0]
    np.testing.assert_allclose(kp_obj[kp_obj[:, 0] == 0][:, 7], 43 / 512)
    np.testing.assert_allclose(kp_obj[kp_obj[:, 0] == 1][:, 7], 16 / 512)


def test_round_like_label_text_equals_the_text_round_trip():
    rng = np.random.default_rng(0)
    cases = [
        rng.uniform(-1, 2, (5000, 6)),
        (rng.integers(-(10**6), 2 * 10**6, (5000, 6)) + 0.5) / 1e6,  # near-ties: np.round gets half wrong
        rng.integers(0, 2**20, (500, 6)) / 2**20,  # exact binary ties round to even
        np.array([[0.0, 0.0984375, 0.0078125, 2.0, 1e-9, -2.5e-7]]),
    ]
    for x in cases:
        x = np.concatenate([np.zeros((len(x), 1)), x], 1)  # class column first, as labels
        np.testing.assert_array_equal(round_like_label_text(x), _parse(format_label_lines(x)).astype(np.float32))
    assert (np.round(cases[1], 6).astype(np.float32) != _parse(format_label_lines(
        np.concatenate([np.zeros((5000, 1)), cases[1]], 1)))[:, 1:].astype(np.float32)).any()
