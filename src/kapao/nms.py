"""Greedy NMS in NumPy, equal to `torchvision.ops.nms` on CPU (same kept boxes, same order).

torchvision's CPU kernel visits the boxes by descending score (a stable sort: ties by index) and
suppresses every later box whose IoU with a kept box is above the threshold; IoU is computed in
float32 as inter / (area_i + area_j - inter) and compared with the threshold as a double. `nms`
reproduces that arithmetic and order exactly, without a loop over boxes: each chunk of the
visiting order is resolved together with the boxes kept before it, from the suppression edges
of its x-overlapping pairs (or densely for crowded chunks) by a vectorized fixed-point iteration.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kapao.errors import KapaoError

# speed settings (the result is the same for any values): candidates are resolved NMS_CHUNK at a
# time in score order (stopping at max_det kept) from their x-overlapping pairs, or, above
# NMS_MAX_PAIRS such pairs, densely in blocks of NMS_BLOCK
NMS_CHUNK = 512
NMS_MAX_PAIRS = 1 << 19
NMS_BLOCK = 256


def _f32_below(thr: float) -> np.float32:
    """The largest float32 <= thr: for float32 x, x > thr (in double, as torchvision compares its
    float IoU with the double threshold) exactly when x > _f32_below(thr) in float32."""
    t = np.float32(thr)
    return np.nextafter(t, np.float32(-np.inf)) if float(t) > float(thr) else t


def _iou(c: tuple[np.ndarray, ...], rows: np.ndarray, cols: np.ndarray, outer: bool = True) -> np.ndarray:
    """IoU of the boxes at `rows` (visited first) with those at `cols`: (len(rows), len(cols)) if
    outer, else pairwise (n,). c = (x1, y1, x2, y2, area) float32 columns. torchvision's CPU
    arithmetic: inter = max(min(x2) - max(x1), 0) * max(min(y2) - max(y1), 0),
    iou = inter / (area_row + area_col - inter), all float32."""
    x1, y1, x2, y2, area = c
    r = (lambda v: v[rows][:, None]) if outer else (lambda v: v[rows])
    w = np.minimum(r(x2), x2[cols]) - np.maximum(r(x1), x1[cols])
    h = np.minimum(r(y2), y2[cols]) - np.maximum(r(y1), y1[cols])
    inter = np.fmax(w, np.float32(0), out=w) * np.fmax(h, np.float32(0), out=h)  # fmax: std::max(0, NaN) is 0
    union = r(area) + area[cols]
    union -= inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.divide(inter, union, out=inter)


def _greedy(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Greedy NMS from its suppression edges: src[e] < dst[e] (visiting positions), box src[e]
    suppresses dst[e] if kept -> keep (n,) bool, keep[i] = not any(keep[src] for edges into i).
    Iterated from all-True: after t passes the first t boxes are final (each depends on earlier
    ones only), and the only fixed point is the greedy answer; passes = the longest suppression
    chain + 1, a few in practice."""
    keep = np.ones(n, dtype=bool)
    while True:
        new = np.ones(n, dtype=bool)
        new[dst[keep[src]]] = False
        if np.array_equal(new, keep):
            return keep
        keep = new


def _x_window(x1: np.ndarray, x2: np.ndarray, iou_thres: float) -> np.ndarray:
    """For box p, a bound b_p (float64) with: x1_p <= x1_q and IoU(p, q) > iou_thres (torchvision's
    float32 IoU) only if x1_q < b_p. In exact arithmetic IoU <= the 1-D IoU in x <= ox / w_p, and
    ox <= x2_p - x1_q, so IoU > t needs x1_q < x1_p + (1 - t) w_p; float32 IoU is within ~1e-6
    (relative) of the exact one, hence the margins. b_p <= x2_p: boxes that do not overlap in x
    have inter 0 (IoU 0 or NaN), never above a threshold >= 0."""
    a, b = x1.astype(np.float64), x2.astype(np.float64)
    t = min(max(float(iou_thres), 0.0), 1.0) * (1 - 1e-4)
    return np.minimum(b, a + (1 - t) * (b - a) + 1e-6 * (1 + np.abs(a) + np.abs(b)))


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Owner e has the partner slots lo[e] .. hi[e] - 1 -> (owner (m,), slot (m,)) for all of them."""
    counts = np.maximum(hi - lo, 0)
    owner = np.repeat(np.arange(len(lo)), counts)
    return owner, np.arange(len(owner)) + np.repeat(lo - (np.cumsum(counts) - counts), counts)


def _close_pairs(
    x1: np.ndarray, win: np.ndarray, a: np.ndarray, b: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The pairs of positions whose IoU can exceed the threshold (`_x_window`), found by sorting
    on x1: within `a` (b None) or between `a` and `b`. -> (p, q) position arrays, or None if
    there are more than NMS_MAX_PAIRS of them."""
    sa = a[np.argsort(x1[a], kind="stable")]
    if b is None:  # each box with the boxes after it in x1 order and inside its window
        ranges = [(sa, sa, np.arange(1, len(sa) + 1), np.searchsorted(x1[sa], win[sa], side="left"))]
    else:  # x1_a <= x1_b: b inside a's window; x1_b < x1_a: a inside b's window
        sb = b[np.argsort(x1[b], kind="stable")]
        ranges = [(sa, sb, np.searchsorted(x1[sb], x1[sa], side="left"), np.searchsorted(x1[sb], win[sa], side="left")),
                  (sb, sa, np.searchsorted(x1[sa], x1[sb], side="right"), np.searchsorted(x1[sa], win[sb], side="left"))]
    if sum(int(np.maximum(hi - lo, 0).sum()) for _, _, lo, hi in ranges) > NMS_MAX_PAIRS:
        return None
    pairs = [(own[o], part[k]) for own, part, lo, hi in ranges for o, k in [_expand(lo, hi)]]
    if b is not None:  # (a side, b side)
        pairs[1] = pairs[1][::-1]
    return np.concatenate([p for p, _ in pairs]), np.concatenate([q for _, q in pairs])


