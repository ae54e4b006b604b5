"""Training augmentation with YOLOv5 semantics, extended to KAPAO keypoints.

Every function works on an image (H, W, 3) BGR uint8 and *pixel labels*, a float array
(n, 5 + 3K), one row per object:

    [cls, x1, y1, x2, y2, x_1, y_1, v_1, ..., x_K, y_K, v_K]

Pose objects (cls 0) carry the K keypoints of a person; keypoint objects (cls 1 + k) are small
boxes around keypoint k and carry K zero triplets. Invisible keypoints (v = 0) are always
(0, 0, 0) here: every geometric transform moves the visible ones and zeroes a keypoint that
leaves the image. All randomness comes from a passed `np.random.Generator` (no global RNG), so a
seed fixes the result.

Behaviour of the official KAPAO code that is copied, and where we deliberately differ:

* `random_perspective` transforms every box the same way (4 corners -> enclosing box -> clip ->
  `box_candidates`), keypoint-object boxes included. Afterwards, as the official code does,
  each keypoint-object box is re-centred on the centre of its transformed, clipped box and given
  back the side `kp_bbox x output width` (x `output height`), then clipped again. So a
  keypoint object keeps its size under scaling/shear instead of being skewed, and its centre is
  the transformed keypoint (exactly for affine transforms, unless the box was clipped).
* Keypoints of pose objects leaving the output image become v = 0. The official code keeps
  their transformed (x, y); we set them to (0, 0). The loss never reads invisible coordinates.
* Mosaic: the official code clips every coordinate, keypoints included, to the 2s x 2s canvas,
  so a keypoint cut away with its tile stays "visible" on the canvas edge. We make it invisible.
* A keypoint object whose keypoint (the centre of its unclipped box) leaves the canvas or the
  output image is dropped, the same rule as for pose keypoints. The official code keeps its
  clipped box when it passes `box_candidates`, labelling a keypoint at the border that is not
  in the image.
* Up-down flip: the official code mirrors only the box y; we mirror the keypoints' y too (no
  left/right swap). The shipped hyps use flipud = 0, so training results are unaffected.
* Left-right flip: x -> W - x for boxes and visible keypoints, keypoint triplets reordered by
  the schema's flip_index, and keypoint-object classes 1 + k -> 1 + flip_index[k] (official).
* Copy-paste needs segments, which keypoint labels do not have; it is not implemented (the
  official call is a no-op for KAPAO labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

from kapao.data.letterbox import letterbox

BORDER_VALUE = 114  # grey used for padding, mosaic canvas and warp borders (official)


# ----------------------------------------------------------------------------------------------
# Label format helpers


def _check_labels(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels, dtype=np.float64)
    if lab.ndim != 2 or lab.shape[1] < 5 or (lab.shape[1] - 5) % 3:
        raise ValueError(f"labels must be (n, 5 + 3K), got shape {lab.shape}")
    return lab


def num_keypoints(labels: np.ndarray) -> int:
    """K of a label array (n, 5 + 3K)."""
    return (np.asarray(labels).shape[1] - 5) // 3


def zero_invisible(labels: np.ndarray) -> np.ndarray:
    """Set (x, y) of every keypoint with v <= 0 to 0, in place; returns `labels`."""
    kp = labels[:, 5:].reshape(len(labels), -1, 3)
    kp[kp[..., 2] <= 0] = 0.0
    labels[:, 5:] = kp.reshape(len(labels), -1)
    return labels


def normalized_to_pixels(labels_n: np.ndarray, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
    """Normalised labels (cls, xc, yc, bw, bh, K x (x, y, v)), as `kapao.data.targets` makes
    them, -> pixel labels (cls, x1, y1, x2, y2, K x (x, y, v)) of an image of content size (w, h)
    placed at offset (padw, padh). Invisible keypoints become (0, 0, 0)."""
    x = _check_labels(labels_n)
    y = x.copy()
    y[:, 1] = w * (x[:, 1] - x[:, 3] / 2) + padw
    y[:, 2] = h * (x[:, 2] - x[:, 4] / 2) + padh
    y[:, 3] = w * (x[:, 1] + x[:, 3] / 2) + padw
    y[:, 4] = h * (x[:, 2] + x[:, 4] / 2) + padh
    y[:, 5::3] = w * x[:, 5::3] + padw
    y[:, 6::3] = h * x[:, 6::3] + padh
    return zero_invisible(y)


def pixels_to_normalized(labels: np.ndarray, w: int, h: int, clip_eps: float = 1e-3) -> np.ndarray:
    """Pixel labels -> normalised labels of a (h, w) image, as the official dataloader does after
    augmentation: boxes clipped to [0, w - eps] x [0, h - eps] (`xyxy2xywhn(clip=True, eps=1e-3)`),
    then (xc, yc, bw, bh) / (w, h); keypoint x / w, y / h (not clipped)."""
    x = _check_labels(labels)
    y = x.copy()
    x1 = x[:, 1].clip(0, w - clip_eps)
    x2 = x[:, 3].clip(0, w - clip_eps)
    y1 = x[:, 2].clip(0, h - clip_eps)
    y2 = x[:, 4].clip(0, h - clip_eps)
    y[:, 1] = (x1 + x2) / 2 / w
    y[:, 2] = (y1 + y2) / 2 / h
    y[:, 3] = (x2 - x1) / w
    y[:, 4] = (y2 - y1) / h
    y[:, 5::3] = x[:, 5::3] / w
    y[:, 6::3] = x[:, 6::3] / h
    return y


def scale_shift(labels: np.ndarray, r: float, padw: float, padh: float) -> np.ndarray:
    """Pixel labels of an image resized by `r` and placed at (padw, padh): a new array."""
    y = _check_labels(labels).copy()
    y[:, [1, 3]] = y[:, [1, 3]] * r + padw
    y[:, [2, 4]] = y[:, [2, 4]] * r + padh
    y[:, 5::3] = y[:, 5::3] * r + padw
    y[:, 6::3] = y[:, 6::3] * r + padh
    return zero_invisible(y)


# ----------------------------------------------------------------------------------------------
# Photometric


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float, sgain: float, vgain: float) -> np.ndarray:
    """HSV jitter (YOLOv5): gains drawn uniformly in 1 +/- gain, applied through lookup tables
    (hue modulo 180, saturation and value clipped to 255). (H, W, 3) BGR uint8 -> a new image."""
    if not (hgain or sgain or vgain):
        return img
    r = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=np.float64)
    lut_hue = ((x * r[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


# ----------------------------------------------------------------------------------------------
# Flips


def fliplr(img: np.ndarray, labels: np.ndarray, flip_index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right. Boxes and visible keypoints x -> W - x; keypoint triplets reordered so
    slot k holds the old keypoint flip_index[k]; keypoint-object class 1 + k -> 1 + flip_index[k]."""
    lab = _check_labels(labels).copy()
    w = img.shape[1]
    k = num_keypoints(lab)
    fi = np.asarray(flip_index, dtype=np.int64)
    if k and len(fi) != k:
        raise ValueError(f"flip_index has {len(fi)} entries, labels have {k} keypoints")
    out = np.ascontiguousarray(img[:, ::-1])
    if len(lab):
        x1 = lab[:, 1].copy()
        lab[:, 1] = w - lab[:, 3]
        lab[:, 3] = w - x1
        if k:
            kp = lab[:, 5:].reshape(len(lab), k, 3)
            vis = kp[..., 2] > 0
            kp[..., 0] = np.where(vis, w - kp[..., 0], 0.0)
            lab[:, 5:] = kp[:, fi].reshape(len(lab), -1)
            cls = lab[:, 0].astype(np.int64)
            is_kp = (cls >= 1) & (cls <= k)
            lab[is_kp, 0] = 1 + fi[cls[is_kp] - 1]
    return out, lab


