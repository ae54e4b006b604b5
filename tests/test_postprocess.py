"""NMS, rescaling and keypoint-object fusion against the official goldens (postprocess.npz,
e2e/predict.npz), the NumPy NMS against torchvision.ops.nms, and the vectorized fusion against a
plain sequential reference. Only the torchvision comparisons need torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kapao.nms
import kapao.postprocess
from kapao.errors import KapaoError
from kapao.postprocess import (
    fuse_keypoints,
    nms,
    nms_kp,
    num_keypoints_from_columns,
    postprocess,
    postprocess_dets,
    rescale_dets,
    run_nms,
)
from kapao.presets import get_preset
from kapao.schema import KeypointSchema, coco_schema

PRESET_OF_GOLDEN = {"val": "val", "demo_image": "demo", "demo_video": "demo_video"}
INPUT_HW, ORIG_HW = (448, 640), (426, 640)


def reference_fuse(poses, scores, kp_objects, conf_thres_kp_person, overwrite_tol):
    """The official per-object loop, written plainly (one image): the reference for the vectorized path."""
    poses = np.array(poses, dtype=np.float64, copy=True)
    n_fused = np.zeros(poses.shape[1], dtype=np.int64)
    if not len(poses) or not len(kp_objects):
        return poses, n_fused
    mask = np.asarray(scores, np.float32) > np.float32(conf_thres_kp_person)
    chosen = poses[mask]
    if not len(chosen):
        return poses, n_fused
    for x1, y1, x2, y2, conf, kp_type in np.asarray(kp_objects, np.float32):
        x, y = np.mean(np.array([x1, x2], np.float32)), np.mean(np.array([y1, y2], np.float32))
        kps = chosen[:, int(kp_type)]  # a view: writes go into `chosen`
        dist = np.linalg.norm(kps[:, :2] - np.array([[x, y]]), axis=-1)
        m = np.argmin(dist)
        if conf > kps[m, 2] and dist[m] < overwrite_tol:
            kps[m] = [x, y, conf]
            n_fused[int(kp_type)] += 1
    poses[mask] = chosen
    return poses, n_fused


@pytest.fixture(scope="module")
def pp(golden):
    z = np.load(golden / "postprocess.npz")
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def pp_meta(golden):
    return json.loads((golden / "postprocess.json").read_text())


@pytest.fixture(scope="module")
def preds(golden, pp):
    forward = np.load(golden / "forward_s640.npz")["output"]
    return {"forward": forward, "crafted": pp["crafted_pred"]}


@pytest.mark.parametrize("which", ["forward", "crafted"])
@pytest.mark.parametrize("setting", ["val", "demo_image", "demo_video"])
def test_every_golden_field(pp, pp_meta, preds, which, setting):
    key = f"{which}__{setting}__"
    preset = get_preset(PRESET_OF_GOLDEN[setting])
    run = pp_meta["runs"][f"{which}__{setting}"]
    assert {k: getattr(preset, k) for k in run["thresholds"]} == run["thresholds"]
    assert preset.combined_nms == run["combined_nms_path"]
    assert pp_meta["img_hw"] == list(INPUT_HW) and pp_meta["orig_hw"] == list(ORIG_HW)
    pred = preds[which]
    assert int((pred[0, :, 4] > preset.conf_thres).sum()) == run["n_obj_gt_conf_thres"]

    person_dets, kp_dets = run_nms(pred, preset)
    assert person_dets[0].dtype == np.float32 and kp_dets[0].dtype == np.float32
    assert np.array_equal(person_dets[0], pp[key + "person_dets"])
    assert np.array_equal(kp_dets[0], pp[key + "kp_dets"])
    assert len(person_dets[0]) == run["n_person_dets"] and len(kp_dets[0]) == run["n_kp_dets"]
    # the official post-processing leaves this in person_dets (in place); ours returns it
    after = rescale_dets(person_dets[0], INPUT_HW, ORIG_HW)
    assert np.array_equal(after, pp[key + "person_dets_after_postprocess_inplace"])
    assert np.array_equal(person_dets[0], pp[key + "person_dets"])  # ours does not mutate

    (poses,) = postprocess(pred, preset, INPUT_HW, [ORIG_HW], coco_schema())
    assert len(poses) == run["n_poses"]
    assert poses.boxes.dtype == np.float32 and np.array_equal(poses.boxes, pp[key + "bboxes"])
    assert poses.scores.dtype == np.float32 and np.array_equal(poses.scores, pp[key + "scores"])
    assert poses.keypoints.dtype == np.float64 and np.array_equal(poses.keypoints, pp[key + "poses"])
    assert poses.image_hw == ORIG_HW
    assert poses.kp_objects.shape == (run["n_kp_dets"], 6)

    # n_fused through the public fusion function, and against the sequential reference
    scores = pp[key + "scores"]
    kps = after[:, 6:].reshape(-1, 17, 2)
    start = np.concatenate((kps, np.zeros((len(kps), 17, 1))), 2)
    fused, n_fused = fuse_keypoints([start], [scores], [poses.kp_objects], preset.conf_thres_kp_person,
                                    preset.overwrite_tol)
    assert np.array_equal(fused[0], pp[key + "poses"])
    assert n_fused[0].tolist() == pp[key + "n_fused"].tolist() == run["n_fused"]
    assert int((poses.keypoints[..., 2] > 0).sum()) == run["n_pose_kps_with_conf"] == run["n_fused_total"]
    ref, ref_n = reference_fuse(start, scores, poses.kp_objects, preset.conf_thres_kp_person, preset.overwrite_tol)
    assert np.array_equal(ref, fused[0]) and np.array_equal(ref_n, n_fused[0])


def _edge_boxes(dets: np.ndarray) -> list[float]:
    """Confidences of the crafted edge rows (all share the box cx 320, cy 100, w 40, h 80)."""
    hit = (dets[:, :4] == np.array([300.0, 60.0, 340.0, 140.0], np.float32)).all(1)
    return [round(float(c), 6) for c in dets[hit, 4]]


def test_strict_confidence_thresholds(pp_meta, preds):
    meta = pp_meta["crafted_row_meta"]
    pred = preds["crafted"]
    for label, obj in (("edge_obj_0.001", 0.001), ("edge_obj_0.5", 0.5), ("edge_obj_0.7", 0.7)):
        assert pred[0, meta.index(label), 4] == np.float32(obj)
    # obj == threshold is dropped (strict >, float32): 0.001 never survives, 0.7 not at conf 0.7,
    # 0.5 not at conf 0.5; at val the 0.5 and 0.7 rows overlap fully and NMS keeps the 0.7 one
    assert _edge_boxes(run_nms(pred, "val")[0][0]) == [0.7]
    assert _edge_boxes(run_nms(pred, "demo")[0][0]) == []
    assert _edge_boxes(run_nms(pred, "demo_video")[0][0]) == [0.7]


def test_combined_nms_rule():
    assert not get_preset("val").combined_nms and not get_preset("demo").combined_nms
    assert get_preset("demo_video").combined_nms
    assert not get_preset("demo_video", conf_thres_kp=0.4).combined_nms  # kp threshold below person
    assert not get_preset("demo_video", iou_thres_kp=0.5).combined_nms


def test_combined_nms_shares_max_det(preds):
    # combined path: persons and keypoint objects come out of one NMS call capped at max_det
    preset = get_preset("demo_video", max_det=20)
    person, kp = run_nms(preds["crafted"], preset)
    assert len(person[0]) + len(kp[0]) <= 20
    full = run_nms(preds["crafted"], get_preset("demo_video"))
    assert len(full[0][0]) + len(full[1][0]) > 20
    # separate path: each call has its own cap
    person, kp = run_nms(preds["forward"], get_preset("demo", max_det=5))
    assert len(person[0]) == 5 and len(kp[0]) == 5


def test_nms_rows_equal_nms_on_those_rows(preds):
    # nms_kp over a subset of row indices (what run_nms passes after its one objectness filter)
    # gives what nms_kp gives on the copied subset, for both golden predictions
    for pred in (preds["forward"][0], preds["crafted"][0]):
        rng = np.random.default_rng(0)
        rows = np.flatnonzero(rng.random(len(pred)) < 0.6)  # ascending, ~60 %
        for thr, classes in ((0.1, None), (0.3, [0]), (0.2, range(1, 18))):
            a = nms_kp(pred, thr, 0.45, 17, classes=classes, rows=rows)
            b = nms_kp(pred[rows], thr, 0.45, 17, classes=classes)
            assert len(a) > 0 and a.dtype == np.float32
            np.testing.assert_array_equal(a, b)


def test_nms_class_argmax_first_index_on_ties():
    k = 2
    row = np.array([[50.0, 50.0, 20.0, 20.0, 0.9, 0.5, 0.8, 0.8, 1.0, 2.0, 3.0, 4.0]], np.float32)
    det = nms_kp(row, 0.1, 0.5, k)
    assert det[0, 5] == 1.0  # classes 1 and 2 tie: the first wins
    assert det[0, 4] == np.float32(0.8) * np.float32(0.9)
    assert det[0, :4].tolist() == [40.0, 40.0, 60.0, 60.0] and det[0, 6:].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_clip_all_keypoints_switch(preds):
    official = postprocess(preds["crafted"], "val", INPUT_HW, [ORIG_HW], coco_schema())[0]
    clipped = postprocess(preds["crafted"], get_preset("val", clip_all_keypoints=True), INPUT_HW, [ORIG_HW],
                          coco_schema())[0]
    h, w = ORIG_HW

    def outside(kps):
        return (kps[..., 0] < 0) | (kps[..., 0] > w) | (kps[..., 1] < 0) | (kps[..., 1] > h)

    assert not outside(official.keypoints[:, :2]).any()  # keypoints 0 and 1 are clipped
    assert outside(official.keypoints[:, 2:]).any()  # the official quirk: the rest are not
    assert not outside(clipped.keypoints).any()
    assert np.array_equal(official.boxes, clipped.boxes)


def test_no_kp_dets_keeps_pose_keypoints(preds):
    poses = postprocess(preds["crafted"], get_preset("val", use_kp_dets=False), INPUT_HW, [ORIG_HW], coco_schema())[0]
    assert (poses.keypoints[..., 2] == 0).all()
    pd, _ = run_nms(preds["crafted"], "val")
    kps = rescale_dets(pd[0], INPUT_HW, ORIG_HW)[:, 6:].reshape(-1, 17, 2)
    assert np.array_equal(poses.keypoints[..., :2], kps.astype(np.float64))


def test_batched_equals_per_image(preds):
    crafted = preds["crafted"]
    forward = preds["forward"]
    padded = np.zeros_like(forward)
    padded[0, : crafted.shape[1]] = crafted[0]  # zero rows (obj 0) never pass the filter
    batch = np.concatenate((padded, forward, padded))
    # the third image was letterboxed from a half-size original (gain 2, pad (0, 11))
    orig_hws = [ORIG_HW, ORIG_HW, (213, 320)]
    for preset in ("val", "demo", "demo_video"):
        together = postprocess(batch, preset, INPUT_HW, orig_hws, coco_schema(), paths=["a", "b", "c"])
        assert [p.path for p in together] == ["a", "b", "c"]
        for i in range(3):
            alone = postprocess(batch[i : i + 1], preset, INPUT_HW, [orig_hws[i]], coco_schema())[0]
            assert np.array_equal(together[i].keypoints, alone.keypoints)
            assert np.array_equal(together[i].boxes, alone.boxes)
            assert np.array_equal(together[i].kp_objects, alone.kp_objects)
            p = get_preset(preset)
            start = _unfused(batch[i : i + 1], preset, orig_hws[i])
            ref, _ = reference_fuse(start, alone.scores, alone.kp_objects, p.conf_thres_kp_person, p.overwrite_tol)
            assert np.array_equal(ref, alone.keypoints)
        assert together[2].image_hw == (213, 320)
        assert (together[2].boxes[:, 2] <= 320).all() and (together[2].boxes[:, 3] <= 213).all()


def _unfused(pred, preset, orig_hw):
    pd, _ = run_nms(pred, preset)
    kps = rescale_dets(pd[0], INPUT_HW, orig_hw)[:, 6:].reshape(-1, 17, 2)
    return np.concatenate((kps, np.zeros((len(kps), 17, 1))), 2)


def test_empty_prediction():
    pred = np.zeros((2, 100, 57), np.float32)
    out = postprocess(pred, "val", INPUT_HW, [ORIG_HW, ORIG_HW], coco_schema())
    assert len(out) == 2
    for p in out:
        assert len(p) == 0 and p.boxes.shape == (0, 4) and p.keypoints.shape == (0, 17, 3)
        assert p.kp_objects.shape == (0, 6)


def test_other_keypoint_counts():
    schema = KeypointSchema(names=("a", "b", "c"), flip_index=(0, 2, 1))
    assert num_keypoints_from_columns(15) == 3 and num_keypoints_from_columns(57) == 17
    pred = np.zeros((1, 4, 15), np.float32)
    pred[0, 0, :5] = [50.0, 50.0, 40.0, 40.0, 0.9]
    pred[0, 0, 5] = 1.0
    pred[0, 0, 9:] = [40.0, 40.0, 60.0, 40.0, 50.0, 60.0]
    pred[0, 1, :5] = [61.0, 39.0, 8.0, 8.0, 0.95]
    pred[0, 1, 7] = 1.0  # keypoint object of type b (class 2)
    (poses,) = postprocess(pred, "demo", (128, 128), [(128, 128)], schema)
    assert len(poses) == 1
    assert poses.keypoints[0].tolist() == [[40.0, 40.0, 0.0], [61.0, 39.0, pytest.approx(0.95)], [50.0, 60.0, 0.0]]
    assert poses.kp_objects[:, 5].tolist() == [1.0]


def test_bad_inputs():
    with pytest.raises(KapaoError, match="57"):
        postprocess(np.zeros((1, 10, 50)), "val", INPUT_HW, [ORIG_HW], coco_schema())
    with pytest.raises(KapaoError, match="columns"):
        num_keypoints_from_columns(50)
    with pytest.raises(KapaoError, match="image sizes"):
        postprocess(np.zeros((2, 10, 57)), "val", INPUT_HW, [ORIG_HW], coco_schema())
    with pytest.raises(KapaoError, match="run_nms"):
        run_nms(np.zeros((10, 57)), "val")
    with pytest.raises(KapaoError, match="kp_type"):
        fuse_keypoints([np.zeros((1, 3, 3))], [np.ones(1)], [np.array([[0, 0, 1, 1, 0.9, 3]])], 0.1, 10)
    with pytest.raises(KapaoError, match="unknown preset"):
        postprocess(np.zeros((1, 10, 57)), "fast", INPUT_HW, [ORIG_HW], coco_schema())


# ---------------------------------------------------------------------------------------------
# the vectorized fusion equals the sequential loop, including adversarial orders


def test_later_object_blocked_by_current_keypoint():
    """Sequential semantics: object A moves person 0's keypoint; object B (same type, lower conf) then
    finds person 0 nearest and may not overwrite it, so person 1 gets nothing, although B is
    within tolerance of person 1's original keypoint."""
    poses = np.zeros((2, 1, 3))
    poses[0, 0, :2] = (0.0, 0.0)
    poses[1, 0, :2] = (40.0, 0.0)
    # A at (14, 0) goes to person 0 (14 vs 26 px); B at (24, 0) is then 10 px from person 0's new
    # keypoint and 16 px from person 1: person 0 is nearest, and B is less confident than A
    objs = np.array([[12, -1, 16, 1, 0.9, 0], [22, -1, 26, 1, 0.8, 0]], np.float32)
    fused, n = fuse_keypoints([poses], [np.ones(2, np.float32)], [objs], 0.5, 50)
    assert fused[0][:, 0].tolist() == [[14.0, 0.0, pytest.approx(0.9)], [40.0, 0.0, 0.0]]
    assert n.tolist() == [[1]]
    # a higher-confidence later object overwrites again (order, not confidence, drives the loop)
    objs[1, 4] = 0.95
    fused, n = fuse_keypoints([poses], [np.ones(2, np.float32)], [objs], 0.5, 50)
    assert fused[0][:, 0].tolist() == [[24.0, 0.0, pytest.approx(0.95)], [40.0, 0.0, 0.0]]
    assert n.tolist() == [[2]]
    ref, ref_n = reference_fuse(poses, np.ones(2), objs, 0.5, 50)
    assert np.array_equal(ref, fused[0]) and ref_n.tolist() == [2]


