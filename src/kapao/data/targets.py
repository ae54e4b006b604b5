"""Person annotations -> KAPAO training objects: pose objects and keypoint objects.

Per person one *pose object* (class 0, the person box, all K keypoints with visibility) and, for
every keypoint with v > 0, one *keypoint object* (class 1 + k, a square box of side
`kp_bbox x longest image side` centred on the keypoint, K zero keypoint triplets). Rows are
normalised to the image, (n, 5 + 3K):

    [cls, xc/W, yc/H, w/W, h/H, x_1/W, y_1/H, v_1, ..., x_K/W, y_K/H, v_K]

ordered person by person, each pose object followed by its keypoint objects in keypoint order:
the rows of the official label files, held in memory as float arrays instead of text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kapao.data.coco import ImageAnnotations


def image_labels(
    boxes_xywh: np.ndarray, keypoints: np.ndarray, height: int, width: int, kp_bbox: float
) -> np.ndarray:
    """Pose and keypoint objects of one image.

    boxes_xywh (n, 4) COCO boxes in pixels (top-left x, y, w, h); keypoints (n, K, 3) (x, y, v) in
    pixels. Returns (rows, 5 + 3K) float64 normalised labels (module docstring), rows =
    n + number of keypoints with v > 0. Float operations follow the official label writer, so the
    values print identically with '{:.6f}'.
    """
    boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    kps = np.asarray(keypoints, np.float64)
    n = len(boxes)
    k = kps.shape[1] if kps.ndim == 3 else 0
    if kps.shape != (n, k, 3):
        raise ValueError(f"keypoints must be (n, K, 3) with n = {n} boxes, got {kps.shape}")
    ncol = 5 + 3 * k
    x, y, w, h = boxes.T
    kpn = kps.copy()
    kpn[..., 0] /= width
    kpn[..., 1] /= height

    table = np.zeros((n, 1 + k, ncol), np.float64)  # slot 0: pose object, slot 1 + j: keypoint j
    table[:, 0, 1] = (x + w / 2) / width
    table[:, 0, 2] = (y + h / 2) / height
    table[:, 0, 3] = w / width
    table[:, 0, 4] = h / height
    table[:, 0, 5:] = kpn.reshape(n, 3 * k)
    side = kp_bbox * max(height, width)
    table[:, 1:, 0] = np.arange(1, k + 1)
    table[:, 1:, 1] = kpn[..., 0]
    table[:, 1:, 2] = kpn[..., 1]
    table[:, 1:, 3] = side / width
    table[:, 1:, 4] = side / height
    present = np.concatenate([np.ones((n, 1), bool), kps[..., 2] > 0], 1)
    return table[present]


def labels_for(image: ImageAnnotations, kp_bbox: float) -> np.ndarray:
    """`image_labels` of one image of a `KeypointAnnotations`."""
    return image_labels(image.boxes, image.keypoints, image.height, image.width, kp_bbox)


def labels_by_stem(images: Iterable[ImageAnnotations], kp_bbox: float, num_keypoints: int) -> dict[str, np.ndarray]:
    """Labels per image file stem. An image listed again (e.g. in two annotation files of the same
    dataset, as CrowdPose's trainval and test both list into one label folder) gets its rows
    appended, as the official writer appends to the same label file."""
    out: dict[str, list[np.ndarray]] = {}
    for im in images:
        out.setdefault(im.stem, []).append(labels_for(im, kp_bbox))
    width = 5 + 3 * num_keypoints
    return {s: np.concatenate(parts).reshape(-1, width) for s, parts in out.items()}


def format_label_lines(labels: np.ndarray) -> list[str]:
    """The official label-file text: the class as an int, every other value as '{:.6f}'."""
    return [" ".join([str(int(r[0]))] + [f"{v:.6f}" for v in r[1:]]) for r in np.asarray(labels, np.float64)]


def letterbox_labels(
    labels: np.ndarray,
    content_wh: Sequence[float],
    pad: Sequence[float],
    out_hw: Sequence[int],
    clip_eps: float = 1e-3,
) -> np.ndarray:
    """Normalised labels of an original image -> normalised labels of its letterboxed version.

    labels (n, 5 + 3K) as `image_labels` returns; content_wh = (w, h) of the image content in the
    output (original size x resize ratio x letterbox ratio); pad = (padw, padh) left/top padding;
    out_hw = (H, W) of the letterboxed image. As the official dataloader: every keypoint, including
    v = 0 ones and the zero triplets of keypoint objects, is mapped as x * w + padw, so those become
    (padw / W, padh / H, 0); boxes are clipped to [0, W - eps] x [0, H - eps], keypoints are not.
    Feed float32 labels (as the official label text parses) to get the official targets bit for bit.
    """
    x = np.asarray(labels)
    dt = x.dtype.type
    # The official box scale is a NumPy float64 (ratio * size), so box corners are computed in
    # float64 and stored in the label dtype; keypoints use Python floats and stay in that dtype.
    cw, ch = np.float64(content_wh[0]), np.float64(content_wh[1])
    padw, padh = float(pad[0]), float(pad[1])
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    y = x.copy()
    xyxy = np.empty((len(x), 4), x.dtype)
    xyxy[:, 0] = cw * (x[:, 1] - x[:, 3] / 2) + padw
    xyxy[:, 1] = ch * (x[:, 2] - x[:, 4] / 2) + padh
    xyxy[:, 2] = cw * (x[:, 1] + x[:, 3] / 2) + padw
    xyxy[:, 3] = ch * (x[:, 2] + x[:, 4] / 2) + padh
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, out_w - clip_eps)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, out_h - clip_eps)
    y[:, 1] = ((xyxy[:, 0] + xyxy[:, 2]) / 2) / out_w
    y[:, 2] = ((xyxy[:, 1] + xyxy[:, 3]) / 2) / out_h
    y[:, 3] = (xyxy[:, 2] - xyxy[:, 0]) / out_w
    y[:, 4] = (xyxy[:, 3] - xyxy[:, 1]) / out_h
    y[:, 5::3] = (dt(float(content_wh[0])) * x[:, 5::3] + dt(padw)) / dt(out_w)
    y[:, 6::3] = (dt(float(content_wh[1])) * x[:, 6::3] + dt(padh)) / dt(out_h)
    return y


def _two_product(a: np.ndarray, b: float) -> tuple[np.ndarray, np.ndarray]:
    """p, e with p = fl(a * b) and a * b = p + e exactly (Dekker's product, no FMA needed)."""
    split = 134217729.0  # 2^27 + 1
    p = a * b
    t = split * a
    ah = t - (t - a)
    al = a - ah
    t = split * b
    bh = t - (t - b)
    bl = b - bh
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def round_like_label_text(labels: np.ndarray) -> np.ndarray:
    """float32 labels as the official label files give them back: every value rounded to 6
    decimals exactly as '{:.6f}' rounds (the exact binary value, ties to even; plain np.round
    differs at near-ties, e.g. 0.0984375), then parsed as float32. Vectorized; equals
    `float32(format_label_lines(labels))` value for value."""
    x = np.asarray(labels, np.float64)
    p, e = _two_product(x, 1e6)  # x * 10^6 = p + e exactly
    r = np.round(p)  # ties to even on p
    d = p - r  # exact
    r = np.where((d == 0.5) & (e > 0), r + 1, r)  # p was a tie but the true value lies above it
    r = np.where((d == -0.5) & (e < 0), r - 1, r)  # ... or below it
    return (r / 1e6).astype(np.float32)
