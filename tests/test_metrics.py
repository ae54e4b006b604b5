"""OKS keypoint AP (kapao.engine.metrics) pinned by known answers and by the reference tools run
directly: GT fed back scores 1, a hand-computable OKS flips exactly the thresholds it should, the
teacher results give the table in shared/data/README.md, and the official val results give the
stats recorded in golden/e2e/val.json."""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kapao.engine.metrics import (
    COCO_STATS,
    CROWDPOSE_STATS,
    KeypointMetrics,
    evaluate_keypoints,
    faster_available,
    gt_as_results,
    oks_sigmas,
    read_json,
)
from kapao.errors import KapaoError
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema

COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0
CROWDPOSE_SIGMAS = np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79]) / 10.0
THRESHOLDS = np.linspace(0.5, 0.95, 10)
MMPOSE_IMAGES = [785, 40083, 196141, 197388]


@pytest.fixture(scope="module")
def coco_gt(shared: Path) -> Path:
    return shared / "data" / "coco_mini" / "person_keypoints.json"


@pytest.fixture(scope="module")
def crowd_gt(shared: Path) -> Path:
    return shared / "data" / "crowdpose_mini" / "person_keypoints.json"


def _pycocotools_direct(gt_path: Path, results: list | Path, sigmas: np.ndarray, img_ids=None) -> list[float]:
    """pycocotools exactly as a user runs it by hand on the files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(results) if isinstance(results, Path) else copy.deepcopy(results))
        e = COCOeval(gt, dt, "keypoints")
        e.params.kpt_oks_sigmas = sigmas
        if img_ids is not None:
            e.params.imgIds = img_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(s) for s in e.stats]


def _noisy(gt: dict, seed: int, frac: float = 0.08, extra: int = 3) -> list[dict]:
    """GT fed back with seeded keypoint noise (std = frac * sqrt(area)), random scores and a few
    false positives per image: results whose AP is strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    out = []
    for r, a in zip(gt_as_results(gt), [a for a in gt["annotations"] if not a["iscrowd"] and any(
            v > 0 for v in a["keypoints"][2::3])]):
        kp = np.array(r["keypoints"]).reshape(-1, 3)
        s = math.sqrt(a["area"]) if "area" in a else math.sqrt(a["bbox"][2] * a["bbox"][3] * 0.53)
        kp[:, :2] += rng.normal(0, frac * s * rng.uniform(0.2, 2.0), size=(len(kp), 2))
        out.append(r | {"keypoints": kp.ravel().tolist(), "score": float(rng.uniform(0.05, 1))})
    for img in gt["images"]:
        for _ in range(extra):
            kp = np.c_[rng.uniform(0, img["width"], (len(out[0]["keypoints"]) // 3, 2)),
                       rng.uniform(0, 1, len(out[0]["keypoints"]) // 3)]
            out.append({"image_id": img["id"], "category_id": 1, "keypoints": kp.ravel().tolist(),
                        "score": float(rng.uniform(0, 0.5))})
    return out


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("name", ["person_keypoints.json", "person_keypoints_train2017.json"])
def test_coco_gt_fed_back_scores_one(shared, name):
    gt = shared / "data" / "coco_mini" / name
    m = evaluate_keypoints(gt, gt_as_results(gt), coco_schema())
    assert list(m.stats) == list(COCO_STATS)
    assert m.stats == {k: 1.0 for k in COCO_STATS}
    assert m.protocol == "coco" and m.evaluator == "pycocotools"


def test_crowdpose_gt_fed_back_scores_one(crowd_gt):
    m = evaluate_keypoints(crowd_gt, gt_as_results(crowd_gt), crowdpose_schema())
    assert list(m.stats) == list(CROWDPOSE_STATS) and m.evaluator == "xtcocotools"
    assert m.num_images == 3 and m.num_results == 8
    for k in ("AP", "AP50", "AP75", "AR", "AR50", "AR75"):
        assert m.stats[k] == 1.0
    # Only image 103319 carries a crowdIndex (0.39: medium); easy and hard hold no image: undefined.
    assert m.stats["AP_medium"] == 1.0
    assert m.stats["AP_easy"] == -1.0 and m.stats["AP_hard"] == -1.0
    assert any("crowdIndex" in n and "9000002" in n for n in m.notes)


def _one_person_gt(area: float = 10000.0) -> dict:
    """One 100x100 image with one person, all 17 keypoints labelled."""
    rng = np.random.default_rng(0)
    kp = np.c_[rng.uniform(20, 80, (17, 2)), np.full(17, 2)]
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": area, "num_keypoints": 17,
                         "bbox": [10, 10, 80, 80], "keypoints": kp.ravel().tolist()}],
        "categories": [{"id": 1, "name": "person"}],
    }


def _expected_ap(oks: float) -> dict[str, float]:
    """One GT, one detection: a threshold t counts iff OKS >= t (pycocotools' match rule)."""
    hits = THRESHOLDS <= oks + 1e-12
    return {"AP": hits.mean(), "AP50": float(oks >= 0.5), "AP75": float(oks >= 0.75), "AR": hits.mean()}


@pytest.mark.parametrize("oks", [0.97, 0.949, 0.951, 0.7499, 0.7501, 0.62, 0.5001, 0.4999, 0.3])
def test_hand_computed_oks_all_keypoints(oks):
    """Shift keypoint i by c*sigma_i: every keypoint then has e = c^2 / (8 area) (pycocotools:
    e = d^2 / (2 sigma)^2 / area / 2), so OKS = exp(-c^2 / (8 area)) and AP = #{t <= OKS} / 10."""
    gt = _one_person_gt(area=10000.0)
    c = math.sqrt(-8 * 10000.0 * math.log(oks))
    kp = np.array(gt_as_results(gt)[0]["keypoints"]).reshape(17, 3)
    angle = np.linspace(0, 2 * np.pi, 17, endpoint=False)  # any direction: only the distance counts
    kp[:, 0] += c * COCO_SIGMAS * np.cos(angle)
    kp[:, 1] += c * COCO_SIGMAS * np.sin(angle)
    det = [{"image_id": 1, "category_id": 1, "keypoints": kp.ravel().tolist(), "score": 0.9}]
    m = evaluate_keypoints(gt, det, coco_schema())
    for k, v in _expected_ap(oks).items():
        assert m.stats[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.parametrize("target", [0.96, 0.9499])
def test_hand_computed_oks_one_keypoint_real_image(coco_gt, target):
    """Image 785 (one person, 17 labelled keypoints, area 27789.11055): moving only the left wrist
    (sigma .062) by d gives OKS = (16 + exp(-d^2 / (8 sigma^2 area))) / 17; only t = .95 can flip."""
    gt = read_json(coco_gt)
    ann = next(a for a in gt["annotations"] if a["image_id"] == 785)
    assert ann["num_keypoints"] == 17 and ann["area"] == 27789.11055
    e = -math.log(17 * target - 16)
    d = math.sqrt(e * 8 * 0.062**2 * ann["area"])
    r = gt_as_results({"annotations": [ann]})[0]
    r["keypoints"][9 * 3] += d  # keypoint 9 = left_wrist
    m = evaluate_keypoints(gt, [r], coco_schema(), image_ids=[785])
    expected = 1.0 if target >= 0.95 else 0.9
    assert m.stats["AP"] == pytest.approx(expected, abs=1e-12)
    assert m.stats["AP75"] == pytest.approx(1.0, abs=1e-12) and m.stats["AR"] == pytest.approx(expected, abs=1e-12)


def test_zero_detections_give_zero(coco_gt, crowd_gt):
    m = evaluate_keypoints(coco_gt, [], coco_schema())
    assert m.stats == {k: 0.0 for k in COCO_STATS} and m.num_results == 0
    c = evaluate_keypoints(crowd_gt, [], crowdpose_schema())
    assert all(c.stats[k] == 0.0 for k in CROWDPOSE_STATS if k not in ("AP_easy", "AP_hard"))
    assert c.stats["AP_easy"] == c.stats["AP_hard"] == -1.0  # no image in those groups


# ----------------------------------------------------------------------------- reference tools


def _readme(m: KeypointMetrics) -> list[float]:
    """The first 8 stats as shared/data/README.md's table prints them (3 decimals)."""
    return [round(v, 3) for v in list(m.stats.values())[:8]]


def _near_readme(m: KeypointMetrics, row: list[float]) -> bool:
    """For the README's subset rows: two of their cells are one unit off in the 3rd decimal (APl of
    the 4 mmpose images is 0.75247525 but printed 0.753; AR50 of the 26 COCO-MINI images is
    0.80645161 but printed 0.807; pycocotools gives the same with a GT file cut to those images)."""
    return all(abs(v - r) <= 0.0006 for v, r in zip(list(m.stats.values())[:8], row))


def test_teacher_results_equal_pycocotools_and_readme(shared, coco_gt):
    res = shared / "data" / "coco_mini" / "yolo11n_pose_results.json"
    m = evaluate_keypoints(coco_gt, res, coco_schema())
    assert list(m.stats.values()) == _pycocotools_direct(coco_gt, res, COCO_SIGMAS)
    assert m.num_images == 30 and m.num_results == 778
    readme = [0.570, 0.831, 0.757, 0.602, 0.578, 0.628, 0.860, 0.791]  # shared/data/README.md table
    assert _readme(m) == readme
    # The README rows for subsets of images (restricting the evaluated image ids).
    mm = evaluate_keypoints(coco_gt, res, coco_schema(), image_ids=MMPOSE_IMAGES)
    assert _near_readme(mm, [0.698, 1.0, 0.904, 0.639, 0.753, 0.717, 1.0, 0.917])
    assert _readme(mm) == [0.698, 1.0, 0.904, 0.639, 0.752, 0.717, 1.0, 0.917]
    assert list(mm.stats.values()) == _pycocotools_direct(coco_gt, res, COCO_SIGMAS, MMPOSE_IMAGES)
    rest = sorted({i["id"] for i in read_json(coco_gt)["images"]} - set(MMPOSE_IMAGES))
    mr = evaluate_keypoints(coco_gt, res, coco_schema(), image_ids=rest)
    assert _near_readme(mr, [0.516, 0.751, 0.688, 0.595, 0.504, 0.594, 0.807, 0.742])
    assert _readme(mr) == [0.516, 0.751, 0.688, 0.595, 0.504, 0.594, 0.806, 0.742]


def test_teacher_train_results_equal_readme(shared):
    gt = shared / "data" / "coco_mini" / "person_keypoints_train2017.json"
    res = shared / "data" / "coco_mini" / "yolo11n_pose_results_train2017.json"
    m = evaluate_keypoints(gt, res, coco_schema())
    assert _readme(m) == [0.490, 0.787, 0.541, 0.420, 0.633, 0.555, 0.849, 0.593]
    assert list(m.stats.values()) == _pycocotools_direct(gt, res, COCO_SIGMAS)


def test_schema_sigmas_are_bit_identical_to_the_tools():
    assert np.array_equal(oks_sigmas(coco_schema()), COCO_SIGMAS)
    assert np.array_equal(oks_sigmas(crowdpose_schema()), CROWDPOSE_SIGMAS)


@pytest.mark.parametrize("run", ["s640_notta_norect", "s640_notta_rect", "s640_tta_norect", "s640_tta_rect"])
def test_official_val_results_give_recorded_stats(golden, coco_gt, run):
    rec = json.loads((golden / "e2e" / "val.json").read_text())["runs"][run]
    m = evaluate_keypoints(coco_gt, golden / "e2e" / f"val_{run}.json.gz", coco_schema())
    assert m.num_results == rec["n_dets"]
    assert m.stats == rec["stats"]  # the same names, at full precision
    with gzip.open(golden / "e2e" / f"val_{run}.json.gz", "rt") as f:
        direct = _pycocotools_direct(coco_gt, json.load(f), COCO_SIGMAS)
    assert list(m.stats.values()) == direct == rec["stats_printed_values"]


def _xtcocotools_direct(gt_path: Path, results: list) -> list[float]:
    """xtcocotools as mmpose/crowdposetools users run it: the GT file by name (its easy/medium/hard
    split re-reads that file)."""
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(copy.deepcopy(results))
        e = COCOeval(gt, dt, "keypoints_crowd", CROWDPOSE_SIGMAS, use_area=False)
        e.params.useSegm = None
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(s) for s in e.stats]


@pytest.mark.parametrize("seed", [0, 1])
def test_crowdpose_equals_xtcocotools_direct(crowd_gt, tmp_path, seed):
    gt = read_json(crowd_gt)
    for img, ci in zip(gt["images"], (0.1, 0.5, 0.9)):  # one image per crowd-index group
        img["crowdIndex"] = ci
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps(gt))
    res = _noisy(gt, seed)
    m = evaluate_keypoints(path, res, crowdpose_schema())
    direct = _xtcocotools_direct(path, res)
    assert list(m.stats.values()) == direct
    assert 0 < m.ap < 1 and all(v >= 0 for v in m.stats.values()) and not m.notes
    # shared/data/README.md: with area = w*h*0.53 stored, pycocotools with CrowdPose sigmas gives the
    # same OKS, hence the same AP/AR over all images.
    py = _pycocotools_direct(path, res, CROWDPOSE_SIGMAS)
    assert list(m.stats.values())[:6] == [py[0], py[1], py[2], py[5], py[6], py[7]]