def test_threshold_and_tolerance_are_strict():
    poses = np.zeros((2, 1, 3))
    poses[1, 0, :2] = (100.0, 100.0)
    scores = np.array([0.3, 0.31], np.float32)  # person 0 at exactly the threshold: excluded
    objs = np.array([[0, 0, 0, 0, 0.9, 0], [125, 100, 125, 100, 0.9, 0]], np.float32)  # dist 25 from person 1
    fused, n = fuse_keypoints([poses], [scores], [objs], 0.3, 25)
    assert n.tolist() == [[0]]  # obj 0 -> person 1 (only candidate) at dist 141; obj 1 at dist == tol
    fused, n = fuse_keypoints([poses], [scores], [objs], 0.3, 25.0001)
    assert n.tolist() == [[1]] and fused[0][1, 0].tolist() == [125.0, 100.0, pytest.approx(0.9)]
    # a tie in confidence does not overwrite (strict >)
    objs = np.array([[100, 100, 100, 100, 0.9, 0], [101, 100, 101, 100, 0.9, 0]], np.float32)
    fused, n = fuse_keypoints([poses], [scores], [objs], 0.3, 25)
    assert n.tolist() == [[1]] and fused[0][1, 0, 0] == 100.0


def _random_case(rng, k, n_img):
    poses, scores, objs = [], [], []
    for _ in range(n_img):
        n = int(rng.integers(0, 7))
        p = np.zeros((n, k, 3))
        p[..., :2] = rng.integers(0, 24, size=(n, k, 2))  # crowded: equal distances happen
        p[..., 2] = rng.choice([0.0, 0.0, 0.3, 0.6], size=(n, k))  # some start with a stored conf
        poses.append(p)
        scores.append(rng.choice([0.1, 0.3, 0.30000001, 0.5, 0.9], size=n).astype(np.float32))
        m = int(rng.integers(0, 40))
        centre = rng.integers(-4, 28, size=(m, 2))
        half = rng.integers(0, 3, size=(m, 2))  # odd widths make .5 means
        o = np.zeros((m, 6), np.float32)
        o[:, 0:2] = centre - half
        o[:, 2:4] = centre + half + rng.integers(0, 2, size=(m, 2))
        o[:, 4] = rng.choice([0.2, 0.35, 0.5, 0.5, 0.7, 0.9], size=m)  # ties, unsorted
        o[:, 5] = rng.choice(np.arange(k), size=m, p=None if k < 3 else [0.6] + [0.4 / (k - 1)] * (k - 1))
        if rng.random() < 0.5:
            o = o[np.argsort(-o[:, 4], kind="stable")]  # NMS-like order half of the time
        objs.append(o)
    return poses, scores, objs


