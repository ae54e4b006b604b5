"""Pose tracking across video frames: stable integer IDs from box-IoU + keypoint-similarity matching."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Track:
    track_id: int
    box: np.ndarray  # (4,) xyxy
    keypoints: np.ndarray  # (K, 2)
    missed: int = 0


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(Na, 4) x (Nb, 4) xyxy -> (Na, Nb) IoU, with torchvision's `box_iou` arithmetic (in the
    inputs' dtype): inter = clamp(min(x2, y2) - max(x1, y1), 0) product, union = area_a + area_b - inter."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    lt = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    rb = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = np.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a[:, None] + area_b[None, :] - inter)


def keypoint_similarity(kps_a: np.ndarray, kps_b: np.ndarray, boxes_b: np.ndarray, sigma: float = 0.1) -> np.ndarray:
    """(Na, K, 2) x (Nb, K, 2) -> (Na, Nb) in [0, 1]: mean Gaussian similarity of the keypoints,
    with distances normalised by the size of the b boxes (an OKS-like score without per-joint sigmas)."""
    if len(kps_a) == 0 or len(kps_b) == 0:
        return np.zeros((len(kps_a), len(kps_b)))
    scale = np.sqrt(np.maximum((boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1]), 1.0))
    d2 = ((kps_a[:, None] - kps_b[None]) ** 2).sum(-1)  # (Na, Nb, K)
    return np.exp(-d2 / (2 * (sigma * scale[None, :, None]) ** 2)).mean(-1)


@dataclass
class PoseTracker:
    """Greedy frame-to-frame association. A detection joins the track with the highest
    0.5 * IoU + 0.5 * keypoint similarity above `min_score`; unmatched detections start new tracks;
    tracks unseen for more than `max_missed` frames are dropped."""

    min_score: float = 0.3
    max_missed: int = 15
    _tracks: list[_Track] = field(default_factory=list)
    _next_id: int = 1

    def update(self, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """boxes (N, 4) xyxy, keypoints (N, K, 2 or 3) of one frame -> track ids (N,) int64."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        kps = np.asarray(keypoints, dtype=np.float64)[..., :2]
        ids = np.zeros(len(boxes), dtype=np.int64)
        if self._tracks and len(boxes):
            t_boxes = np.stack([t.box for t in self._tracks])
            t_kps = np.stack([t.keypoints for t in self._tracks])
            iou = box_iou(boxes, t_boxes)
            score = 0.5 * iou + 0.5 * keypoint_similarity(kps, t_kps, t_boxes)
            order = np.dstack(np.unravel_index(np.argsort(-score, axis=None), score.shape))[0]
            used_det, used_trk = set(), set()
            for d, t in order:
                if score[d, t] < self.min_score:
                    break
                if d in used_det or t in used_trk:
                    continue
                used_det.add(d)
                used_trk.add(t)
                track = self._tracks[t]
                track.box, track.keypoints, track.missed = boxes[d], kps[d], 0
                ids[d] = track.track_id
        matched = {tid for tid in ids if tid}
        for track in self._tracks:
            if track.track_id not in matched:
                track.missed += 1
        self._tracks = [t for t in self._tracks if t.missed <= self.max_missed]
        for d in np.flatnonzero(ids == 0):
            ids[d] = self._next_id
            self._tracks.append(_Track(self._next_id, boxes[d], kps[d]))
            self._next_id += 1
        return ids
