"""The torch/torchvision post-processing that `kapao.postprocess` replaced (kapao before the
NumPy port), kept only as the benchmark's reference: `bench_postprocess.py` times it next to the
NumPy path and checks that both give the same detections and poses. Not part of the package.
Needs torch and torchvision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torchvision

from kapao.errors import KapaoError
from kapao.postprocess import fuse_keypoints
from kapao.presets import Preset, get_preset
from kapao.results import Poses
from kapao.schema import KeypointSchema

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


MAX_WH = 4096  # class offset for class-aware NMS in one call (boxes of different classes never overlap)
PER_CLASS_NMS_FROM = 2000  # candidates above which NMS runs per class (same result, less time)
# with a max_det cap, NMS first runs on this many x max_det most confident candidates (growing
# 4x while fewer than max_det survive): greedy NMS decides each box from higher-scored boxes only,
# so the first max_det kept boxes are the same as from NMS over all candidates
PREFIX_NMS_FACTOR = 4


def num_keypoints_from_columns(no: int) -> int:
    """K from the row width no = 5 + (1 + K) + 2K."""
    if no < 9 or (no - 6) % 3:
        raise KapaoError(
            f"prediction rows have {no} columns; expected 5 + (1 + K) + 2K for K keypoints (e.g. 57 for COCO)"
        )
    return (no - 6) // 3


def _xywh2xyxy(xywh: torch.Tensor) -> torch.Tensor:
    half = xywh[:, 2:4] / 2
    return torch.cat((xywh[:, 0:2] - half, xywh[:, 0:2] + half), 1)


def nms_kp(
    pred: torch.Tensor,
    conf_thres: float,
    iou_thres: float,
    num_keypoints: int,
    classes: Sequence[int] | None = None,
    max_det: int = 300,
    max_nms: int = 30000,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """NMS for one image, as the official `non_max_suppression_kp`.

    pred (N, 5 + nc + 2K) -> (n, 6 + 2K) `[x1, y1, x2, y2, conf, cls, kps]`, descending conf.
    Keeps rows with obj > conf_thres, then conf = obj * cls (best class, first index on ties) >
    conf_thres, optionally only `classes`; the `max_nms` most confident enter class-aware NMS
    (boxes offset by cls * 4096); at most `max_det` are kept. rows: ascending indices of the
    rows to consider (e.g. from a looser objectness filter; None: all), so that callers filtering
    once for several calls copy no rows.
    """
    nc = 1 + num_keypoints
    # the same row-wise arithmetic as the official code, but gathering only the columns each step
    # needs and full rows only for the kept boxes (junk-heavy outputs have thousands of candidates)
    if rows is None:
        rows = torch.nonzero(pred[:, 4] > conf_thres).view(-1)
    else:
        rows = rows[pred[rows, 4] > conf_thres]
    cand = pred[rows, 4 : 5 + nc]
    conf, j = (cand[:, 1:] * cand[:, :1]).max(1)
    keep = conf > conf_thres
    if classes is not None:
        keep &= torch.isin(j, torch.as_tensor(list(classes), device=j.device, dtype=j.dtype))
    rows, conf, j = rows[keep], conf[keep], j[keep]
    if rows.numel() > max_nms:
        top = conf.argsort(descending=True)[:max_nms]
        rows, conf, j = rows[top], conf[top], j[top]
    if rows.numel() == 0:
        return pred.new_zeros((0, 6 + 2 * num_keypoints))
    cls = j.to(pred.dtype)
    # float32 for NMS: fp16 (--half) cannot hold the class offsets (16 * 4096 > 65504) and CPU
    # torchvision has no fp16 kernel; a no-op for float32 input
    boxes = _xywh2xyxy(pred[rows, :4]).float() + cls[:, None].float() * MAX_WH
    i = _class_aware_nms(boxes, conf.float(), cls, iou_thres, max_det)
    x = pred[rows[i]]
    return torch.cat((_xywh2xyxy(x[:, :4]), conf[i, None], cls[i, None], x[:, 5 + nc :]), 1)


def _class_aware_nms(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_thres: float, max_det: int | None = None
) -> torch.Tensor:
    """torchvision NMS over class-offset boxes -> the first `max_det` (None: all) kept indices by
    descending score (ties: lower index first), exactly as `nms(boxes, scores)[:max_det]` returns
    them. Junk-heavy inputs (thousands of candidates, e.g. keypoint objects at the val threshold)
    cost O(n^2) in one call; a most-confident prefix decides the first max_det kept boxes alone."""
    n = boxes.shape[0]
    if max_det is None or n <= PREFIX_NMS_FACTOR * max_det:
        return _nms_all(boxes, scores, classes, iou_thres)[:max_det]
    order = scores.sort(descending=True, stable=True).indices  # the order the full call visits
    m = PREFIX_NMS_FACTOR * max_det
    while True:
        idx = order[:m]
        keep = _nms_all(boxes[idx], scores[idx], classes[idx], iou_thres)
        if keep.numel() >= max_det or m >= n:
            return idx[keep[:max_det]]
        m *= PREFIX_NMS_FACTOR


def _nms_all(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Every kept index, as one torchvision call over the class-offset boxes returns them. Boxes
    of different classes never overlap, so above PER_CLASS_NMS_FROM candidates one call per class
    keeps exactly the same boxes in a fraction of the time."""
    if boxes.shape[0] <= PER_CLASS_NMS_FROM:
        return torchvision.ops.nms(boxes, scores, iou_thres)
    kept = [idx[torchvision.ops.nms(boxes[idx], scores[idx], iou_thres)]
            for idx in (torch.nonzero(classes == c).view(-1) for c in torch.unique(classes))]
    keep = torch.cat(kept).sort().values  # by index, so that the stable score sort breaks ties by index
    return keep[scores[keep].sort(descending=True, stable=True).indices]