@pytest.mark.parametrize("budget", [1, 64, 2048, 10**7])  # one object per step ... whole groups per step
@pytest.mark.parametrize("seed", range(60))
def test_vectorized_fusion_equals_sequential(seed, budget, monkeypatch):
    monkeypatch.setattr(kapao.postprocess, "FUSE_STEP_BUDGET", budget)
    rng = np.random.default_rng(seed)
    k = int(rng.choice([1, 2, 3, 17]))
    poses, scores, objs = _random_case(rng, k, int(rng.integers(1, 4)))
    thr, tol = float(rng.choice([0.0, 0.3])), float(rng.choice([3.0, 8.0, 15.0, 50.0]))
    fused, n_fused = fuse_keypoints(poses, scores, objs, thr, tol)
    for b in range(len(poses)):
        ref, ref_n = reference_fuse(poses[b], scores[b], objs[b], thr, tol)
        assert np.array_equal(fused[b], ref), (seed, b)
        assert np.array_equal(n_fused[b], ref_n), (seed, b)
        assert fused[b] is not poses[b]


@pytest.mark.parametrize("budget", [1, 2048])
def test_fusion_many_objects_one_type(budget, monkeypatch):
    """300 objects of one type chasing 40 persons in a small area (the slowest case for stepping)."""
    monkeypatch.setattr(kapao.postprocess, "FUSE_STEP_BUDGET", budget)
    rng = np.random.default_rng(7)
    poses = np.zeros((40, 17, 3))
    poses[..., :2] = rng.uniform(0, 60, size=(40, 17, 2)).astype(np.float32)
    o = np.zeros((300, 6), np.float32)
    c = rng.uniform(0, 60, size=(300, 2))
    o[:, :2], o[:, 2:4] = c - 16, c + 16
    o[:, 4] = rng.uniform(0.2, 1.0, 300)
    o[:, 5] = 3
    scores = np.full(40, 0.9, np.float32)
    fused, n = fuse_keypoints([poses], [scores], [o], 0.3, 25)
    ref, ref_n = reference_fuse(poses, scores, o, 0.3, 25)
    assert np.array_equal(fused[0], ref) and np.array_equal(n[0], ref_n) and ref_n[3] > 10


