"""Post-processing shared by predict, val and the demos: NMS, rescaling, keypoint-object fusion.

NumPy only (no torch): every backend (ONNX Runtime, OpenVINO, torch) hands its raw rows here.
Raw rows (B, N, 5 + nc + 2K), nc = 1 + K, are in network-input pixels:
`[cx, cy, w, h, obj, cls_0 (person), cls_1..cls_K (keypoint objects), kx_1, ky_1, ..., kx_K, ky_K]`.

1. `run_nms`: confidence filter and class-aware NMS (`kapao.nms.nms`, torchvision's in NumPy),
   persons and keypoint objects in one call or two exactly when the official `run_nms` does.
   Rows out: (n, 6 + 2K) float32 `[x1, y1, x2, y2, conf, cls, 2K keypoint coords]`, descending conf.
2. `rescale_dets`: to original-image pixels (`kapao.data.letterbox.scale_boxes/scale_keypoints`).
3. `fuse_keypoints`: each keypoint object, in NMS order, replaces the keypoint of its type of the
   person whose current keypoint is nearest, if more confident and closer than `overwrite_tol`.
   Vectorized over images and keypoint types, and over runs of objects between overwrites.
4. `postprocess(pred, ...)`: all of the above, one `Poses` per image; `postprocess_dets` starts
   from `run_nms` outputs (e.g. when NMS ran elsewhere).

Inputs may be any array-like (NumPy arrays, torch tensors on any device, fp16 included): they are
read as float32 once. All comparisons follow the official code: strict, in float32 for
confidences, and IoU (float32) against the threshold as a double, as torchvision's CPU kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kapao.data.letterbox import scale_boxes, scale_keypoints
from kapao.errors import KapaoError
from kapao.nms import nms
from kapao.presets import Preset, get_preset
from kapao.results import Poses
from kapao.schema import KeypointSchema

MAX_WH = 4096  # class offset for class-aware NMS in one call (boxes of different classes never overlap)
# distances computed per step of fuse_keypoints (sets how many objects per group a step looks at;
# speed only, the result is the same for any value)
FUSE_STEP_BUDGET = 2048


def as_numpy(x: Any) -> np.ndarray:
    """Any array-like -> np.ndarray, float16 kept as float16 (--half rows, whose thresholds the
    official code compares in fp16), anything else as float32 (no copy for float32 arrays).
    Torch tensors (any device) are read through their own `.detach().cpu()`; torch is never
    imported here."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:  # bfloat16 and other dtypes NumPy cannot hold
            x = x.float().numpy()
    x = np.asarray(x)
    return x if x.dtype == np.float16 else x.astype(np.float32, copy=False)


def as_float32(x: Any) -> np.ndarray:
    """Any array-like (torch tensors included) -> np.ndarray float32 (no copy for float32)."""
    return as_numpy(x).astype(np.float32, copy=False)


def num_keypoints_from_columns(no: int) -> int:
    """K from the row width no = 5 + (1 + K) + 2K."""
    if no < 9 or (no - 6) % 3:
        raise KapaoError(
            f"prediction rows have {no} columns; expected 5 + (1 + K) + 2K for K keypoints (e.g. 57 for COCO)"
        )
    return (no - 6) // 3


def _xywh2xyxy(xywh: np.ndarray) -> np.ndarray:
    """(n, 4) [cx, cy, w, h] -> (n, 4) [x1, y1, x2, y2] in the input's dtype, as torch."""
    half = xywh[:, 2:4] / 2
    return np.concatenate((xywh[:, 0:2] - half, xywh[:, 0:2] + half), 1)


def _best_class(pred: np.ndarray, rows: np.ndarray, nc: int) -> tuple[np.ndarray, np.ndarray]:
    """conf = max over the nc class columns of obj * cls and its class j (first index on ties, as
    torch's max), for pred[rows]: ((n,), (n,) int64), in the rows' dtype."""
    cand = pred[rows, 4 : 5 + nc]
    prod = cand[:, 1:] * cand[:, :1]
    j = prod.argmax(1)
    return prod.reshape(-1)[np.arange(len(j)) * nc + j], j


