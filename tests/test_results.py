"""Poses: construction, indexing, COCO results (byte-identical to the official val JSON), dicts,
CSV, drawing."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
import torch

from kapao.errors import KapaoError
from kapao.postprocess import postprocess
from kapao.results import Poses, write_csv
from kapao.schema import KeypointSchema, coco_schema

ORIG_HW = (426, 640)


@pytest.fixture(scope="module")
def crafted_poses(golden):
    pred = torch.from_numpy(np.load(golden / "postprocess.npz")["crafted_pred"])
    return postprocess(pred, "val", (448, 640), [ORIG_HW], coco_schema(), paths=["img/a.jpg"])[0]


def _small(n=3, k=17, **kw):
    rng = np.random.default_rng(0)
    kps = rng.uniform(0, 100, size=(n, k, 3)).astype(np.float32).astype(np.float64)
    boxes = np.tile(np.array([[1.0, 2.0, 50.0, 90.0]]), (n, 1))
    return Poses(boxes, np.linspace(0.9, 0.5, n), kps, coco_schema(), (100, 120), **kw)


def test_fields_and_dtypes(crafted_poses):
    p = crafted_poses
    assert len(p) == 195 and p.boxes.shape == (195, 4) and p.boxes.dtype == np.float32
    assert p.scores.shape == (195,) and p.scores.dtype == np.float32
    assert p.keypoints.shape == (195, 17, 3) and p.keypoints.dtype == np.float64
    assert p.kp_objects.shape == (101, 6) and p.kp_objects.dtype == np.float32
    assert set(np.unique(p.kp_objects[:, 5])) <= set(range(17))
    assert (np.diff(p.scores) <= 0).all()
    assert p.image_hw == ORIG_HW and p.path == "img/a.jpg"
    assert "n=195" in repr(p)


def test_indexing(crafted_poses):
    p = crafted_poses
    one = p[0]
    assert len(one) == 1 and np.array_equal(one.keypoints[0], p.keypoints[0])
    last = p[-1]
    assert np.array_equal(last.boxes[0], p.boxes[-1])
    sub = p[2:5]
    assert len(sub) == 3 and np.array_equal(sub.scores, p.scores[2:5])
    masked = p[p.scores > 0.5]
    assert len(masked) == int((p.scores > 0.5).sum())
    picked = p[[4, 1]]
    assert np.array_equal(picked.boxes, p.boxes[[4, 1]])
    assert np.array_equal(sub.kp_objects, p.kp_objects) and sub.schema is p.schema
    with pytest.raises(IndexError):
        p[195]
    tracked = _small(track_ids=[7, 8, 9])
    assert tracked[1:].track_ids.tolist() == [8, 9] and tracked[-1].track_ids.tolist() == [9]


def test_validation():
    with pytest.raises(KapaoError, match="inconsistent shapes"):
        Poses(np.zeros((2, 4)), np.zeros(3), np.zeros((2, 17, 3)), coco_schema(), (10, 10))
    with pytest.raises(KapaoError, match="17, 3"):
        Poses(np.zeros((2, 4)), np.zeros(2), np.zeros((2, 14, 3)), coco_schema(), (10, 10))
    with pytest.raises(KapaoError, match="track ids"):
        _small(track_ids=[1])
    empty = Poses.empty(coco_schema(), (10, 20))
    assert len(empty) == 0 and empty.keypoints.shape == (0, 17, 3) and empty.to_coco(1) == []


def test_to_coco_reproduces_official_val_json_bytes(shared):
    """Rebuild Poses from the official val.py results of each image: to_coco gives the same JSON text."""
    raw = gzip.open(shared / "golden" / "e2e" / "val_s640_notta_norect.json.gz").read()
    dets = json.loads(raw)
    by_image: dict[int, list[dict]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    out = []
    for image_id in dict.fromkeys(d["image_id"] for d in dets):  # the file's image order
        group = by_image[image_id]
        kps = np.array([g["keypoints"] for g in group]).reshape(-1, 17, 3)
        poses = Poses(np.zeros((len(group), 4)), [g["score"] for g in group], kps, coco_schema(), (1, 1))
        out += poses.to_coco(image_id)
    assert json.dumps(out).encode() == raw


def test_to_coco_and_to_dict(crafted_poses):
    p = crafted_poses
    coco = p.to_coco(100024)
    assert len(coco) == 195 and list(coco[0]) == ["image_id", "category_id", "keypoints", "score"]
    assert coco[0]["image_id"] == 100024 and coco[0]["category_id"] == 1 and len(coco[0]["keypoints"]) == 51
    assert coco[3]["keypoints"][:3] == p.keypoints[3, 0].tolist() and coco[3]["score"] == float(p.scores[3])
    with_box = p.to_coco(5, category_id=2, include_bbox=True)
    x1, y1, x2, y2 = p.boxes[0].tolist()
    assert with_box[0]["bbox"] == [x1, y1, x2 - x1, y2 - y1] and with_box[0]["category_id"] == 2
    d = json.loads(json.dumps(p.to_dict()))
    assert d["image_hw"] == list(ORIG_HW) and d["keypoint_names"][0] == "nose" and d["path"] == "img/a.jpg"
    assert len(d["poses"]) == 195 and np.array_equal(np.array(d["poses"][7]["keypoints"]), p.keypoints[7])
    assert d["poses"][0]["box"] == p.boxes[0].tolist() and len(d["kp_objects"]) == 101
    assert _small(track_ids=[4, 5, 6]).to_dict()["poses"][2]["track_id"] == 6


def test_csv(tmp_path, crafted_poses):
    a = crafted_poses[:4]
    b = _small(2)
    b.path = None
    out = write_csv([a, b], tmp_path / "sub" / "poses.csv")
    assert out.exists() and [f.name for f in out.parent.iterdir()] == ["poses.csv"]  # no temp file left
    rows = list(csv.reader(out.open()))
    assert rows[0] == a.csv_header() and len(rows[0]) == 7 + 3 * 17
    assert rows[0][7:10] == ["nose_x", "nose_y", "nose_conf"]
    assert len(rows) == 1 + 4 + 2
    assert rows[1][0] == "img/a.jpg" and rows[1][1] == "0" and rows[5][0] == "1"  # no path: index in the list
    assert [float(v) for v in rows[2][7:]] == a.keypoints[1].reshape(-1).tolist()
    assert [float(v) for v in rows[2][3:7]] == a.boxes[1].tolist() and float(rows[2][2]) == float(a.scores[1])
    assert a.csv_rows(image="x")[0][0] == "x"


def test_csv_bad_inputs(tmp_path):
    with pytest.raises(KapaoError, match="no poses"):
        write_csv([], tmp_path / "p.csv")
    other = KeypointSchema(names=("a", "b", "c"), flip_index=(0, 2, 1))
    small = Poses(np.zeros((1, 4)), [0.5], np.zeros((1, 3, 3)), other, (10, 10))
    with pytest.raises(KapaoError, match="schemas"):
        write_csv([_small(1), small], tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_plot_draws_through_viz(golden, crafted_poses):
    image = np.load(golden / "inputs.npz")["A_bgr"]
    strong = crafted_poses[crafted_poses.scores > 0.5]
    drawn = strong.plot(image)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (drawn != image).any() and np.array_equal(image, np.load(golden / "inputs.npz")["A_bgr"])
    with_boxes = strong.plot(image, bbox=True, kp_bbox=True)
    assert (with_boxes != drawn).any()
    assert (strong.plot(image, kp_obj=True) != image).any()
    with pytest.raises(KapaoError, match="drawing option"):
        strong.plot(image, colour="red")
    with pytest.raises(KapaoError, match="original image"):
        strong.plot(image[:100])
    strong.path = None
    with pytest.raises(KapaoError, match="no path"):
        strong.plot()


def test_plot_reads_the_path(golden):
    pred = torch.from_numpy(np.load(golden / "postprocess.npz")["crafted_pred"])
    path = str(golden / "crowdpose_100024.jpg")
    poses = postprocess(pred, "demo", (448, 640), [ORIG_HW], coco_schema(), paths=[path])[0]
    assert poses.plot().shape == (426, 640, 3)
