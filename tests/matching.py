"""The e2e goldens' matching recipe (shared/golden/e2e/README.md section 5): rows are compared
position by position first, then the rest one-to-one, greedily, by the smallest deviation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MatchResult:
    n_ours: int
    n_ref: int
    same_position: int
    matched: int
    max_deviation: float

    @property
    def unmatched(self) -> int:
        return max(self.n_ours, self.n_ref) - self.matched


def _match(ok: np.ndarray, dev: np.ndarray) -> tuple[int, int, float]:
    """ok (n, m) bool of admissible pairs, dev (n, m) deviation -> (same position, matched, max dev)."""
    n, m = ok.shape
    diag = min(n, m)
    same = np.array([ok[i, i] for i in range(diag)], dtype=bool)
    used_o, used_r = set(np.flatnonzero(same)), set(np.flatnonzero(same))
    worst = max([float(dev[i, i]) for i in np.flatnonzero(same)] + [0.0])
    matched = int(same.sum())
    rest_o = [i for i in range(n) if i not in used_o]
    rest_r = [j for j in range(m) if j not in used_r]
    if rest_o and rest_r:
        sub_ok = ok[np.ix_(rest_o, rest_r)]
        sub_dev = np.where(sub_ok, dev[np.ix_(rest_o, rest_r)], np.inf)
        for flat in np.argsort(sub_dev, axis=None):
            a, b = np.unravel_index(flat, sub_dev.shape)
            if not np.isfinite(sub_dev[a, b]):
                break
            if rest_o[a] in used_o or rest_r[b] in used_r:
                continue
            used_o.add(rest_o[a])
            used_r.add(rest_r[b])
            matched += 1
            worst = max(worst, float(sub_dev[a, b]))
    return int(same.sum()), matched, worst


def match_poses(
    ours_kps: np.ndarray, ours_scores: np.ndarray, ref_kps: np.ndarray, ref_scores: np.ndarray,
    kp_tol: float = 0.1, conf_tol: float = 1e-4, score_tol: float = 1e-4,
) -> MatchResult:
    """Poses (n, K, 3) + scores: |d score| <= 1e-4, max |dx|, |dy| <= 0.1 px, max |d conf| <= 1e-4."""
    ours_kps, ref_kps = np.asarray(ours_kps, float), np.asarray(ref_kps, float)
    if len(ours_kps) == 0 or len(ref_kps) == 0:
        return MatchResult(len(ours_kps), len(ref_kps), 0, 0, 0.0)
    d_xy = np.abs(ours_kps[:, None, :, :2] - ref_kps[None, :, :, :2]).max(axis=(2, 3))
    d_c = np.abs(ours_kps[:, None, :, 2] - ref_kps[None, :, :, 2]).max(axis=2)
    d_s = np.abs(np.asarray(ours_scores, float)[:, None] - np.asarray(ref_scores, float)[None])
    ok = (d_xy <= kp_tol) & (d_c <= conf_tol) & (d_s <= score_tol)
    same, matched, worst = _match(ok, d_xy)
    return MatchResult(len(ours_kps), len(ref_kps), same, matched, worst)


def match_nms_rows(ours: np.ndarray, ref: np.ndarray, px_tol: float = 0.05, conf_tol: float = 1e-4) -> MatchResult:
    """NMS rows [x1, y1, x2, y2, conf, cls, coords...]: same class, coordinates within 0.05 px, conf within 1e-4."""
    ours, ref = np.asarray(ours, float), np.asarray(ref, float)
    if len(ours) == 0 or len(ref) == 0:
        return MatchResult(len(ours), len(ref), 0, 0, 0.0)
    coords = np.r_[0:4, 6 : ref.shape[1]]
    d_xy = np.abs(ours[:, None, coords] - ref[None, :, coords]).max(axis=2)
    ok = (d_xy <= px_tol) & (np.abs(ours[:, None, 4] - ref[None, :, 4]) <= conf_tol) & (ours[:, None, 5] == ref[None, :, 5])
    same, matched, worst = _match(ok, d_xy)
    return MatchResult(len(ours), len(ref), same, matched, worst)
