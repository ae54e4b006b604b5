"""Property tests of the training augmentation: a keypoint drawn on the image stays on its mark.

Every visible keypoint of a synthetic scene is drawn as a small disc of a unique colour (one
colour per image, person and keypoint). After each transform the test reads the pixel under
every visible keypoint and checks that it is the mark of that same keypoint (after a left-right
flip: of the mirrored keypoint), and checks the geometry against an independent computation
where the transform is known (warp matrix, mosaic centre).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from kapao.data.augment import (
    AugmentConfig,
    apply_warp,
    augment_hsv,
    augment_train,
    box_candidates,
    fliplr,
    flipud,
    mixup,
    mosaic4,
    normalized_to_pixels,
    pixels_to_normalized,
    random_perspective,
    sample_warp,
)
from kapao.schema import coco_schema

# 5-keypoint schema: nose, left/right eye, left/right hand
FLIP5 = (0, 2, 1, 4, 3)
RADIUS = 7
KP_BBOX = 0.05
TOL = 30  # max per-channel difference for a pixel to count as a mark colour

_LEVELS = (0, 85, 170, 255)
PALETTE = np.array([c for c in itertools.product(_LEVELS, repeat=3) if len(set(c)) > 1], dtype=np.int16)


def make_scene(rng: np.random.Generator, h: int, w: int, persons: int, k: int, first_colour: int):
    """A textured grey image with `persons` people of `k` keypoints drawn as coloured discs.

    Returns (img, pixel labels, info) where info[colour id] = (person, keypoint). Colour ids are
    first_colour + person * k + keypoint; boxes enclose the keypoints with a margin.
    """
    img = rng.integers(100, 131, size=(h, w, 1), dtype=np.uint8).repeat(3, axis=2)
    yy, xx = np.mgrid[0:h, 0:w]
    placed: list[tuple[float, float]] = []
    rows, info = [], {}
    side = KP_BBOX * max(h, w)
    for p in range(persons):
        kps = np.zeros((k, 3))
        for j in range(k):
            for _ in range(1000):
                x, y = rng.uniform(RADIUS + 2, w - RADIUS - 2), rng.uniform(RADIUS + 2, h - RADIUS - 2)
                if all((x - a) ** 2 + (y - b) ** 2 > (2 * RADIUS + 4) ** 2 for a, b in placed):
                    break
            else:
                raise RuntimeError("scene too crowded")
            v = 0.0 if rng.random() < 0.15 and j else float(rng.integers(1, 3))
            if v:
                placed.append((x, y))
                cid = first_colour + p * k + j
                info[cid] = (p, j)
                disc = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= RADIUS**2
                img[disc] = PALETTE[cid].astype(np.uint8)
                kps[j] = (x, y, v)
        vis = kps[:, 2] > 0
        x1, y1 = kps[vis, :2].min(0) - RADIUS - 3
        x2, y2 = kps[vis, :2].max(0) + RADIUS + 3
        row = np.zeros(5 + 3 * k)
        row[1:5] = (max(x1, 0), max(y1, 0), min(x2, w), min(y2, h))
        row[5:] = kps.reshape(-1)
        rows.append(row)
        for j in np.flatnonzero(vis):
            kr = np.zeros(5 + 3 * k)
            kr[0] = 1 + j
            kr[1:5] = (kps[j, 0] - side / 2, kps[j, 1] - side / 2, kps[j, 0] + side / 2, kps[j, 1] + side / 2)
            rows.append(kr)
    return img, np.array(rows), info


def colour_map(img: np.ndarray) -> np.ndarray:
    """(H, W) colour id of every pixel, -1 where it is no mark colour."""
    d = np.abs(img[:, :, None, :].astype(np.int16) - PALETTE[None, None]).max(-1)
    best = d.argmin(-1)
    return np.where(d.min(-1) <= TOL, best, -1)


def check_marks(img, labels, info, flip_index, flipped):
    """Pixel-content checks; `flipped` None = infer per image. Returns (visible checked, identities)."""
    cmap = colour_map(img)
    h, w = img.shape[:2]
    k = (labels.shape[1] - 5) // 3
    fi = np.asarray(flip_index)
    checked, ident = 0, {}
    for r, row in enumerate(labels):
        if row[0] != 0:
            continue
        kp = row[5:].reshape(k, 3)
        owner = None
        for j in np.flatnonzero(kp[:, 2] > 0):
            x, y = kp[j, :2]
            assert 0 <= x <= w and 0 <= y <= h
            assert row[1] - 1e-6 <= x <= row[3] + 1e-6 and row[2] - 1e-6 <= y <= row[4] + 1e-6, "box must contain kp"
            cid = int(cmap[min(int(y), h - 1), min(int(x), w - 1)])
            assert cid in info, f"keypoint {j} at ({x:.1f}, {y:.1f}) is not on any mark"
            p, kk = info[cid]
            if flipped is None and kk != j:
                flipped = True
            elif flipped is None and fi[j] != j:
                flipped = False
            expect = fi[j] if flipped else j
            assert kk == expect, f"slot {j} sits on the mark of keypoint {kk}, expected {expect}"
            assert owner in (None, (cid - p * k - kk, p)), "one pose row mixes two persons"
            owner = (cid - p * k - kk, p)
            checked += 1
        ident[r] = owner
        # invisible keypoints are zeroed
        assert np.all(kp[kp[:, 2] == 0, :2] == 0)
    for row in labels:
        if row[0] == 0:
            continue
        j = int(row[0]) - 1
        x1, y1, x2, y2 = (int(np.floor(row[1])), int(np.floor(row[2])), int(np.ceil(row[3])), int(np.ceil(row[4])))
        ids = np.unique(cmap[y1:y2, x1:x2])
        kinds = {info[c][1] for c in ids.tolist() if c in info}
        expect = fi[j] if flipped else j
        if flipped is None:
            assert kinds & {j, fi[j]}, f"keypoint object {j} box holds no mark of its type"
        else:
            assert expect in kinds, f"keypoint object {j} box holds no mark of keypoint {expect}"
    return checked, ident


def scene(seed=0, h=256, w=320, persons=2, k=5, first=0):
    return make_scene(np.random.default_rng(seed), h, w, persons, k, first)


def test_scene_marks_are_consistent():
    img, lab, info = scene()
    n, _ = check_marks(img, lab, info, FLIP5, flipped=False)
    assert n == sum(1 for _ in info)


# ------------------------------------------------------------------------------------------ flips


def test_fliplr_swaps_left_right_coco17():
    fi = coco_schema().flip_index
    img, lab, info = scene(seed=3, h=300, w=360, persons=2, k=17)
    out, lab2 = fliplr(img, lab, fi)
    assert np.array_equal(out, img[:, ::-1])
    n, _ = check_marks(out, lab2, info, fi, flipped=True)
    assert n == len(info)
    # classes: keypoint object of class 1 + k becomes 1 + flip_index[k]; boxes mirrored
    kp_rows, kp_rows2 = lab[lab[:, 0] > 0], lab2[lab2[:, 0] > 0]
    np.testing.assert_array_equal(kp_rows2[:, 0], 1 + np.asarray(fi)[kp_rows[:, 0].astype(int) - 1])
    np.testing.assert_allclose(kp_rows2[:, 1], 360 - kp_rows[:, 3])
    np.testing.assert_allclose(kp_rows2[:, 3], 360 - kp_rows[:, 1])
    # keypoint slot j of a pose holds the mirrored old keypoint fi[j]; invisible stay (0, 0, 0)
    p, p2 = lab[0, 5:].reshape(17, 3), lab2[0, 5:].reshape(17, 3)
    for j in range(17):
        src = p[fi[j]]
        if src[2] > 0:
            np.testing.assert_allclose(p2[j], (360 - src[0], src[1], src[2]))
        else:
            assert np.all(p2[j] == 0)
    # flipping twice is the identity
    back, lab3 = fliplr(out, lab2, fi)
    assert np.array_equal(back, img)
    np.testing.assert_allclose(lab3, lab)


def test_flipud_moves_points_without_swap():
    img, lab, info = scene(seed=4)
    out, lab2 = flipud(img, lab)
    assert np.array_equal(out, img[::-1])
    n, _ = check_marks(out, lab2, info, FLIP5, flipped=False)
    assert n == len(info)
    np.testing.assert_array_equal(lab2[:, 0], lab[:, 0])


# ------------------------------------------------------------------------------------ affine / perspective

WARPS = {
    "degrees": dict(degrees=30),
    "translate": dict(translate=0.2),
    "scale": dict(scale=0.5),
    "shear": dict(shear=10),
    "perspective": dict(perspective=0.0008),
    "all": dict(degrees=15, translate=0.15, scale=0.4, shear=6, perspective=0.0005),
}


def _expected_point(m, xy, perspective):
    v = m @ np.array([xy[0], xy[1], 1.0])
    return v[:2] / v[2] if perspective else v[:2]


@pytest.mark.parametrize("name", list(WARPS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warp_keeps_keypoints_on_their_marks(name, seed):
    img, lab, info = scene(seed=10 + seed, h=256, w=320, persons=3)
    rng = np.random.default_rng(seed)
    warp = sample_warp(rng, img.shape[:2], **WARPS[name])
    out, lab2 = apply_warp(img, lab, warp, kp_bbox=KP_BBOX)
    assert out.shape == img.shape
    n, ident = check_marks(out, lab2, info, FLIP5, flipped=False)
    assert n >= 3, "the transform left too few keypoints to test"
    h, w = warp.size
    m, persp = warp.matrix, warp.perspective
    # exact geometry: visible iff the transformed point is inside the output, at that point
    persons = lab[lab[:, 0] == 0]
    for r, owner in ident.items():
        if owner is None:
            continue
        src = persons[owner[1], 5:].reshape(5, 3)
        dst = lab2[r, 5:].reshape(5, 3)
        for j in range(5):
            if src[j, 2] == 0:
                assert np.all(dst[j] == 0)
                continue
            e = _expected_point(m, src[j, :2], persp)
            inside = 0 <= e[0] <= w and 0 <= e[1] <= h
            if inside:
                np.testing.assert_allclose(dst[j], (*e, src[j, 2]), atol=1e-6)
            else:
                assert np.all(dst[j] == 0), "a keypoint outside the image must become (0, 0, 0)"
    # keypoint objects: side kp_bbox x output size, centred on the transformed keypoint
    side = KP_BBOX * w
    targets = {j: [_expected_point(m, row[5 + 3 * j: 7 + 3 * j], persp) for row in persons if row[7 + 3 * j] > 0]
               for j in range(5)}
    for row in lab2[lab2[:, 0] > 0]:
        j = int(row[0]) - 1
        c = np.array([(row[1] + row[3]) / 2, (row[2] + row[4]) / 2])
        d = min(np.hypot(*(c - t)) for t in targets[j])
        margin = 2 * side * (1 + WARPS[name].get("scale", 0))
        if margin < c[0] < w - margin and margin < c[1] < h - margin:
            assert d < (0.5 if persp else 1e-6), f"keypoint object {j} is {d:.3f} px off its keypoint"
            np.testing.assert_allclose((row[3] - row[1], row[4] - row[2]), (side, KP_BBOX * h), atol=1e-6)


def test_warp_drops_small_boxes_and_border_crop():
    img, lab, info = scene(seed=5, h=256, w=256)
    rng = np.random.default_rng(0)
    # mosaic-style border: the output is half the input; boxes leaving it are dropped or clipped
    out, lab2 = random_perspective(img, lab, rng, scale=0.0, translate=0.0, border=(-64, -64), kp_bbox=KP_BBOX)
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out, img[64:192, 64:192])
    assert np.all(lab2[:, 1:5] >= 0) and np.all(lab2[:, [1, 3]] <= 128) and np.all(lab2[:, [2, 4]] <= 128)
    check_marks(out, lab2, info, FLIP5, flipped=False)


def test_box_candidates_known_answers():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 100], [0, 0, 10, 10]], float).T
    after = np.array([[0, 0, 10, 10], [0, 0, 2, 10], [0, 0, 3, 3], [0, 0, 30, 30], [0, 0, 60, 2.5]], float).T
    np.testing.assert_array_equal(box_candidates(before, after), [True, False, False, False, False])
    # aspect ratio 20 is rejected, 19 kept
    np.testing.assert_array_equal(
        box_candidates(np.array([[0, 0, 60, 3], [0, 0, 57, 3]], float).T, np.array([[0, 0, 60, 3], [0, 0, 57, 3]], float).T),
        [False, True])


# ------------------------------------------------------------------------------------------ mosaic


def _four_scenes(seed, size=192):
    rng = np.random.default_rng(seed)
    shapes = [(size, int(size * 0.75)), (int(size * 0.6), size), (size, size), (int(size * 0.8), size)]
    imgs, labs, info = [], [], {}
    for i, (h, w) in enumerate(shapes):
        im, lb, inf = make_scene(rng, h, w, 2, 5, i * 10)
        imgs.append(im)
        labs.append(lb)
        info.update({c: v for c, v in inf.items()})
    return imgs, labs, info


def test_mosaic_known_centre_places_tiles_and_hides_cut_keypoints():
    s = 192
    imgs, labs, info = _four_scenes(0, s)
    xc, yc = 150, 230  # tile 2 (192 x 192) is cut 42 px on the left and 38 px at the bottom
    canvas, lab = mosaic4(imgs, labs, s, np.random.default_rng(0), center=(xc, yc))
    assert canvas.shape == (2 * s, 2 * s, 3)
    offsets = [(xc - imgs[0].shape[1], yc - imgs[0].shape[0]), (xc, yc - imgs[1].shape[0]),
               (xc - imgs[2].shape[1], yc), (xc, yc)]
    rows = 0
    for im, lb, (ox, oy) in zip(imgs, labs, offsets):
        # keypoint objects whose keypoint is cut away with the tile are dropped
        xc_, yc_ = (lb[:, 1] + lb[:, 3]) / 2 + ox, (lb[:, 2] + lb[:, 4]) / 2 + oy
        lb = lb[(lb[:, 0] == 0) | ((xc_ >= 0) & (xc_ <= 2 * s) & (yc_ >= 0) & (yc_ <= 2 * s))]
        part = lab[rows: rows + len(lb)]
        rows += len(lb)
        np.testing.assert_array_equal(part[:, 0], lb[:, 0])
        np.testing.assert_allclose(part[:, 1:5], np.clip(lb[:, 1:5] + [ox, oy, ox, oy], 0, 2 * s))
        for src, dst in zip(lb[:, 5:].reshape(-1, 3), part[:, 5:].reshape(-1, 3)):
            x, y = src[0] + ox, src[1] + oy
            if src[2] > 0 and 0 <= x <= 2 * s and 0 <= y <= 2 * s:
                np.testing.assert_allclose(dst, (x, y, src[2]))
            else:
                assert np.all(dst == 0)
    assert rows == len(lab)
    n, _ = check_marks(canvas, lab, info, FLIP5, flipped=False)
    assert n > 20
    # some visible keypoints of tile 2 were cut away with it (and were hidden above)
    vis = labs[2][:, 7::3] > 0
    cut = (labs[2][:, 5::3] < 192 - xc) | (labs[2][:, 6::3] > 2 * s - yc)
    assert (vis & cut).any()


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_then_warp_keeps_marks(seed):
    s = 192
    imgs, labs, info = _four_scenes(seed, s)
    rng = np.random.default_rng(seed)
    canvas, lab = mosaic4(imgs, labs, s, rng)
    check_marks(canvas, lab, info, FLIP5, flipped=False)
    out, lab2 = random_perspective(canvas, lab, rng, degrees=10, translate=0.1, scale=0.4, shear=5,
                                   border=(-s // 2, -s // 2), kp_bbox=KP_BBOX)
    assert out.shape == (s, s, 3)
    n, _ = check_marks(out, lab2, info, FLIP5, flipped=False)
    assert n >= 3


# ------------------------------------------------------------------------------------------ photometric


def test_hsv_changes_colours_not_geometry():
    img, lab, info = scene(seed=6)
    rng = np.random.default_rng(0)
    out = augment_hsv(img, rng, 0.015, 0.7, 0.4)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    assert augment_hsv(img, rng, 0, 0, 0) is img
    # gains of 1 (drawn exactly 1 when the gains are tiny) round-trip through HSV almost exactly
    same = augment_hsv(img, np.random.default_rng(0), 1e-9, 1e-9, 1e-9)
    assert np.abs(same.astype(int) - img).max() <= 3


def test_mixup_blends_and_concatenates():
    a, la, _ = scene(seed=7)
    b, lb, _ = scene(seed=8)
    out, lab = mixup(a, la, b, lb, np.random.default_rng(0))
    assert len(lab) == len(la) + len(lb)
    r = (out.astype(float) - b) / (a.astype(float) - b + 1e-9)
    ok = np.abs(a.astype(int) - b) > 60
    assert 0.35 < np.median(r[ok]) < 0.65


# ------------------------------------------------------------------------------------------ pipeline


def _loader(seed, size=224):
    rng = np.random.default_rng(seed)
    data, info = [], {}
    for i, (h, w) in enumerate([(size, 160), (150, size), (size, size), (180, size)]):
        im, lb, inf = make_scene(rng, h, w, 2, 5, i * 10)
        data.append((im, lb))
        info.update(inf)
    return (lambda i: (data[i][0], data[i][1].copy())), info


@pytest.mark.parametrize("seed", range(6))
def test_full_pipeline_keeps_marks(seed):
    load, info = _loader(seed)
    cfg = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, degrees=10, translate=0.1, scale=0.4, shear=5,
                        perspective=0.0003, flipud=0.5, fliplr=0.5, mosaic=0.6, mixup=0.0, kp_bbox=KP_BBOX)
    img, lab = augment_train(load, seed % 4, 4, 224, FLIP5, cfg, np.random.default_rng(seed))
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    assert np.isfinite(lab).all()
    n, _ = check_marks(img, lab, info, FLIP5, flipped=None)
    assert n >= 3


def test_pipeline_is_deterministic_and_uses_no_global_rng():
    load, _ = _loader(0)
    cfg = AugmentConfig(mixup=0.5)
    outs = []
    for g in (1, 2):
        np.random.seed(g)
        random.seed(g)
        outs.append(augment_train(load, 1, 4, 224, FLIP5, cfg, np.random.default_rng(42)))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    other = augment_train(load, 1, 4, 224, FLIP5, cfg, np.random.default_rng(43))
    assert not np.array_equal(other[0], outs[0][0])


def test_pipeline_without_mosaic_letterboxes():
    load, info = _loader(1)
    cfg = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0, mosaic=0)
    img, lab = augment_train(load, 1, 4, 224, FLIP5, cfg, np.random.default_rng(0))
    src, lsrc = load(1)  # 150 x 224 -> pad (0, 37) top
    np.testing.assert_array_equal(img[37:187], src)
    np.testing.assert_allclose(lab[:, 5::3], np.where(lsrc[:, 7::3] > 0, lsrc[:, 5::3], 0))
    check_marks(img, lab, info, FLIP5, flipped=False)


def test_normalisation_round_trip():
    _, lab, _ = scene(seed=9)
    n = pixels_to_normalized(lab, 320, 256, clip_eps=0)
    back = normalized_to_pixels(n, 320, 256)
    clipped = lab.copy()
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, 320)
    clipped[:, [2, 4]] = clipped[:, [2, 4]].clip(0, 256)
    np.testing.assert_allclose(back, clipped, atol=1e-9)


def test_augment_config_from_hyp():
    from kapao.hyp import load_hyp

    cfg = AugmentConfig.from_hyp(load_hyp("hyp.kp-p6"))
    assert cfg.scale == 0.9 and cfg.mosaic == 1.0 and cfg.fliplr == 0.5 and cfg.kp_bbox == 0.05