def test_any_schema_uses_its_sigmas(coco_gt, tmp_path):
    """A 5-keypoint face schema: its own sigmas reach pycocotools (AP differs from COCO's)."""
    face = KeypointSchema(names=("nose", "l_eye", "r_eye", "l_ear", "r_ear"), flip_index=(0, 2, 1, 4, 3),
                          oks_sigmas=(0.05, 0.04, 0.04, 0.06, 0.06), source="face.yaml")
    gt = read_json(coco_gt)
    for a in gt["annotations"]:
        a["keypoints"] = a["keypoints"][:15]
        a["num_keypoints"] = sum(v > 0 for v in a["keypoints"][2::3])
    path = tmp_path / "face.json"
    path.write_text(json.dumps(gt))
    res = [r | {"keypoints": r["keypoints"][:15]} for r in _noisy(read_json(coco_gt), seed=3, frac=0.03)]
    m = evaluate_keypoints(path, res, face)
    direct = _pycocotools_direct(path, res, np.array([0.5, 0.4, 0.4, 0.6, 0.6]) / 10.0)
    assert list(m.stats.values()) == direct and 0 < m.ap < 1
    with pytest.raises(KapaoError, match="oks_sigmas is missing"):
        evaluate_keypoints(path, res, KeypointSchema(names=face.names, flip_index=face.flip_index, source="f.yaml"))