# ---------------------------------------------------------------------------------------------
# the official checkpoint's predictions (e2e): NMS outputs -> poses at gains != 1


def test_postprocess_dets_matches_e2e_predict(shared):
    e2e = shared / "golden" / "e2e"
    z = np.load(e2e / "predict.npz")
    runs = json.loads((e2e / "predict.json").read_text())["runs"]
    assert len(runs) == 20
    for key, run in runs.items():
        setting = run["setting"]
        preset = get_preset(setting)
        assert {k: getattr(preset, k) for k in ("conf_thres", "iou_thres", "conf_thres_kp", "iou_thres_kp",
                                                 "conf_thres_kp_person", "overwrite_tol")} == {
            k: run["thresholds"][k] for k in ("conf_thres", "iou_thres", "conf_thres_kp", "iou_thres_kp",
                                              "conf_thres_kp_person", "overwrite_tol")}
        pd = z[f"{key}__person_dets"]
        kd = z[f"{key}__kp_dets"]
        (poses,) = postprocess_dets([pd], [kd], preset, run["input_chw"][1:], [run["orig_hw"]], coco_schema())
        assert np.array_equal(poses.keypoints, z[f"{key}__poses"]), key
        assert np.array_equal(poses.boxes, z[f"{key}__bboxes"]), key
        assert np.array_equal(poses.scores, z[f"{key}__scores"]), key
        assert int((poses.keypoints[..., 2] > 0).sum()) == run["n_pose_kps_fused"], key