def run_nms(
    pred: torch.Tensor, preset: Preset | str, num_keypoints: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Person and keypoint-object detections per image.

    pred (B, N, 5 + nc + 2K) -> (person_dets, kp_dets), two lists of B tensors (n, 6 + 2K).
    One combined NMS when iou_thres == iou_thres_kp and conf_thres_kp >= conf_thres (persons and
    keypoint objects then share the max_det cap; keypoint objects also need conf >= conf_thres_kp);
    otherwise two calls: class 0 at (conf_thres, iou_thres) and classes 1..K at the _kp values.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if pred.ndim != 3:
        raise KapaoError(f"run_nms: expected predictions (B, N, C), got shape {tuple(pred.shape)}")
    k = num_keypoints if num_keypoints is not None else num_keypoints_from_columns(pred.shape[-1])
    if pred.shape[-1] != 6 + 3 * k:
        raise KapaoError(f"run_nms: rows have {pred.shape[-1]} columns, expected {6 + 3 * k} for K={k} keypoints")
    kw = {"num_keypoints": k, "max_det": preset.max_det, "max_nms": preset.max_nms}
    person_dets, kp_dets = [], []
    floor = min(preset.conf_thres, preset.conf_thres_kp)
    for x in pred:  # per image, as NMS is
        # one pass over the (large) raw rows: every later filter is stricter than obj > floor,
        # and the kept rows stay in their order, so NMS breaks ties as over all rows
        rows = torch.nonzero(x[:, 4] > floor).view(-1)
        if preset.combined_nms:
            d = nms_kp(x, preset.conf_thres, preset.iou_thres, rows=rows, **kw)
            person_dets.append(d[d[:, 5] == 0])
            d = d[d[:, 4] >= preset.conf_thres_kp]
            kp_dets.append(d[d[:, 5] > 0])
        else:
            person_dets.append(nms_kp(x, preset.conf_thres, preset.iou_thres, classes=[0], rows=rows, **kw))
            kp_dets.append(nms_kp(x, preset.conf_thres_kp, preset.iou_thres_kp, classes=range(1, 1 + k), rows=rows, **kw))
    return person_dets, kp_dets


def rescale_dets(
    dets: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int], clip_all_keypoints: bool = False
) -> torch.Tensor:
    """(n, 6 + 2K) NMS rows in network-input pixels -> a new (n, 6 + 2K) tensor in original pixels.

    Boxes are clipped to the image; keypoints as `scale_keypoints` (official: only keypoints 0 and 1
    are clipped). This equals what the official `post_process_batch` leaves in `person_dets` after
    mutating it in place (boxes not rounded).
    """
    return torch.cat(
        (
            scale_boxes(dets[:, :4], input_hw, orig_hw),
            dets[:, 4:6],
            scale_keypoints(dets[:, 6:], input_hw, orig_hw, clip_all=clip_all_keypoints),
        ),
        1,
    )