def _resolve_chunk(
    c: tuple[np.ndarray, ...], win: np.ndarray, kept: np.ndarray, new: np.ndarray, thr: np.float32
) -> np.ndarray | None:
    """Greedy NMS of the ascending positions `new`, all after the kept positions `kept`: drop
    the boxes a kept box suppresses, then resolve the rest among themselves from their close
    pairs. -> kept positions (old and new, ascending), or None when there are too many pairs."""
    if len(kept):
        pairs = _close_pairs(c[0], win, kept, new)
        if pairs is None:
            return None
        k, b = pairs
        gone = np.zeros(len(new), dtype=bool)
        gone[np.searchsorted(new, b[_iou(c, k, b, outer=False) > thr])] = True
        new = new[~gone]
    pairs = _close_pairs(c[0], win, new)
    if pairs is None:
        return None
    src, dst = np.minimum(*pairs), np.maximum(*pairs)  # src visited first
    hit = _iou(c, src, dst, outer=False) > thr
    keep = _greedy(len(new), np.searchsorted(new, src[hit]), np.searchsorted(new, dst[hit]))
    return np.concatenate((kept, new[keep]))


def _nms_blocks(c: tuple[np.ndarray, ...], kept: np.ndarray, pos: np.ndarray, thr: np.float32) -> np.ndarray:
    """Dense fallback of `_resolve_chunk` for the ascending positions `pos` after the already kept
    boxes `kept`, in blocks of NMS_BLOCK: a block's boxes are dropped if a box kept before the
    block suppresses them, the rest resolved within the block. -> the new kept positions."""
    for start in range(0, len(pos), NMS_BLOCK):
        blk = pos[start : start + NMS_BLOCK]
        if len(kept):
            blk = blk[~(_iou(c, kept, blk) > thr).any(0)]
        src, dst = np.nonzero(np.triu(_iou(c, blk, blk) > thr, 1))
        kept = np.concatenate((kept, blk[_greedy(len(blk), src, dst)]))
    return kept


def nms(boxes: Any, scores: Any, iou_thres: float, max_det: int | None = None) -> np.ndarray:
    """Greedy NMS, equal to `torchvision.ops.nms(boxes, scores, iou_thres)[:max_det]` on CPU.

    boxes (n, 4) xyxy, scores (n,) (read as float32) -> kept indices (m,) int64 by descending
    score (ties: lower index first, torchvision's stable sort). A box is suppressed by a kept,
    earlier-visited box with IoU > iou_thres (float32 IoU, double threshold).
    Vectorized over chunks of NMS_CHUNK boxes in visiting order: a chunk's boxes suppressed by
    a box kept before it are dropped (suppressed boxes never matter again), the rest resolved
    among themselves, both from the pairs close enough in x to reach the threshold
    (`_resolve_chunk`; class-offset boxes of different classes never are), or densely for
    crowded chunks (`_nms_blocks`). It stops once max_det boxes are kept: greedy NMS decides
    each box from earlier boxes only, so later chunks cannot change them.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    n = len(b)
    if n != len(s):
        raise KapaoError(f"nms: {n} boxes but {len(s)} scores")
    cap = n if max_det is None else min(int(max_det), n)
    if n == 0 or cap <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-s, kind="stable")  # the order torchvision visits (negation is exact)
    x1, y1, x2, y2 = (np.ascontiguousarray(b[order, k]) for k in range(4))
    c = (x1, y1, x2, y2, (x2 - x1) * (y2 - y1))
    thr = _f32_below(iou_thres)
    win = _x_window(x1, x2, iou_thres)
    kept = np.zeros(0, dtype=np.int64)  # visiting positions, ascending
    for start in range(0, n, NMS_CHUNK):
        new = np.arange(start, min(start + NMS_CHUNK, n))
        out = _resolve_chunk(c, win, kept, new, thr) if iou_thres >= 0 else None
        kept = out if out is not None else _nms_blocks(c, kept, new, thr)
        if len(kept) >= cap:
            break
    return order[kept[:cap]]