@pytest.mark.skipif(not faster_available(), reason="faster-coco-eval not installed (pip install faster-coco-eval)")
def test_faster_equals_pycocotools(shared, coco_gt, golden):
    res = shared / "data" / "coco_mini" / "yolo11n_pose_results.json"
    for ids in (None, MMPOSE_IMAGES):
        a = evaluate_keypoints(coco_gt, res, coco_schema(), image_ids=ids)
        b = evaluate_keypoints(coco_gt, res, coco_schema(), image_ids=ids, evaluator="faster")
        assert b.evaluator == "faster-coco-eval" and _same(a, b)
    gt = read_json(coco_gt)
    for seed in range(3):
        noisy = _noisy(gt, seed)
        a = evaluate_keypoints(gt, noisy, coco_schema())
        b = evaluate_keypoints(gt, noisy, coco_schema(), evaluator="faster")
        assert _same(a, b) and 0 < a.ap < 1
    assert evaluate_keypoints(gt, [], coco_schema(), evaluator="faster").stats == {k: 0.0 for k in COCO_STATS}
    val = golden / "e2e" / "val_s640_tta_rect.json.gz"
    fast = evaluate_keypoints(gt, val, coco_schema(), evaluator="faster")
    assert _same(fast, evaluate_keypoints(gt, val, coco_schema()))