# ---------------------------------------------------------------------------------------------
# presets


def test_presets_values_and_overrides():
    from dataclasses import FrozenInstanceError

    from kapao.presets import preset_names

    assert preset_names() == ["val", "demo", "demo_video"]
    val, demo, video = get_preset("val"), get_preset("demo"), get_preset("demo_video")
    assert (val.conf_thres, val.iou_thres, val.conf_thres_kp, val.iou_thres_kp, val.conf_thres_kp_person,
            val.overwrite_tol) == (0.001, 0.65, 0.2, 0.25, 0.3, 50)
    assert (demo.conf_thres, demo.iou_thres, demo.conf_thres_kp, demo.iou_thres_kp, demo.conf_thres_kp_person,
            demo.overwrite_tol) == (0.7, 0.45, 0.5, 0.45, 0.2, 25)
    assert (video.conf_thres, video.overwrite_tol) == (0.5, 50)
    assert (video.iou_thres, video.conf_thres_kp, video.iou_thres_kp, video.conf_thres_kp_person) == (
        demo.iou_thres, demo.conf_thres_kp, demo.iou_thres_kp, demo.conf_thres_kp_person)
    for p in (val, demo, video):
        assert p.use_kp_dets and p.max_det == 300 and p.max_nms == 30000 and not p.clip_all_keypoints
    custom = get_preset("demo", conf_thres=0.6, max_det=50, iou_thres_kp=None)
    assert custom.conf_thres == 0.6 and custom.max_det == 50 and custom.iou_thres_kp == 0.45
    assert get_preset("demo").conf_thres == 0.7  # the shipped preset is unchanged
    assert get_preset(custom) is custom and get_preset(custom, overwrite_tol=10).overwrite_tol == 10
    with pytest.raises(FrozenInstanceError):
        custom.conf_thres = 0.1
    text = str(val)
    assert "preset val" in text and "conf_thres_kp_person" in text and "separate" in text
    assert "combined" in str(video)
    assert val.to_dict()["iou_thres"] == 0.65