def _hw(shape: Sequence[int]) -> tuple[int, int]:
    return int(shape[0]), int(shape[1])


def postprocess(
    pred: torch.Tensor,
    preset: Preset | str,
    input_hw: tuple[int, int],
    orig_hws: Sequence[tuple[int, int]],
    schema: KeypointSchema,
    paths: Sequence[str | None] | None = None,
) -> list[Poses]:
    """Decoded predictions -> one `Poses` per image, in original-image pixels.

    pred (B, N, 5 + nc + 2K) for a batch letterboxed to input_hw = (H, W); orig_hws: B (h0, w0).
    The mapping back recomputes gain and padding from the two shapes, as the official code (so
    an image letterboxed into a larger rect-batch shape maps back correctly too).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    k = schema.num_keypoints
    if pred.ndim != 3 or pred.shape[-1] != 6 + 3 * k:
        raise KapaoError(
            f"postprocess: predictions of shape {tuple(pred.shape)} do not fit the {k}-keypoint schema "
            f"({schema.source}); expected (B, N, {6 + 3 * k}); use the schema the model was trained with"
        )
    if len(orig_hws) != pred.shape[0]:
        raise KapaoError(f"postprocess: {len(orig_hws)} image sizes for a batch of {pred.shape[0]}")
    person_dets, kp_dets = run_nms(pred, preset, k)
    return postprocess_dets(person_dets, kp_dets, preset, input_hw, orig_hws, schema, paths)


def postprocess_dets(
    person_dets: Sequence[torch.Tensor],
    kp_dets: Sequence[torch.Tensor],
    preset: Preset | str,
    input_hw: tuple[int, int],
    orig_hws: Sequence[tuple[int, int]],
    schema: KeypointSchema,
    paths: Sequence[str | None] | None = None,
) -> list[Poses]:
    """`run_nms` outputs (B lists of (n, 6 + 2K) rows in network-input pixels) -> B `Poses`.

    Persons: boxes rescaled, clipped and rounded (float32), keypoints rescaled (official clipping
    unless preset.clip_all_keypoints), scores = conf. Keypoint objects: boxes rescaled and clipped,
    kept as `Poses.kp_objects`, and fused into the poses when preset.use_kp_dets.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    k = schema.num_keypoints
    if not (len(person_dets) == len(kp_dets) == len(orig_hws)):
        raise KapaoError("postprocess: person_dets, kp_dets and orig_hws need one entry per image")
    paths = list(paths) if paths is not None else [None] * len(orig_hws)
    input_hw = _hw(input_hw)

    boxes, scores, poses, kp_objs = [], [], [], []
    for pd, kd, orig in zip(person_dets, kp_dets, orig_hws):
        orig = _hw(orig)
        pd = rescale_dets(pd.detach().float().cpu(), input_hw, orig, preset.clip_all_keypoints)
        boxes.append(pd[:, :4].round().numpy())
        scores.append(pd[:, 4].numpy())
        kps = pd[:, 6:].numpy().reshape(-1, k, 2)
        poses.append(np.concatenate((kps, np.zeros((len(kps), k, 1))), 2))
        kd = kd.detach().float().cpu()
        kp_objs.append(torch.cat((scale_boxes(kd[:, :4], input_hw, orig), kd[:, 4:5], kd[:, 5:6] - 1), 1).numpy())

    if preset.use_kp_dets:
        poses, _ = fuse_keypoints(poses, scores, kp_objs, preset.conf_thres_kp_person, preset.overwrite_tol)
    return [
        Poses(bx, sc, ps, schema, _hw(orig), path, ko)
        for bx, sc, ps, orig, path, ko in zip(boxes, scores, poses, orig_hws, paths, kp_objs)
    ]