def _same(a: KeypointMetrics, b: KeypointMetrics) -> bool:
    """faster-coco-eval sums in another order: equal to pycocotools within float rounding (1e-12)."""
    return list(a.stats) == list(b.stats) and all(abs(a[k] - b[k]) <= 1e-12 for k in a.stats)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("schema, evaluator", [
    (coco_schema(), None), (coco_schema(), "faster"), (crowdpose_schema(), None)])
def test_caller_dicts_are_not_modified(coco_gt, crowd_gt, schema, evaluator):
    if evaluator == "faster" and not faster_available():
        pytest.skip("faster-coco-eval not installed")
    gt = read_json(coco_gt if schema.evaluator == "coco" else crowd_gt)
    res = _noisy(gt, seed=5)
    gt_before, res_before = copy.deepcopy(gt), copy.deepcopy(res)
    evaluate_keypoints(gt, res, schema, evaluator=evaluator)
    assert gt == gt_before and res == res_before


def test_silent_unless_verbose(coco_gt, capsys):
    res = gt_as_results(coco_gt)
    evaluate_keypoints(coco_gt, res, coco_schema())
    assert capsys.readouterr().out == ""
    evaluate_keypoints(coco_gt, res, coco_schema(), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_metrics_table_and_json(coco_gt, tmp_path):
    m = evaluate_keypoints(coco_gt, gt_as_results(coco_gt), coco_schema())
    assert isinstance(m, KeypointMetrics) and m.ap == m["AP"] == m.ap50 == m.ar == 1.0
    lines = m.table().splitlines()
    assert "pycocotools" in lines[0] and "30 images" in lines[0]
    assert lines[1].split() == list(COCO_STATS) and lines[2].split() == ["1.000"] * 10
    out = m.to_json(tmp_path / "sub" / "metrics.json")
    assert json.loads(out.read_text()) == m.as_dict()
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left behind
    assert m.as_dict()["stats"] == m.stats and m.as_dict()["sigmas"] == pytest.approx(list(COCO_SIGMAS))


def test_undefined_stats_print_as_dash(crowd_gt):
    row = evaluate_keypoints(crowd_gt, [], crowdpose_schema()).table().splitlines()[2].split()
    assert row == ["0.000"] * 6 + ["-", "0.000", "-"]


# ----------------------------------------------------------------------------- bad input


def _gt_dict(coco_gt) -> dict:
    return read_json(coco_gt)


def test_unknown_image_ids_are_named(coco_gt):
    res = gt_as_results(coco_gt)[:2]
    res[0] = res[0] | {"image_id": 424242}
    res[1] = res[1] | {"image_id": 555}
    with pytest.raises(KapaoError, match=r"image ids that are not in .*person_keypoints.json: \[555, 424242\]"):
        evaluate_keypoints(coco_gt, res, coco_schema())
    with pytest.raises(KapaoError, match=r"image_ids \[7\] are not in the annotation file"):
        evaluate_keypoints(coco_gt, [], coco_schema(), image_ids=[785, 7])


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[0].pop("score"), r"result 0 has no \['score'\]"),
    (lambda r: r[1].__setitem__("keypoints", r[1]["keypoints"][:-3]), "result 1 has 48 keypoint numbers, expected 51"),
    (lambda r: r[2].__setitem__("score", float("nan")), "result 2 has score nan"),
    (lambda r: r[3]["keypoints"].__setitem__(4, float("inf")), "result 3 has non-finite keypoints"),
    (lambda r: r.__setitem__(0, [1, 2]), "result 0 is not a mapping"),
])
def test_bad_results_messages(coco_gt, mutate, message):
    res = gt_as_results(coco_gt)
    mutate(res)
    with pytest.raises(KapaoError, match=message):
        evaluate_keypoints(coco_gt, res, coco_schema())