def nms_kp(
    pred: Any,
    conf_thres: float,
    iou_thres: float,
    num_keypoints: int,
    classes: Sequence[int] | None = None,
    max_det: int = 300,
    max_nms: int = 30000,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """NMS for one image, as the official `non_max_suppression_kp`.

    pred (N, 5 + nc + 2K) -> (n, 6 + 2K) float32 `[x1, y1, x2, y2, conf, cls, kps]`, descending conf.
    Keeps rows with obj > conf_thres, then conf = obj * cls (best class, first index on ties) >
    conf_thres, optionally only `classes`; the `max_nms` most confident enter class-aware NMS
    (boxes offset by cls * 4096); at most `max_det` are kept. rows: ascending indices of the
    rows to consider (e.g. from a looser objectness filter; None: all), so that callers filtering
    once for several calls copy no rows. float16 rows (--half) are filtered and converted to xyxy
    in fp16 as the official code, then widened: NMS and the returned rows are float32 always (fp16
    cannot hold the class offsets, 16 * 4096 > 65504).
    """
    pred = as_numpy(pred)
    c = pred.dtype.type(conf_thres)
    rows = np.flatnonzero(pred[:, 4] > c) if rows is None else rows[pred[rows, 4] > c]
    conf, j = _best_class(pred, rows, 1 + num_keypoints)
    return _nms_rows(pred, rows, conf, j, conf_thres, iou_thres, num_keypoints, classes, max_det, max_nms)


def _nms_rows(
    pred: np.ndarray,
    rows: np.ndarray,
    conf: np.ndarray,
    j: np.ndarray,
    conf_thres: float,
    iou_thres: float,
    num_keypoints: int,
    classes: Sequence[int] | None,
    max_det: int,
    max_nms: int,
) -> np.ndarray:
    """`nms_kp` from the `_best_class` results of ascending `rows` (a superset of the rows with
    obj > conf_thres), so that run_nms computes them once for its two calls."""
    nc = 1 + num_keypoints
    c = pred.dtype.type(conf_thres)
    # the same row-wise arithmetic as the official code, but gathering only the columns each step
    # needs and full rows only for the kept boxes (junk-heavy outputs have thousands of candidates)
    keep = (pred[rows, 4] > c) & (conf > c)
    if classes is not None:
        keep &= np.isin(j, np.asarray(list(classes), dtype=np.int64))
    rows, conf, j = rows[keep], conf[keep], j[keep]
    if len(rows) > max_nms:
        # stable: the official torch argsort is not, so ties at the max_nms cut may differ there
        top = np.argsort(-conf, kind="stable")[:max_nms]
        rows, conf, j = rows[top], conf[top], j[top]
    if len(rows) == 0:
        return np.zeros((0, 6 + 2 * num_keypoints), dtype=np.float32)
    cls = j.astype(np.float32)
    boxes = _xywh2xyxy(pred[rows, :4]).astype(np.float32) + cls[:, None] * np.float32(MAX_WH)
    i = nms(boxes, conf, iou_thres, max_det)
    x = pred[rows[i]]
    out = (_xywh2xyxy(x[:, :4]), conf[i, None], cls[i, None], x[:, 5 + nc :])
    return np.concatenate([a.astype(np.float32, copy=False) for a in out], 1)


def run_nms(
    pred: Any, preset: Preset | str, num_keypoints: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Person and keypoint-object detections per image.

    pred (B, N, 5 + nc + 2K) array-like -> (person_dets, kp_dets), two lists of B float32 arrays
    (n, 6 + 2K). One combined NMS when iou_thres == iou_thres_kp and conf_thres_kp >= conf_thres
    (persons and keypoint objects then share the max_det cap; keypoint objects also need
    conf >= conf_thres_kp); otherwise two calls: class 0 at (conf_thres, iou_thres) and classes
    1..K at the _kp values. Thresholds are compared in the rows' dtype (float16 rows: in fp16).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    pred = as_numpy(pred)
    if pred.ndim != 3:
        raise KapaoError(f"run_nms: expected predictions (B, N, C), got shape {tuple(pred.shape)}")
    k = num_keypoints if num_keypoints is not None else num_keypoints_from_columns(pred.shape[-1])
    if pred.shape[-1] != 6 + 3 * k:
        raise KapaoError(f"run_nms: rows have {pred.shape[-1]} columns, expected {6 + 3 * k} for K={k} keypoints")
    kw = {"num_keypoints": k, "max_det": preset.max_det, "max_nms": preset.max_nms}
    p_thr, k_thr = (preset.conf_thres, preset.iou_thres), (preset.conf_thres_kp, preset.iou_thres_kp)
    person_dets, kp_dets = [], []
    floor = pred.dtype.type(min(preset.conf_thres, preset.conf_thres_kp))
    conf_kp = np.float32(pred.dtype.type(preset.conf_thres_kp))  # widened: same verdicts as in fp16
    for x in pred:  # per image, as NMS is
        # one pass over the (large) raw rows: every later filter is stricter than obj > floor,
        # and the kept rows stay in their order, so NMS breaks ties as over all rows
        # (conf and class do not depend on the threshold: computed once for both calls)
        rows = np.flatnonzero(x[:, 4] > floor)
        cand = (x, rows, *_best_class(x, rows, 1 + k))
        if preset.combined_nms:
            d = _nms_rows(*cand, *p_thr, classes=None, **kw)
            person_dets.append(d[d[:, 5] == 0])
            d = d[d[:, 4] >= conf_kp]
            kp_dets.append(d[d[:, 5] > 0])
        else:
            person_dets.append(_nms_rows(*cand, *p_thr, classes=[0], **kw))
            kp_dets.append(_nms_rows(*cand, *k_thr, classes=range(1, 1 + k), **kw))
    return person_dets, kp_dets


def rescale_dets(
    dets: Any, input_hw: tuple[int, int], orig_hw: tuple[int, int], clip_all_keypoints: bool = False
) -> np.ndarray:
    """(n, 6 + 2K) NMS rows in network-input pixels -> a new (n, 6 + 2K) float32 array in original pixels.

    Boxes are clipped to the image; keypoints as `scale_keypoints` (official: only keypoints 0 and 1
    are clipped). This equals what the official `post_process_batch` leaves in `person_dets` after
    mutating it in place (boxes not rounded).
    """
    dets = as_float32(dets)
    return np.concatenate(
        (
            scale_boxes(dets[:, :4], input_hw, orig_hw),
            dets[:, 4:6],
            scale_keypoints(dets[:, 6:], input_hw, orig_hw, clip_all=clip_all_keypoints),
        ),
        1,
    )


def fuse_keypoints(
    poses: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    kp_objects: Sequence[np.ndarray],
    conf_thres_kp_person: float,
    overwrite_tol: float,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Fuse keypoint objects into poses, for B images at once; exactly the official greedy loop.

    poses[b]:      (N_b, K, 3) float64 x, y, conf (original pixels; conf 0 = from the pose object)
    scores[b]:     (N_b,) float32 person scores; only persons with score > conf_thres_kp_person
                   (compared in float32) receive keypoints
    kp_objects[b]: (M_b, 6) x1, y1, x2, y2, conf, kp_type (0-based) in original pixels, in the order
                   they are to be applied (NMS order)
    Returns (new poses list, n_fused (B, K) int64 = overwrites per image and keypoint type).

    The official code loops over objects: location = float32 mean of the box corners; the person
    whose CURRENT keypoint of that type is nearest (first on ties) is chosen; its keypoint is
    replaced by (x, y, conf) if conf > stored conf and distance < overwrite_tol (float64, strict).
    Exact vectorization: an object only reads and writes keypoints of its own type, so every
    (image, type) group is an independent sequence and all groups advance together. Within a
    group, an object that does not overwrite changes nothing, so a step judges the next `window`
    objects of each group against the current state at once, applies only the first overwrite,
    and resumes after it (after the window if there was none). Steps <= overwrites + objects /
    window per group; window = 1 is plain rank stepping. The result never depends on the window.
    """
    b_count = len(poses)
    if not (len(scores) == len(kp_objects) == b_count):
        raise KapaoError("fuse_keypoints: poses, scores and kp_objects need one entry per image")
    out = [np.array(p, dtype=np.float64, copy=True) for p in poses]
    k = out[0].shape[1] if b_count else 0
    n_fused = np.zeros((b_count, k), dtype=np.int64)
    masks = [np.asarray(s, dtype=np.float32) > np.float32(conf_thres_kp_person) for s in scores]
    n_person = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    objs = [np.asarray(o, dtype=np.float32).reshape(-1, 6) for o in kp_objects]
    # images whose objects can fuse: at least one person and one object (the official skips others)
    active = [b for b in range(b_count) if n_person[b] and len(objs[b])]
    if not active:
        return out, n_fused
    pmax = int(n_person.max())

    # state per group g = (image, type) and person: x, y, conf; padded persons sit at infinity
    # so they are never nearest
    px = np.full((b_count * k, pmax), np.inf)
    py = np.full((b_count * k, pmax), np.inf)
    pc = np.zeros((b_count * k, pmax))
    for b in active:
        chosen = out[b][masks[b]].transpose(1, 0, 2)  # (K, n, 3)
        rows = slice(b * k, (b + 1) * k)
        px[rows, : n_person[b]], py[rows, : n_person[b]], pc[rows, : n_person[b]] = chosen.transpose(2, 0, 1)

    o = np.concatenate([objs[b] for b in active])
    img = np.concatenate([np.full(len(objs[b]), b, dtype=np.int64) for b in active])
    kp_type = o[:, 5].astype(np.int64)
    if (kp_type < 0).any() or (kp_type >= k).any() or (o[:, 5] != kp_type).any():
        raise KapaoError(f"fuse_keypoints: kp_type must be an integer in 0..{k - 1}")

    # objects grouped by (image, type), each group keeping its sequence; a cursor per group
    group = img * k + kp_type
    order = np.argsort(group, kind="stable")
    o = o[order]
    # float32 mean of the corners, as np.mean over two float32 values
    ox = ((o[:, 0] + o[:, 2]) / np.float32(2)).astype(np.float64)
    oy = ((o[:, 1] + o[:, 3]) / np.float32(2)).astype(np.float64)
    oc = o[:, 4].astype(np.float64)
    counts = np.bincount(group, minlength=b_count * k)
    ends = np.cumsum(counts)
    cursor = ends - counts
    live = np.flatnonzero(counts)
    fused_flat = n_fused.reshape(-1)
    while live.size:
        # the next `window` objects of every live group, all judged against the current state;
        # the window widens as groups finish so that a long run of one type needs few steps
        window = int(min(max(FUSE_STEP_BUDGET // (live.size * pmax), 1), (ends[live] - cursor[live]).max()))
        idx = cursor[live, None] + np.arange(window)  # (G, W)
        valid = idx < ends[live, None]
        idx = np.minimum(idx, ends[live, None] - 1)
        dx = px[live][:, None, :] - ox[idx][:, :, None]  # (G, W, P)
        dy = py[live][:, None, :] - oy[idx][:, :, None]
        dist = np.sqrt(dx * dx + dy * dy)  # as np.linalg.norm(axis=-1)
        near = np.argmin(dist, axis=2)  # (G, W), first on ties
        d_near = dist.min(axis=2)
        ok = valid & (oc[idx] > pc[live[:, None], near]) & (d_near < overwrite_tol)
        # objects before a group's first overwrite changed nothing, so their verdicts are final;
        # apply that overwrite and resume right after it (or after the window if none)
        hit = ok.any(1)
        first = ok.argmax(1)
        g = np.flatnonzero(hit)
        j, p, gg = idx[g, first[g]], near[g, first[g]], live[g]
        px[gg, p], py[gg, p], pc[gg, p] = ox[j], oy[j], oc[j]
        fused_flat[gg] += 1
        cursor[live] += np.where(hit, first + 1, window)
        live = live[cursor[live] < ends[live]]

    for b in active:
        rows = slice(b * k, (b + 1) * k)
        n = n_person[b]
        out[b][masks[b]] = np.stack((px[rows, :n], py[rows, :n], pc[rows, :n]), 2).transpose(1, 0, 2)
    return out, n_fused


def _hw(shape: Sequence[int]) -> tuple[int, int]:
    return int(shape[0]), int(shape[1])


def postprocess(
    pred: Any,
    preset: Preset | str,
    input_hw: tuple[int, int],
    orig_hws: Sequence[tuple[int, int]],
    schema: KeypointSchema,
    paths: Sequence[str | None] | None = None,
) -> list[Poses]:
    """Decoded predictions -> one `Poses` per image, in original-image pixels.

    pred (B, N, 5 + nc + 2K) array-like (read as float32) for a batch letterboxed to
    input_hw = (H, W); orig_hws: B (h0, w0).
    The mapping back recomputes gain and padding from the two shapes, as the official code (so
    an image letterboxed into a larger rect-batch shape maps back correctly too).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    pred = as_numpy(pred)
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
    person_dets: Sequence[Any],
    kp_dets: Sequence[Any],
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
        pd = rescale_dets(pd, input_hw, orig, preset.clip_all_keypoints)
        boxes.append(pd[:, :4].round())
        scores.append(pd[:, 4].copy())
        kps = pd[:, 6:].reshape(-1, k, 2)
        poses.append(np.concatenate((kps, np.zeros((len(kps), k, 1))), 2))
        kd = as_float32(kd).reshape(-1, 6 + 2 * k)
        kp_objs.append(np.concatenate((scale_boxes(kd[:, :4], input_hw, orig), kd[:, 4:5], kd[:, 5:6] - 1), 1))

    if preset.use_kp_dets:
        poses, _ = fuse_keypoints(poses, scores, kp_objs, preset.conf_thres_kp_person, preset.overwrite_tol)
    return [
        Poses(bx, sc, ps, schema, _hw(orig), path, ko)
        for bx, sc, ps, orig, path, ko in zip(boxes, scores, poses, orig_hws, paths, kp_objs)
    ]