# the torch letterbox inverse it used

def _gain_pad(input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> tuple[float, float, float]:
    """gain = min(h1/h0, w1/w0), pad = ((w1 - w0 gain) / 2, (h1 - h0 gain) / 2), as scale_coords."""
    h1, w1 = int(input_hw[0]), int(input_hw[1])
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    gain = min(h1 / h0, w1 / w0)
    return gain, (w1 - w0 * gain) / 2, (h1 - h0 * gain) / 2


def _to_torch(x: ArrayT) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _like(t: torch.Tensor, ref: ArrayT) -> ArrayT:
    return t.numpy() if isinstance(ref, np.ndarray) else t


def scale_boxes(boxes: ArrayT, input_hw: tuple[int, int], orig_hw: tuple[int, int], clip: bool = True) -> ArrayT:
    """(N, 4) xyxy in network-input pixels -> a new (N, 4) array in original-image pixels.

    (x - pad) / gain in the input dtype (float32 as the official), then x clamped to [0, w0] and
    y to [0, h0]. The input is not modified.
    """
    t = _to_torch(boxes)
    if t.ndim != 2 or t.shape[-1] != 4:
        raise KapaoError(f"scale_boxes: expected boxes of shape (N, 4), got {tuple(t.shape)}")
    gain, pw, ph = _gain_pad(input_hw, orig_hw)
    out = t.clone()
    out[:, 0::2] -= pw
    out[:, 1::2] -= ph
    out /= gain
    if clip:
        out[:, 0::2] = out[:, 0::2].clamp(0, int(orig_hw[1]))
        out[:, 1::2] = out[:, 1::2].clamp(0, int(orig_hw[0]))
    return _like(out, boxes)


def scale_keypoints(
    kps: ArrayT, input_hw: tuple[int, int], orig_hw: tuple[int, int], clip_all: bool = False
) -> ArrayT:
    """(N, 2K) flat (x, y) pairs or (N, K, 2) in network-input pixels -> a new array of the same
    shape in original-image pixels.

    Same mapping as `scale_boxes`. Clipping reproduces the official code by default: its
    `clip_coords` clamps only columns 0..3 of the flat array, i.e. keypoints 0 and 1 (x to
    [0, w0], y to [0, h0]); the others may lie outside the image. `clip_all=True` clips them all.
    """
    t = _to_torch(kps)
    shape = t.shape
    if not ((t.ndim == 2 and shape[1] % 2 == 0) or (t.ndim == 3 and shape[2] == 2)):
        raise KapaoError(f"scale_keypoints: expected (N, 2K) or (N, K, 2) keypoints, got {tuple(shape)}")
    gain, pw, ph = _gain_pad(input_hw, orig_hw)
    out = t.reshape(shape[0], shape[1] * (shape[2] if t.ndim == 3 else 1)).clone()
    out[:, 0::2] -= pw
    out[:, 1::2] -= ph
    out /= gain
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    n_clip = out.shape[1] if clip_all else min(4, out.shape[1])
    out[:, 0:n_clip:2] = out[:, 0:n_clip:2].clamp(0, w0)
    out[:, 1:n_clip:2] = out[:, 1:n_clip:2].clamp(0, h0)
    return _like(out.reshape(shape), kps)