def test_preset_errors():
    with pytest.raises(KapaoError, match="unknown preset 'fast'.*val, demo, demo_video"):
        get_preset("fast")
    with pytest.raises(KapaoError, match="unknown field.*conf"):
        get_preset("val", conf=0.3)
    with pytest.raises(KapaoError, match="conf_thres is 1.5"):
        get_preset("val", conf_thres=1.5)
    with pytest.raises(KapaoError, match="overwrite_tol"):
        get_preset("val", overwrite_tol=0)
    with pytest.raises(KapaoError, match="max_det"):
        get_preset("val", max_det=0)
    with pytest.raises(KapaoError, match="use_kp_dets"):
        get_preset("val", use_kp_dets="yes")




def test_half_precision_predictions(preds):
    """fp16 predictions (--half) are widened to float32 and give the float32 poses closely."""
    full = postprocess(preds["crafted"], "demo", INPUT_HW, [ORIG_HW], coco_schema())[0]
    half = postprocess(preds["crafted"].astype(np.float16), "demo", INPUT_HW, [ORIG_HW], coco_schema())[0]
    assert len(half) == len(full) and len(half.kp_objects) == len(full.kp_objects)
    np.testing.assert_allclose(half.keypoints[..., :2], full.keypoints[..., :2], atol=0.5)
    np.testing.assert_allclose(half.scores, full.scores, atol=1e-3)


def test_torch_tensors_are_read_as_arrays(preds):
    """Array-likes go through np.asarray: CPU torch tensors (fp32 and fp16) give the NumPy results,
    and the outputs are NumPy whatever came in."""
    torch = pytest.importorskip("torch")
    for preset in ("val", "demo", "demo_video"):
        ref = postprocess(preds["crafted"], preset, INPUT_HW, [ORIG_HW], coco_schema())[0]
        got = postprocess(torch.from_numpy(preds["crafted"]), preset, INPUT_HW, [ORIG_HW], coco_schema())[0]
        assert np.array_equal(ref.keypoints, got.keypoints) and np.array_equal(ref.boxes, got.boxes)
        pd, kd = run_nms(torch.from_numpy(preds["forward"]), preset)
        rpd, rkd = run_nms(preds["forward"], preset)
        assert isinstance(pd[0], np.ndarray) and np.array_equal(pd[0], rpd[0]) and np.array_equal(kd[0], rkd[0])
        (a,) = postprocess_dets([torch.from_numpy(rpd[0])], [torch.from_numpy(rkd[0])], preset, INPUT_HW, [ORIG_HW],
                                coco_schema())
        (b,) = postprocess_dets(rpd, rkd, preset, INPUT_HW, [ORIG_HW], coco_schema())
        assert np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.kp_objects, b.kp_objects)
    half = postprocess(torch.from_numpy(preds["crafted"]).half(), "demo", INPUT_HW, [ORIG_HW], coco_schema())[0]
    ref = postprocess(preds["crafted"].astype(np.float16), "demo", INPUT_HW, [ORIG_HW], coco_schema())[0]
    assert np.array_equal(half.keypoints, ref.keypoints)


