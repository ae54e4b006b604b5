"""Letterbox pre-processing and the inverse mapping against the official goldens (letterbox.json,
e2e/predict.npz) and known answers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from kapao.data.letterbox import (
    check_img_size,
    letterbox,
    load_image_for_val,
    prepare_input,
    preprocess_demo,
    preprocess_val,
    read_image,
    rect_batch_shapes,
    scale_boxes,
    scale_keypoints,
    to_chw_rgb,
    to_input_batch,
)
from kapao.errors import KapaoError


def md5(a: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def lb(golden):
    return json.loads((golden / "letterbox.json").read_text())


@pytest.fixture(scope="module")
def image_a(golden):
    return np.load(golden / "inputs.npz")["A_bgr"]


def _new_shape(v):
    return v if isinstance(v, int) else tuple(v)


def test_letterbox_table(lb):
    rows = lb["letterbox_table"]
    assert len(rows) == 288
    for row in rows:
        h, w = row["orig_hw"]
        img = np.zeros((h, w, 3), np.uint8)
        out, ratio, pad = letterbox(img, _new_shape(row["new_shape"]), row["auto"], row["scaleup"], row["stride"])
        assert list(out.shape[:2]) == row["out_hw"], row
        assert list(ratio) == row["ratio"], row
        assert list(pad) == row["pad_dwdh"], row
        # the border: top = round(dh - 0.1), left = round(dw - 0.1), filled with 114
        dw, dh = pad
        top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
        inner = out[top : out.shape[0] - int(round(dh + 0.1)), left : out.shape[1] - int(round(dw + 0.1))]
        assert inner.size == 0 or inner.max() == 0, row
        assert (out == 114).sum() == out.size - inner.size, row


def test_letterbox_border_split_known_answer():
    # 427x640 into 640 square (no resize): dh = 106.5 -> 106 on top, 107 at the bottom.
    out, ratio, (dw, dh) = letterbox(np.zeros((427, 640, 3), np.uint8), 640, auto=False, scaleup=False)
    assert (dw, dh) == (0.0, 106.5) and ratio == (1.0, 1.0)
    assert (out[:106] == 114).all() and (out[106:533] == 0).all() and (out[533:] == 114).all()
    # colour as a BGR tuple
    out, _, _ = letterbox(np.zeros((10, 20, 3), np.uint8), 32, auto=False, color=(1, 2, 3))
    assert out[0, 0].tolist() == [1, 2, 3]


def _pipeline_items(case, hws):
    """Our val pipeline for one dataloader case: (files in our order, batch index, chw, shapes)."""
    files = [it["file"] for it in case["order_after_rect_sort"]]
    if case["rect"]:
        order, batch_shapes = rect_batch_shapes([hws[f] for f in files], case["imgsz"], case["batch_size"],
                                                case["stride"], case["pad"])
        files = [files[i] for i in order]
    else:
        batch_shapes = None
    out = []
    for i, f in enumerate(files):
        b = i // case["batch_size"]
        shape = tuple(batch_shapes[b]) if batch_shapes is not None else None
        chw, shapes = preprocess_val(np.zeros((*hws[f], 3), np.uint8), case["imgsz"], shape)
        out.append((f, b, chw, shapes))
    return out, batch_shapes


def test_dataloader_pipeline(lb):
    cases = lb["dataloader_pipeline"]
    assert len(cases) == 6
    for case in cases:
        hws = {}
        for it in case["order_after_rect_sort"]:
            hws[it["file"]] = tuple(int(v) for v in it["file"].split("_")[1].split(".")[0].split("x"))
        items, batch_shapes = _pipeline_items(case, hws)
        if case["rect"]:
            assert batch_shapes.tolist() == case["batch_shapes"]
        else:
            assert case["batch_shapes"] is None
        ref = case["order_after_rect_sort"]
        # rect sorts by h/w; the official sort is not stable, so equal ratios may come in either order
        ours_ar = [hws[f][0] / hws[f][1] for f, *_ in items]
        ref_ar = [hws[it["file"]][0] / hws[it["file"]][1] for it in ref]
        assert ours_ar == ref_ar
        by_file = {it["file"]: it for it in ref}
        for f, b, chw, shapes in items:
            want = by_file[f]
            assert b == want["batch"], (case["imgsz"], f)
            assert list(chw.shape) == want["tensor_chw"], (case["imgsz"], f)
            assert json.loads(json.dumps(shapes)) == want["shapes"], (case["imgsz"], f)


def test_real_image_checksums(lb, golden, image_a):
    real = lb["real_image"]
    assert md5(image_a) == lb["real_image_decoded_bgr"]["md5"]
    assert md5(read_image(golden / "crowdpose_100024.jpg")) == lb["real_image_decoded_bgr"]["md5"]
    for size in (640, 1280):
        chw, ratio, pad = preprocess_demo(image_a, size)
        ref = real[f"demo_LoadImages_{size}"]
        assert list(chw.shape) == ref["chw_rgb"]["shape"] and chw.dtype == np.uint8
        assert md5(chw) == ref["chw_rgb"]["md5"]
        assert list(ratio) == ref["ratio"] and list(pad) == ref["pad"]
        assert md5(chw[::-1].transpose(1, 2, 0)) == ref["letterbox_hwc_bgr"]["md5"]
        assert chw.reshape(3, -1).sum(1, dtype=np.int64).tolist() == ref["per_channel_sum_rgb"]

        raw, ratio, pad = letterbox(image_a, size, auto=False, scaleup=False)
        ref = real[f"letterbox_auto0_scaleup0_{size}"]
        assert md5(raw) == ref["hwc_bgr"]["md5"] and list(ratio) == ref["ratio"] and list(pad) == ref["pad"]

        chw, shapes = preprocess_val(golden / "crowdpose_100024.jpg", size)
        ref = real[f"val_dataloader_{size}"]
        assert md5(chw) == ref["chw_rgb"]["md5"]
        assert json.loads(json.dumps(shapes)) == ref["shapes"]


def test_demo_preprocessing_matches_e2e_inputs(shared):
    runs = json.loads((shared / "golden" / "e2e" / "predict.json").read_text())["runs"]
    seen = set()
    for run in runs.values():
        key = (run["image"], run["imgsz"])
        if key in seen:
            continue
        seen.add(key)
        img = read_image(shared / run["image"])
        assert list(img.shape[:2]) == run["orig_hw"]
        chw, _, _ = preprocess_demo(img, run["imgsz_arg"])
        assert list(chw.shape) == run["input_chw"], key
        assert md5(chw) == run["input_uint8_chw_rgb_md5"], key
    assert len(seen) == 10


def test_load_image_for_val_sizes_and_interpolation():
    img = (np.arange(300 * 400 * 3) % 251).astype(np.uint8).reshape(300, 400, 3)
    up, hw0, hw = load_image_for_val(img, 640)
    assert hw0 == (300, 400) and hw == (480, 640) and up.shape == (480, 640, 3)
    down, _, hw = load_image_for_val(img, 333)  # r = 0.8325: int(249.75) = 249, int(333.0) = 333
    assert hw == (249, 333)
    import cv2

    assert np.array_equal(down, cv2.resize(img, (333, 249), interpolation=cv2.INTER_AREA))
    same, _, hw = load_image_for_val(img, 400)
    assert same is img and hw == (300, 400)


def test_rect_batch_shapes_known_answer():
    order, shapes = rect_batch_shapes([(480, 640), (640, 480), (300, 400), (640, 640)], 640, 2, 64, 0.0)
    assert order.tolist() == [0, 2, 3, 1]  # ratios 0.75, 0.75, 1.0, 1.333 (stable on ties)
    assert shapes.tolist() == [[512, 640], [640, 640]]
    order, shapes = rect_batch_shapes(np.zeros((0, 2)), 640, 2)
    assert order.size == 0 and shapes.shape == (0, 2)


def test_check_img_size():
    assert check_img_size(640) == 640 and check_img_size(1000) == 1024 and check_img_size(1, 32) == 32
    with pytest.raises(KapaoError):
        check_img_size(0)


def test_to_chw_rgb():
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0] = 1  # blue
    chw = to_chw_rgb(img)
    assert chw.shape == (3, 2, 3) and chw.flags.c_contiguous
    assert (chw[2] == 1).all() and (chw[0] == 0).all()


def test_to_input_batch_bit_equal_to_official_division():
    # every uint8 value, one image and a batch: the official torch `.float() / 255.0`, bit for bit
    rng = np.random.default_rng(0)
    chws = [rng.integers(0, 256, (3, 16, 24), dtype=np.uint8) for _ in range(3)]
    chws[0].reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    for group in (chws[:1], chws):
        x = to_input_batch(group)
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (len(group), 3, 16, 24)
        assert np.array_equal(x.view(np.int32), np.divide(np.stack(group), np.float32(255)).view(np.int32))
        torch = pytest.importorskip("torch")
        ref = torch.from_numpy(np.stack(group)).float() / 255.0
        assert np.array_equal(x.view(np.int32), ref.numpy().view(np.int32))
    with pytest.raises(KapaoError, match="no images"):
        to_input_batch([])


def test_prepare_input_policies(image_a):
    """Dynamic shape: the demo letterbox; fixed (h, w): exactly that shape, scaled up or down."""
    for imgsz in (320, 640, 1000):
        got, want = prepare_input(image_a, imgsz, 64), preprocess_demo(image_a, imgsz, 64)
        assert np.array_equal(got[0], want[0]) and got[1:] == want[1:]
    for fixed in ((640, 640), (448, 640), (1024, 1024), (256, 320)):
        chw, ratio, pad = prepare_input(image_a, 9999, 64, fixed_hw=fixed)
        lb, r, p = letterbox(image_a, fixed, auto=False, scaleup=True, stride=64)
        assert chw.shape == (3, *fixed) and chw.dtype == np.uint8 and chw.flags.c_contiguous
        assert np.array_equal(chw, to_chw_rgb(lb)) and (ratio, pad) == (r, p)
    with pytest.raises(KapaoError, match="prepare_input"):
        prepare_input(np.zeros((0, 4, 3), np.uint8), 640, 64, fixed_hw=(64, 64))


def test_scale_boxes_inverse_of_letterbox():
    # 426x640 letterboxed to 1280 with auto: gain 2, pad (0, 22)
    orig_hw, input_hw = (426, 640), (896, 1280)
    boxes = np.array([[100.0, 22.0, 300.0, 874.0], [-10.0, 0.0, 1300.0, 900.0]], np.float32)
    out = scale_boxes(boxes, input_hw, orig_hw)
    assert out.dtype == np.float32 and out.tolist() == [[50.0, 0.0, 150.0, 426.0], [0.0, 0.0, 640.0, 426.0]]
    assert boxes[1, 0] == -10.0  # input untouched
    unclipped = scale_boxes(boxes.tolist(), input_hw, orig_hw, clip=False)  # any array-like
    assert isinstance(unclipped, np.ndarray) and unclipped[1].tolist() == [-5.0, -11.0, 650.0, 439.0]


def test_scale_keypoints_clipping_quirk():
    orig_hw, input_hw = (426, 640), (448, 640)
    kps = np.array([[-5.0, 0.0, 700.0, 500.0, -5.0, 0.0, 700.0, 500.0]], np.float32)  # 4 keypoints
    official = scale_keypoints(kps, input_hw, orig_hw)
    # only keypoints 0 and 1 are clipped (x to [0, 640], y to [0, 426])
    assert official.tolist() == [[0.0, 0.0, 640.0, 426.0, -5.0, -11.0, 700.0, 489.0]]
    everything = scale_keypoints(kps.reshape(1, 4, 2), input_hw, orig_hw, clip_all=True)
    assert everything.shape == (1, 4, 2)
    assert everything.reshape(1, -1).tolist() == [[0.0, 0.0, 640.0, 426.0, 0.0, 0.0, 640.0, 426.0]]


def test_scale_matches_official_rescaling_at_non_unit_gain(shared):
    """predict.npz (official): unfused pose keypoints are the rescaled NMS keypoints, and bboxes the
    rounded rescaled boxes, at gains 1.6 / 1.0 / 1.28 / ... (exact float32 arithmetic)."""
    z = np.load(shared / "golden" / "e2e" / "predict.npz")
    runs = json.loads((shared / "golden" / "e2e" / "predict.json").read_text())["runs"]
    checked = 0
    for key, run in runs.items():
        pd = z[f"{key}__person_dets"]
        input_hw, orig_hw = tuple(run["input_chw"][1:]), tuple(run["orig_hw"])
        kps = scale_keypoints(pd[:, 6:], input_hw, orig_hw).reshape(-1, 17, 2)
        poses = z[f"{key}__poses"]
        unfused = poses[..., 2] == 0
        assert np.array_equal(kps[unfused], poses[..., :2][unfused].astype(np.float32)), key
        boxes = scale_boxes(pd[:, :4], input_hw, orig_hw).round()
        assert np.array_equal(boxes, z[f"{key}__bboxes"]), key
        checked += int(unfused.sum())
    assert checked > 10000


def test_bad_inputs():
    with pytest.raises(KapaoError, match="letterbox"):
        letterbox(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(KapaoError, match="not found"):
        read_image("/nonexistent/x.jpg")
    with pytest.raises(KapaoError, match="scale_boxes"):
        scale_boxes(np.zeros((3, 5)), (64, 64), (64, 64))
    with pytest.raises(KapaoError, match="scale_keypoints"):
        scale_keypoints(np.zeros((3, 5)), (64, 64), (64, 64))


def test_unreadable_image_file(tmp_path):
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"not a jpeg")
    with pytest.raises(KapaoError, match="broken.jpg"):
        load_image_for_val(p, 640)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(KapaoError, match="empty.png"):
        preprocess_val(tmp_path / "empty.png", 640)


def _torch_scale(t, input_hw, orig_hw, n_clip):
    """The previous torch implementation (the official `scale_coords` arithmetic), as the reference."""
    h1, w1 = input_hw
    h0, w0 = orig_hw
    gain = min(h1 / h0, w1 / w0)
    out = t.clone()
    out[:, 0::2] -= (w1 - w0 * gain) / 2
    out[:, 1::2] -= (h1 - h0 * gain) / 2
    out /= gain
    out[:, 0:n_clip:2] = out[:, 0:n_clip:2].clamp(0, w0)
    out[:, 1:n_clip:2] = out[:, 1:n_clip:2].clamp(0, h0)
    return out.numpy()


def test_scale_equals_torch_arithmetic_bit_for_bit():
    """NumPy rescaling = the torch float32 ops it replaces (scalars rounded to float32), at random
    shapes, gains and coordinates, clipped and not."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for _ in range(300):
        orig_hw = tuple(int(v) for v in rng.integers(17, 3000, 2))
        input_hw = tuple(int(v) for v in rng.integers(64, 2000, 2))
        xy = (rng.normal(size=(20, 34)) * rng.choice([10, 500, 3000])).astype(np.float32)
        for clip in (True, False):
            ref = _torch_scale(torch.from_numpy(xy[:, :4]), input_hw, orig_hw, 4 if clip else 0)
            got = scale_boxes(xy[:, :4], input_hw, orig_hw, clip=clip)
            assert np.array_equal(got.view(np.int32), ref.view(np.int32))
            ref = _torch_scale(torch.from_numpy(xy), input_hw, orig_hw, 34 if clip else 4)
            got = scale_keypoints(xy.reshape(20, 17, 2), input_hw, orig_hw, clip_all=clip)
            assert got.shape == (20, 17, 2) and np.array_equal(got.reshape(20, 34).view(np.int32), ref.view(np.int32))
