"""Letterbox pre-processing and its exact inverse, with the official KAPAO arithmetic.

Two pipelines feed the network:

* demos / `kapao predict` (`preprocess_demo`): letterbox the original image to `imgsz` with
  `auto=True` (pad only up to the next multiple of the stride), scale up allowed;
* val (`load_image_for_val` + `preprocess_val`): first resize so the longest side is `imgsz`
  (INTER_AREA when shrinking), then letterbox with `scaleup=False` to a fixed square or, for
  rectangular batches, to the batch shape from `rect_batch_shapes`.

`scale_boxes` / `scale_keypoints` map network-input pixels back to original-image pixels the way
the official `scale_coords` does: gain and padding are recomputed from the two shapes (the
dataloader's own ratio/pad are not used), and by default only the first two keypoints are
clipped to the image (the official clipping quirk; `clip_all=True` clips every keypoint).

`prepare_input` is the one place that applies a backend's input-shape policy (dynamic: the demo
letterbox at `imgsz`; fixed: a letterbox to the backend's (H, W)). NumPy and OpenCV only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kapao.errors import KapaoError

# ((h0, w0), ((h / h0, w / w0), (pad_w, pad_h))): what the official val dataloader records per image.
ValShapes = tuple[tuple[int, int], tuple[tuple[float, float], tuple[float, float]]]


def _check_image(img: np.ndarray, where: str) -> None:
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        shape = getattr(img, "shape", type(img).__name__)
        raise KapaoError(f"{where}: expected an image array (H, W) or (H, W, C) with H, W >= 1, got {shape}")


def _as_hw(shape: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(shape, (int, np.integer)):
        return int(shape), int(shape)
    h, w = shape
    return int(h), int(w)


def letterbox(
    img: np.ndarray,
    new_shape: int | tuple[int, int] = 640,
    auto: bool = True,
    scaleup: bool = True,
    stride: int = 64,
    color: int | tuple[int, int, int] = 114,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio, then pad with `color` to `new_shape` (h, w) or an int square.

    img (H, W[, C]) uint8 -> (img_out (H', W'[, C]), ratio (r, r), (dw, dh)).
    r = min(new_h / H, new_w / W), capped at 1 unless `scaleup`; the resized size is
    (round(W r), round(H r)) with INTER_LINEAR. With `auto`, only the remainder modulo `stride` is
    padded (minimal rectangle, the demos); otherwise the output is exactly `new_shape` (val).
    (dw, dh) are the float half-paddings; the border applied is top = round(dh - 0.1),
    bottom = round(dh + 0.1), and the same for left/right, so an odd padding puts the extra pixel
    at the bottom/right.
    """
    _check_image(img, "letterbox")
    h0, w0 = img.shape[:2]
    nh, nw = _as_hw(new_shape)
    r = min(nh / h0, nw / w0)
    if not scaleup:
        r = min(r, 1.0)
    unpad_w, unpad_h = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = nw - unpad_w, nh - unpad_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w0, h0) != (unpad_w, unpad_h):
        img = cv2.resize(img, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    value = (color, color, color) if isinstance(color, (int, np.integer)) else tuple(color)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    return img, (r, r), (float(dw), float(dh))


def check_img_size(imgsz: int, stride: int = 64) -> int:
    """The smallest multiple of `stride` >= imgsz (the official `check_img_size` rounding)."""
    if int(imgsz) < 1:
        raise KapaoError(f"image size {imgsz} is not positive; use e.g. --imgsz 640 or 1280")
    return int(math.ceil(int(imgsz) / stride) * stride)


def to_chw_rgb(img_bgr: np.ndarray) -> np.ndarray:
    """(H, W, 3) BGR uint8 -> contiguous (3, H, W) RGB uint8, the layout the network reads (/255)."""
    return np.ascontiguousarray(img_bgr.transpose(2, 0, 1)[::-1])


def to_input_batch(chws: list[np.ndarray]) -> np.ndarray:
    """(3, H, W) uint8 images of one shape -> (B, 3, H, W) float32 np.ndarray in [0, 1], bit-equal
    to the official `torch.from_numpy(x).float() / 255.0` (IEEE division either way). Divided in
    numpy, not torch: a torch op over a whole image opens an OpenMP region whose worker then
    busy-waits for milliseconds (libgomp's spin count; ~5 ms on this AMD CPU), holding one of the
    cores the ONNX Runtime/OpenVINO forward that follows needs (measured: that forward +6 ms, ~4 %).
    A torch backend wraps it with `torch.from_numpy` (no copy)."""
    if not len(chws):
        raise KapaoError("to_input_batch: no images")
    batch = np.stack(chws) if len(chws) > 1 else chws[0][None]
    return np.divide(batch, np.float32(255.0), dtype=np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """cv2.imread as BGR uint8 (H, W, 3), with a one-line error for missing or unreadable files."""
    p = Path(path)
    if not p.is_file():
        raise KapaoError(f"{p}: image file not found; check the path")
    img = cv2.imread(str(p))
    if img is None:
        raise KapaoError(f"{p}: not a readable image (corrupt, empty or unsupported format); remove or replace it")
    return img


def preprocess_demo(
    img_bgr: np.ndarray, imgsz: int = 640, stride: int = 64
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """The demos' input (`LoadImages(img_size, stride, auto=True)`): (H0, W0, 3) BGR uint8 ->
    ((3, H, W) RGB uint8, ratio, (dw, dh)), H and W multiples of `stride`; feed `x / 255.0`."""
    _check_image(img_bgr, "preprocess_demo")
    imgsz = check_img_size(imgsz, stride)
    out, ratio, pad = letterbox(img_bgr, imgsz, auto=True, scaleup=True, stride=stride)
    return to_chw_rgb(out), ratio, pad


def prepare_input(
    img_bgr: np.ndarray, imgsz: int, stride: int = 64, fixed_hw: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """A backend's input for one image, by its input-shape policy: (H0, W0, 3) BGR uint8 ->
    ((3, H, W) RGB uint8, ratio, (dw, dh)).

    fixed_hw None (dynamic-shape backends): `preprocess_demo(img, imgsz, stride)`, H and W the
    smallest multiples of `stride` holding the image scaled to `imgsz`. fixed_hw (h, w) (a backend
    exported for one shape): letterbox to exactly (h, w), scaling up allowed, `imgsz` unused.
    `postprocess` maps either back with the input and original shapes alone.
    """
    if fixed_hw is None:
        return preprocess_demo(img_bgr, imgsz, stride)
    _check_image(img_bgr, "prepare_input")
    out, ratio, pad = letterbox(img_bgr, _as_hw(fixed_hw), auto=False, scaleup=True, stride=stride)
    return to_chw_rgb(out), ratio, pad


def load_image_for_val(
    img: np.ndarray | str | Path, imgsz: int, augment: bool = False
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """The val dataloader's `load_image`: resize so the longest side is `imgsz`.

    Returns (resized (h, w, 3) BGR, (h0, w0), (h, w)) with h = int(h0 r), w = int(w0 r) (truncation),
    r = imgsz / max(h0, w0); INTER_AREA when shrinking without augmentation, else INTER_LINEAR.
    """
    if not isinstance(img, np.ndarray):
        img = read_image(img)
    _check_image(img, "load_image_for_val")
    h0, w0 = img.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        interp = cv2.INTER_AREA if r < 1 and not augment else cv2.INTER_LINEAR
        img = cv2.resize(img, (int(w0 * r), int(h0 * r)), interpolation=interp)
    return img, (h0, w0), img.shape[:2]


def preprocess_val(
    img: np.ndarray | str | Path, imgsz: int, batch_shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, ValShapes]:
    """One val item: `load_image_for_val`, then letterbox (auto=False, scaleup=False) to
    `batch_shape` (rect batches) or the imgsz square. Returns ((3, H, W) RGB uint8, shapes) with
    shapes = ((h0, w0), ((h / h0, w / w0), (dw, dh))) as the official dataloader records them."""
    resized, (h0, w0), (h, w) = load_image_for_val(img, imgsz)
    target = batch_shape if batch_shape is not None else imgsz
    out, ratio, pad = letterbox(resized, target, auto=False, scaleup=False)
    shapes = ((h0, w0), ((h / h0 * ratio[0], w / w0 * ratio[1]), pad))
    return to_chw_rgb(out), shapes


def rect_batch_shapes(
    hws: np.ndarray | list[tuple[int, int]], imgsz: int, batch_size: int, stride: int = 64, pad: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Rectangular val batches: sort images by aspect ratio h/w and give each batch one shape.

    hws (n, 2) original (h, w) -> (order (n,) int indices into hws, batch_shapes (nb, 2) int (h, w)).
    Item i of the sorted list is in batch i // batch_size. A batch whose ratios are all < 1 gets
    (max ratio, 1), all > 1 gets (1, 1 / min ratio), mixed gets (1, 1); the shape is then
    ceil(s * imgsz / stride + pad) * stride. The sort is stable (the official sort is not, so
    images with equal ratios may be ordered differently there).
    """
    s = np.asarray(hws, dtype=np.float64).reshape(-1, 2)
    if len(s) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    if batch_size < 1:
        raise KapaoError(f"rect batches: batch_size is {batch_size}; use a positive batch size")
    ar = s[:, 0] / s[:, 1]
    order = np.argsort(ar, kind="stable")
    ar = ar[order]
    nb = (len(ar) + batch_size - 1) // batch_size
    shapes = np.ones((nb, 2), dtype=np.float64)
    for i in range(nb):  # one iteration per batch, not per item
        ari = ar[i * batch_size : (i + 1) * batch_size]
        mini, maxi = ari.min(), ari.max()
        if maxi < 1:
            shapes[i] = (maxi, 1)
        elif mini > 1:
            shapes[i] = (1, 1 / mini)
    batch_shapes = np.ceil(shapes * imgsz / stride + pad).astype(np.int64) * stride
    return order, batch_shapes


def _gain_pad(input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> tuple[float, float, float]:
    """gain = min(h1/h0, w1/w0), pad = ((w1 - w0 gain) / 2, (h1 - h0 gain) / 2), as scale_coords."""
    h1, w1 = int(input_hw[0]), int(input_hw[1])
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    gain = min(h1 / h0, w1 / w0)
    return gain, (w1 - w0 * gain) / 2, (h1 - h0 * gain) / 2


def _as_f32_copy(x: Any) -> np.ndarray:
    """Array-like -> a new float32 array (torch tensors through their own .cpu().numpy())."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().float().cpu().numpy()
    return np.array(x, dtype=np.float32, copy=True)


def scale_boxes(boxes: Any, input_hw: tuple[int, int], orig_hw: tuple[int, int], clip: bool = True) -> np.ndarray:
    """(N, 4) xyxy in network-input pixels -> a new (N, 4) float32 array in original-image pixels.

    (x - pad) / gain in float32 (the official torch arithmetic: pad and gain rounded to float32
    first), then x clamped to [0, w0] and y to [0, h0]. The input is not modified.
    """
    out = _as_f32_copy(boxes)
    if out.ndim != 2 or out.shape[-1] != 4:
        raise KapaoError(f"scale_boxes: expected boxes of shape (N, 4), got {tuple(out.shape)}")
    _unletterbox(out, input_hw, orig_hw, 4 if clip else 0)
    return out


def scale_keypoints(
    kps: Any, input_hw: tuple[int, int], orig_hw: tuple[int, int], clip_all: bool = False
) -> np.ndarray:
    """(N, 2K) flat (x, y) pairs or (N, K, 2) in network-input pixels -> a new float32 array of
    the same shape in original-image pixels.

    Same mapping as `scale_boxes`. Clipping reproduces the official code by default: its
    `clip_coords` clamps only columns 0..3 of the flat array, i.e. keypoints 0 and 1 (x to
    [0, w0], y to [0, h0]); the others may lie outside the image. `clip_all=True` clips them all.
    """
    out = _as_f32_copy(kps)
    shape = out.shape
    if not ((out.ndim == 2 and shape[1] % 2 == 0) or (out.ndim == 3 and shape[2] == 2)):
        raise KapaoError(f"scale_keypoints: expected (N, 2K) or (N, K, 2) keypoints, got {tuple(shape)}")
    flat = out.reshape(shape[0], int(np.prod(shape[1:])))  # a view of `out`
    _unletterbox(flat, input_hw, orig_hw, flat.shape[1] if clip_all else min(4, flat.shape[1]))
    return out


def _unletterbox(xy: np.ndarray, input_hw: tuple[int, int], orig_hw: tuple[int, int], n_clip: int) -> None:
    """In place on (N, 2M) float32 (x, y) columns: x -= pad_w, y -= pad_h, /= gain, each with the
    scalar rounded to float32 as torch does for a Python scalar; then the first n_clip columns are
    clamped (x to [0, w0], y to [0, h0])."""
    gain, pw, ph = _gain_pad(input_hw, orig_hw)
    xy[:, 0::2] -= np.float32(pw)
    xy[:, 1::2] -= np.float32(ph)
    xy /= np.float32(gain)
    h0, w0 = np.float32(int(orig_hw[0])), np.float32(int(orig_hw[1]))
    zero = np.float32(0)
    xy[:, 0:n_clip:2] = np.minimum(np.maximum(xy[:, 0:n_clip:2], zero), w0)
    xy[:, 1:n_clip:2] = np.minimum(np.maximum(xy[:, 1:n_clip:2], zero), h0)