def test_cuda_predictions_match_cpu(preds):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for preset in ("val", "demo", "demo_video"):
        cpu = postprocess(preds["crafted"], preset, INPUT_HW, [ORIG_HW], coco_schema())[0]
        gpu = postprocess(torch.from_numpy(preds["crafted"]).cuda(), preset, INPUT_HW, [ORIG_HW], coco_schema())[0]
        assert np.array_equal(gpu.keypoints, cpu.keypoints) and np.array_equal(gpu.scores, cpu.scores)


# ---------------------------------------------------------------------------------------------
# the NumPy NMS against torchvision.ops.nms (the official path): same kept indices, same order


def _tv_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()


def _random_boxes(rng, n: int, n_classes: int = 1, extent: float = 600, size: float = 80) -> np.ndarray:
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(2, size, (n, 2))
    cls = rng.integers(0, n_classes, n)
    return (np.concatenate((xy, xy + wh), 1) + cls[:, None] * 4096).astype(np.float32)


def _assert_nms_equal(boxes, scores, iou, caps=(None,)):
    ref = _tv_nms(boxes, scores, iou)
    for cap in caps:
        got = nms(boxes, scores, iou, cap)
        want = ref if cap is None else ref[:cap]
        assert got.dtype == np.int64 and np.array_equal(got, want), (len(boxes), iou, cap, len(got), len(want))
    return ref


@pytest.mark.parametrize("seed", range(12))
def test_nms_equals_torchvision_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 7, 64, 255, 256, 257, 900, 3000]))
    boxes = _random_boxes(rng, n, extent=float(rng.choice([50, 300, 1500])), size=float(rng.choice([10, 80, 300])))
    scores = rng.random(n).astype(np.float32)
    for iou in (0.0, 0.25, 0.45, 0.5, 0.65, 0.9):
        _assert_nms_equal(boxes, scores, iou)


@pytest.mark.parametrize("seed", range(6))
def test_nms_equals_torchvision_ties_and_many_classes(seed):
    """Scores on a coarse grid (exact ties everywhere: torchvision's stable order, lower index
    first) and boxes of up to 80 classes offset by cls * 4096 as nms_kp does."""
    rng = np.random.default_rng(100 + seed)
    n = 2500
    boxes = _random_boxes(rng, n, n_classes=int(rng.choice([2, 18, 80])), extent=400)
    scores = (np.round(rng.random(n) * 10) / 10).astype(np.float32)
    for iou in (0.25, 0.45, 0.65):
        ref = _tv_nms(boxes, scores, iou)
        # caps below, at and above the number kept
        _assert_nms_equal(boxes, scores, iou, caps=(None, 1, 30, 300, len(ref) - 1, len(ref), len(ref) + 1, 10 * n))


# (chunk, max pairs, block): the x-overlap pairs path in one chunk or many, the dense fallback
SETTINGS = [(512, 1 << 20, 256), (10**6, 10**9, 256), (7, 1 << 20, 256), (64, 0, 16), (300, 0, 97), (10**6, 0, 10**6)]