def flipud(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror up-down: boxes and visible keypoints y -> H - y (no keypoint swap)."""
    lab = _check_labels(labels).copy()
    h = img.shape[0]
    out = np.ascontiguousarray(img[::-1])
    if len(lab):
        y1 = lab[:, 2].copy()
        lab[:, 2] = h - lab[:, 4]
        lab[:, 4] = h - y1
        kp = lab[:, 5:].reshape(len(lab), -1, 3)
        kp[..., 1] = np.where(kp[..., 2] > 0, h - kp[..., 1], 0.0)
        lab[:, 5:] = kp.reshape(len(lab), -1)
    return out, lab


# ----------------------------------------------------------------------------------------------
# Geometric


def box_candidates(
    box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 20, area_thr: float = 0.1, eps: float = 1e-16
) -> np.ndarray:
    """Which boxes survive a transform (YOLOv5): box1 (4, n) before (already x scale), box2 (4, n)
    after, xyxy. Kept: width and height > wh_thr px, area ratio > area_thr, aspect ratio < ar_thr."""
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


@dataclass(frozen=True)
class Warp:
    """One drawn geometric transform: M (3, 3) maps input pixels to output pixels."""

    matrix: np.ndarray
    scale: float  # the isotropic scale factor drawn (used by box_candidates)
    size: tuple[int, int]  # output (height, width)
    perspective: bool  # warpPerspective (with the division) rather than warpAffine


def sample_warp(
    rng: np.random.Generator,
    in_hw: tuple[int, int],
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> Warp:
    """Draw the YOLOv5 random perspective: M = T @ S @ R @ P @ C.

    C moves the input centre to the origin; P perspective terms in +/- perspective; R rotation in
    +/- degrees with scale in 1 +/- scale; S shear in +/- shear degrees (x and y); T translates
    to (0.5 +/- translate) x the output size. Output size = input size + 2 x border (border < 0
    crops, as the mosaic's -s/2 turns the 2s canvas into an s image).
    """
    h_in, w_in = int(in_hw[0]), int(in_hw[1])
    height, width = h_in + border[0] * 2, w_in + border[1] * 2
    c = np.eye(3)
    c[0, 2], c[1, 2] = -w_in / 2, -h_in / 2
    p = np.eye(3)
    p[2, 0] = rng.uniform(-perspective, perspective)
    p[2, 1] = rng.uniform(-perspective, perspective)
    a = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(1 - scale, 1 + scale)
    r = np.eye(3)  # cv2.getRotationMatrix2D(center=(0, 0), angle, scale): counter-clockwise on screen
    r[0, 0], r[0, 1] = s * math.cos(a), s * math.sin(a)
    r[1, 0], r[1, 1] = -s * math.sin(a), s * math.cos(a)
    sh = np.eye(3)
    sh[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    sh[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    t = np.eye(3)
    t[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    t[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height
    m = t @ sh @ r @ p @ c
    return Warp(matrix=m, scale=float(s), size=(int(height), int(width)), perspective=bool(perspective))


def _centre_inside(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(n,) whether the centre of each (unclipped) xyxy box lies in [0, width] x [0, height]."""
    xc, yc = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (xc >= 0) & (yc >= 0) & (xc <= width) & (yc <= height)


def _apply_points(m: np.ndarray, xy: np.ndarray, perspective: bool) -> np.ndarray:
    """(n, 2) points -> (n, 2) transformed by the 3x3 matrix m."""
    h = np.concatenate([xy, np.ones((len(xy), 1))], 1) @ m.T
    return h[:, :2] / h[:, 2:3] if perspective else h[:, :2]


def apply_warp(
    img: np.ndarray, labels: np.ndarray, warp: Warp, kp_bbox: float | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Warp the image and labels with a drawn `Warp` (module docstring for the label rules).

    Boxes: 4 corners transformed, enclosing box, clipped to the output, filtered by
    `box_candidates` (area_thr 0.1 against the input box x scale); keypoint objects whose
    keypoint left the output are dropped. Pose keypoints: transformed;
    outside [0, W] x [0, H] -> (0, 0, 0). Keypoint objects, with `kp_bbox` (a fraction, or one
    per keypoint): re-centred boxes of side kp_bbox x (W, H), clipped.
    """
    lab = _check_labels(labels)
    height, width = warp.size
    m = warp.matrix
    changed = (height, width) != img.shape[:2] or not np.array_equal(m, np.eye(3))
    if changed:
        if warp.perspective:
            img = cv2.warpPerspective(img, m, dsize=(width, height), borderValue=(BORDER_VALUE,) * 3)
        else:
            img = cv2.warpAffine(img, m[:2], dsize=(width, height), borderValue=(BORDER_VALUE,) * 3)
    n = len(lab)
    if not n:
        return img, lab.copy()

    corners = lab[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    xy = _apply_points(m, corners, warp.perspective).reshape(n, 8)
    xs, ys = xy[:, 0::2], xy[:, 1::2]
    new = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1)
    kp_obj = lab[:, 0] > 0
    kp_in = _centre_inside(new, width, height)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)
    keep = box_candidates(lab[:, 1:5].T * warp.scale, new.T, area_thr=0.10) & (~kp_obj | kp_in)
    out = lab[keep].copy()
    out[:, 1:5] = new[keep]
    n = len(out)
    k = num_keypoints(out)
    if n and k:
        person = out[:, 0] == 0
        if person.any():
            kp = out[person, 5:].reshape(-1, 3)
            pts = _apply_points(m, kp[:, :2], warp.perspective)
            inside = (pts[:, 0] >= 0) & (pts[:, 1] >= 0) & (pts[:, 0] <= width) & (pts[:, 1] <= height)
            vis = (kp[:, 2] > 0) & inside
            kp[:, :2] = np.where(vis[:, None], pts, 0.0)
            kp[:, 2] = np.where(vis, kp[:, 2], 0.0)
            out[person, 5:] = kp.reshape(int(person.sum()), -1)
    if n and kp_bbox is not None:
        cls = out[:, 0].astype(np.int64)
        is_kp = cls > 0
        if is_kp.any():
            sides = np.asarray(kp_bbox, dtype=np.float64)
            frac = sides[cls[is_kp] - 1] if sides.ndim else np.full(int(is_kp.sum()), float(sides))
            xc = out[is_kp][:, [1, 3]].mean(1)
            yc = out[is_kp][:, [2, 4]].mean(1)
            out[is_kp, 1] = xc - frac * width / 2
            out[is_kp, 2] = yc - frac * height / 2
            out[is_kp, 3] = xc + frac * width / 2
            out[is_kp, 4] = yc + frac * height / 2
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, width)
        out[:, [2, 4]] = out[:, [2, 4]].clip(0, height)
    return img, out


def random_perspective(
    img: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
    kp_bbox: float | Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`sample_warp` then `apply_warp`: the YOLOv5 random affine/perspective with KAPAO labels."""
    warp = sample_warp(rng, img.shape[:2], degrees, translate, scale, shear, perspective, border)
    return apply_warp(img, labels, warp, kp_bbox)


# ----------------------------------------------------------------------------------------------
# Mosaic and mixup


def mosaic4(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
    center: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Four images on a (2 size, 2 size) grey canvas around a random centre (YOLOv5 load_mosaic).

    images: 4 (h_i, w_i, 3) images (longest side ~ size), with pixel `labels` each. The centre
    (xc, yc) is drawn in [size/2, 3 size/2) unless given. Image 0 ends at the centre (top-left),
    1 starts right of it (top-right), 2 below-left, 3 below-right; parts beyond the canvas are cut.
    Returns (canvas, labels): boxes clipped to the canvas, keypoints beyond it made invisible.
    """
    if len(images) != 4 or len(labels) != 4:
        raise ValueError("mosaic4 needs exactly 4 images and 4 label arrays")
    s = int(size)
    lo, hi = s // 2, 2 * s - s // 2
    if center is None:
        yc, xc = int(rng.uniform(lo, hi)), int(rng.uniform(lo, hi))
    else:
        xc, yc = int(center[0]), int(center[1])
    canvas = np.full((2 * s, 2 * s, images[0].shape[2]), BORDER_VALUE, dtype=np.uint8)
    parts = []
    for i, (im, lab) in enumerate(zip(images, labels)):
        h, w = im.shape[:2]
        if i == 0:
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = im[y1b:y2b, x1b:x2b]
        parts.append(scale_shift(lab, 1.0, x1a - x1b, y1a - y1b))
    out = np.concatenate(parts, 0)
    out = out[(out[:, 0] == 0) | _centre_inside(out[:, 1:5], 2 * s, 2 * s)]
    out[:, 1:5] = out[:, 1:5].clip(0, 2 * s)
    if num_keypoints(out):
        kp = out[:, 5:].reshape(len(out), -1, 3)
        outside = (kp[..., 0] < 0) | (kp[..., 1] < 0) | (kp[..., 0] > 2 * s) | (kp[..., 1] > 2 * s)
        kp[outside] = 0.0
        out[:, 5:] = kp.reshape(len(out), -1)
    return canvas, out


def mixup(
    img: np.ndarray, labels: np.ndarray, img2: np.ndarray, labels2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp (YOLOv5): blend two same-size images with r ~ Beta(32, 32); labels are concatenated."""
    r = rng.beta(32.0, 32.0)
    out = (img * r + img2 * (1 - r)).astype(np.uint8)
    return out, np.concatenate([_check_labels(labels), _check_labels(labels2)], 0)


# ----------------------------------------------------------------------------------------------
# The training pipeline


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation hyperparameters (the same names and meaning as in the hyp YAML)."""

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.9
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.0
    kp_bbox: float = 0.05

    @classmethod
    def from_hyp(cls, hyp: Any) -> "AugmentConfig":
        """From a `kapao.hyp.Hyp` (or any object / mapping with these names)."""
        get = hyp.get if isinstance(hyp, dict) else lambda k, d: getattr(hyp, k, d)
        return cls(**{f.name: float(get(f.name, f.default)) for f in fields(cls)})


# load(i) -> (image resized so its longest side is imgsz, its pixel labels)
Loader = Callable[[int], tuple[np.ndarray, np.ndarray]]


def augment_train(
    load: Loader,
    index: int,
    num_images: int,
    imgsz: int,
    flip_index: Sequence[int],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training sample, as the official training dataloader makes it.

    With probability `mosaic`: 4-image mosaic (image `index` + 3 drawn with replacement), random
    perspective cropping the 2 imgsz canvas to imgsz, optional mixup with a second mosaic.
    Otherwise: letterbox to the imgsz square (scale-up allowed), random perspective. Then HSV
    jitter, up-down flip, left-right flip. Returns ((imgsz, imgsz, 3) BGR uint8, pixel labels).
    """
    geo = dict(degrees=cfg.degrees, translate=cfg.translate, scale=cfg.scale, shear=cfg.shear,
               perspective=cfg.perspective, kp_bbox=cfg.kp_bbox)

    def one_mosaic(first: int) -> tuple[np.ndarray, np.ndarray]:
        idx = [first, *rng.integers(0, num_images, size=3).tolist()]
        tiles = [load(i) for i in idx]
        canvas, lab = mosaic4([t[0] for t in tiles], [t[1] for t in tiles], imgsz, rng)
        border = (-(imgsz // 2), -(imgsz // 2))
        return random_perspective(canvas, lab, rng, border=border, **geo)

    if rng.random() < cfg.mosaic:
        img, lab = one_mosaic(index)
        if rng.random() < cfg.mixup:
            img2, lab2 = one_mosaic(int(rng.integers(0, num_images)))
            img, lab = mixup(img, lab, img2, lab2, rng)
    else:
        im, lab = load(index)
        img, (r, _), (dw, dh) = letterbox(im, imgsz, auto=False, scaleup=True)
        lab = scale_shift(lab, r, dw, dh)
        img, lab = random_perspective(img, lab, rng, **geo)

    img = augment_hsv(img, rng, cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)
    if rng.random() < cfg.flipud:
        img, lab = flipud(img, lab)
    if rng.random() < cfg.fliplr:
        img, lab = fliplr(img, lab, flip_index)
    return img, lab