def test_bad_files_and_gt(coco_gt, crowd_gt, tmp_path):
    with pytest.raises(KapaoError, match="nope.json: file not found"):
        evaluate_keypoints(tmp_path / "nope.json", [], coco_schema())
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(KapaoError, match="broken.json: not readable as JSON"):
        evaluate_keypoints(broken, [], coco_schema())
    with pytest.raises(KapaoError, match="expected a COCO results list"):
        evaluate_keypoints(coco_gt, coco_gt, coco_schema())
    with pytest.raises(KapaoError, match="has 17 keypoints .* but the schema .* has 14"):
        evaluate_keypoints(coco_gt, [], crowdpose_schema())
    gt = _gt_dict(coco_gt)
    del gt["annotations"][0]["area"]
    with pytest.raises(KapaoError, match=r"has no \['area'\] \(OKS divides by the object area\)"):
        evaluate_keypoints(gt, [], coco_schema())
    crowd = read_json(crowd_gt)
    del crowd["annotations"][0]["num_keypoints"]
    with pytest.raises(KapaoError, match=r"num_keypoints"):
        evaluate_keypoints(crowd, [], crowdpose_schema())
    with pytest.raises(KapaoError, match="no 'categories' list"):
        evaluate_keypoints({"images": [], "annotations": []}, [], coco_schema())
    with pytest.raises(KapaoError, match=r"evaluator 'faster' does not support the 'crowdpose' protocol"):
        evaluate_keypoints(crowd_gt, [], crowdpose_schema(), evaluator="faster")


def test_numpy_typed_results_are_accepted(coco_gt):
    """Results straight from a numpy pipeline (float32 scores, int64 ids, keypoint arrays) score the same."""
    res = [r | {"score": np.float32(1.0), "image_id": np.int64(r["image_id"]),
                "keypoints": np.asarray(r["keypoints"], np.float32)} for r in gt_as_results(coco_gt)]
    assert evaluate_keypoints(coco_gt, res, coco_schema()).stats == {k: 1.0 for k in COCO_STATS}