@pytest.mark.parametrize("chunk,max_pairs,block", SETTINGS)
def test_nms_speed_settings_never_change_the_result(chunk, max_pairs, block, monkeypatch):
    """Long suppression chains (each box overlaps the next only: greedy keeps every other one),
    dense clusters and random many-class boxes, across chunk and block boundaries."""
    monkeypatch.setattr(kapao.nms, "NMS_CHUNK", chunk)
    monkeypatch.setattr(kapao.nms, "NMS_MAX_PAIRS", max_pairs)
    monkeypatch.setattr(kapao.nms, "NMS_BLOCK", block)
    x = np.arange(600, dtype=np.float32) * 6  # 10-px boxes 6 px apart: IoU(i, i+1) = 0.25, (i, i+2) = 0
    chain = np.stack((x, np.zeros_like(x), x + 10, np.full_like(x, 10)), 1)
    scores = np.linspace(1, 0.1, 600, dtype=np.float32)
    ref = _assert_nms_equal(chain, scores, 0.2, caps=(None, 7, 299, 300, 301))
    assert np.array_equal(ref, np.arange(0, 600, 2))
    rng = np.random.default_rng(7)
    centres = rng.uniform(0, 2000, (40, 2))
    xy = centres[rng.integers(0, 40, 3000)] + rng.random((3000, 2))
    cluster = np.concatenate((xy, xy + 50), 1).astype(np.float32)
    ref = _assert_nms_equal(cluster, rng.random(3000).astype(np.float32), 0.45, caps=(None, 5, 300))
    assert 30 <= len(ref) < 300  # fewer survivors than the cap: every candidate is visited
    boxes = _random_boxes(rng, 1500, n_classes=18, extent=300)
    ties = (np.round(rng.random(1500) * 5) / 5).astype(np.float32)
    for iou in (0.0, 0.45):
        _assert_nms_equal(boxes, ties, iou, caps=(None, 1, 300))


def test_nms_threshold_compared_in_double():
    """torchvision compares the float32 IoU with the threshold as a double: an IoU that equals
    float32(thr) but is above thr in double suppresses; a threshold equal to the IoU does not."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 7]], np.float32)  # IoU 0.7 (float32 0.69999999)
    scores = np.array([0.9, 0.8], np.float32)
    iou = float(np.float32(70) / np.float32(100))
    assert float(np.float32(0.7)) < 0.7  # so float32(0.7) > 0.7 fails in double ...
    for thr in (0.7, iou, iou - 1e-12, np.nextafter(iou, 0), np.nextafter(iou, 1)):
        _assert_nms_equal(boxes, scores, float(thr))
    assert len(nms(boxes, scores, iou - 1e-12)) == 1 and len(nms(boxes, scores, iou)) == 2


def test_nms_empty_and_degenerate_inputs():
    empty = np.zeros((0, 4), np.float32)
    assert nms(empty, np.zeros(0, np.float32), 0.5).shape == (0,)
    assert np.array_equal(nms(empty, np.zeros(0, np.float32), 0.5), _tv_nms(empty, np.zeros(0, np.float32), 0.5))
    one = np.array([[1, 1, 5, 5]], np.float32)
    assert nms(one, np.array([0.3], np.float32), 0.5, max_det=300).tolist() == [0]
    # zero-area boxes: IoU 0 / 0 = NaN, never above the threshold (as torchvision)
    flat = np.array([[1, 1, 1, 5], [1, 1, 1, 5], [0, 0, 4, 4]], np.float32)
    _assert_nms_equal(flat, np.array([0.9, 0.8, 0.7], np.float32), 0.1)
    with pytest.raises(KapaoError, match="nms"):
        nms(one, np.zeros(2, np.float32), 0.5)


def test_nms_kp_equals_torchvision_class_offset_call(preds):
    """nms_kp on the golden forward output at a loose threshold (thousands of candidates, 18
    classes): the rows of the official one torchvision call over class-offset boxes, cut at max_det."""
    pred = preds["forward"][0]
    for thr, iou, max_det in ((0.3, 0.45, 300), (0.2, 0.65, 30000), (0.5, 0.25, 1)):
        nc = 18
        prod = pred[:, 5 : 5 + nc] * pred[:, 4:5]
        j, conf = prod.argmax(1), prod.max(1)
        rows = np.flatnonzero((pred[:, 4] > np.float32(thr)) & (conf > np.float32(thr)))
        xywh = pred[rows, :4]
        half = xywh[:, 2:4] / np.float32(2)
        xyxy = np.concatenate((xywh[:, :2] - half, xywh[:, :2] + half), 1)
        boxes = xyxy + j[rows, None].astype(np.float32) * np.float32(4096)
        keep = _tv_nms(boxes, conf[rows], iou)[:max_det]
        got = nms_kp(pred, thr, iou, 17, max_det=max_det)
        assert len(rows) > 1000 or thr == 0.5
        assert np.array_equal(got[:, :4], xyxy[keep]) and np.array_equal(got[:, 4], conf[rows][keep])
        assert np.array_equal(got[:, 5], j[rows][keep].astype(np.float32))
        assert np.array_equal(got[:, 6:], pred[rows[keep], 23:])


def test_postprocess_imports_no_torch():
    """NMS, rescaling, letterbox and tracking work without torch (the base install)."""
    import subprocess
    import sys

    code = ("import sys; import kapao.postprocess, kapao.data.letterbox, kapao.track; "
            "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
