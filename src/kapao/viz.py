"""Drawing of poses, boxes and keypoint objects on BGR images, with the official demos' options."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from kapao.errors import KapaoError

if TYPE_CHECKING:
    from kapao.results import Poses
    from kapao.schema import KeypointSchema


@dataclass
class DrawOptions:
    """What to draw. Defaults follow the official image demo (`--pose` on, colours magenta/cyan).

    bbox:      person boxes with their score
    pose:      the skeleton (limbs) of every pose
    face:      face keypoints (schema `face`) as dots
    kp_bbox:   the boxes of the keypoint objects that were fused into a pose
    kp_obj:    draw keypoint objects only (all raw keypoint detections), no poses
    color_pose / color_kp: BGR colours of limbs / fused keypoints; None = the schema's colours
    """

    bbox: bool = False
    pose: bool = True
    face: bool = False
    kp_bbox: bool = False
    kp_obj: bool = False
    color_pose: tuple[int, int, int] | None = (255, 0, 255)
    color_kp: tuple[int, int, int] | None = (0, 255, 255)
    line_thick: int = 2
    kp_size: int = 1
    kp_thick: int = 2
    alpha: float = 1.0
    fps: float | None = None
    track_ids: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "DrawOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise KapaoError(f"unknown drawing option(s) {sorted(unknown)}; known: {sorted(known)}")
        opts = cls(**kwargs)
        if not 0.0 < opts.alpha <= 1.0:
            raise KapaoError(f"drawing alpha is {opts.alpha}; use a value in (0, 1]")
        return opts


def _pt(xy: np.ndarray) -> tuple[int, int]:
    return int(round(float(xy[0]))), int(round(float(xy[1])))


def draw_poses(image: np.ndarray, poses: "Poses", options: DrawOptions | None = None, **kwargs: Any) -> np.ndarray:
    """Return a copy of `image` (H, W, 3) BGR uint8 with `poses` drawn on it."""
    opts = options or DrawOptions.from_kwargs(**kwargs)
    canvas = image.copy()
    schema = poses.schema
    lw = max(int(opts.line_thick), 1)
    track_ids = getattr(poses, "track_ids", None)

    if opts.kp_obj:
        kp_objects = poses.kp_objects if poses.kp_objects is not None else np.zeros((0, 6))
        for x1, y1, x2, y2, conf, kp_type in kp_objects:
            color = opts.color_kp or schema.colors[int(kp_type)]
            cv2.rectangle(canvas, _pt((x1, y1)), _pt((x2, y2)), color, lw)
    else:
        for i in range(len(poses)):
            kps = poses.keypoints[i]
            if opts.pose:
                for a, b in schema.skeleton:
                    color = opts.color_pose or schema.colors[a]
                    cv2.line(canvas, _pt(kps[a]), _pt(kps[b]), color, lw, cv2.LINE_AA)
                for k in np.flatnonzero(kps[:, 2] > 0):  # fused keypoint objects
                    if k in schema.face and not opts.face:
                        continue
                    color = opts.color_kp or schema.colors[k]
                    cv2.circle(canvas, _pt(kps[k]), opts.kp_size + lw, color, opts.kp_thick, cv2.LINE_AA)
            if opts.face:
                for k in schema.face:
                    color = opts.color_kp or schema.colors[k]
                    cv2.circle(canvas, _pt(kps[k]), opts.kp_size, color, opts.kp_thick, cv2.LINE_AA)
            if opts.kp_bbox:
                half = schema.kp_bbox * max(image.shape[:2]) / 2  # keypoint-object box, as trained
                for k in np.flatnonzero(kps[:, 2] > 0):
                    x, y = kps[k, :2]
                    color = opts.color_kp or schema.colors[k]
                    cv2.rectangle(canvas, _pt((x - half, y - half)), _pt((x + half, y + half)), color, 1)
            if opts.bbox:
                x1, y1, x2, y2 = poses.boxes[i]
                color = opts.color_pose or (0, 255, 0)
                cv2.rectangle(canvas, _pt((x1, y1)), _pt((x2, y2)), color, lw)
                label = f"{poses.scores[i]:.2f}"
                if opts.track_ids and track_ids is not None:
                    label = f"id {int(track_ids[i])} {label}"
                _label(canvas, label, _pt((x1, y1)), color)
            elif opts.track_ids and track_ids is not None:
                _label(canvas, f"id {int(track_ids[i])}", _pt(poses.boxes[i, :2]), opts.color_pose or (0, 255, 0))

    if opts.alpha < 1.0:
        canvas = cv2.addWeighted(canvas, opts.alpha, image, 1.0 - opts.alpha, 0)
    if opts.fps is not None:
        draw_fps(canvas, opts.fps)
    return canvas


def _label(canvas: np.ndarray, text: str, origin: tuple[int, int], color: tuple[int, int, int]) -> None:
    scale = max(canvas.shape[0], canvas.shape[1]) / 1600
    thickness = max(int(2 * scale), 1)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, max(scale, 0.4), thickness)
    x, y = origin
    y = max(y, h + base)
    cv2.rectangle(canvas, (x, y - h - base), (x + w, y), color, -1)
    cv2.putText(canvas, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, max(scale, 0.4), (255, 255, 255), thickness, cv2.LINE_AA)


def draw_fps(canvas: np.ndarray, fps: float) -> np.ndarray:
    """Write an FPS counter in the top-left corner (in place), as the official video demo does."""
    scale = max(canvas.shape[0], canvas.shape[1]) / 1000
    thickness = max(int(2 * scale), 1)
    text = f"FPS: {fps:.1f}"
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.rectangle(canvas, (0, 0), (w + 20, h + base + 20), (0, 0, 0), -1)
    cv2.putText(canvas, text, (10, h + 10), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return canvas


# --- training labels (pose objects + keypoint objects), for `kapao data show` and train mosaics ---

POSE_COLOR = (255, 0, 255)  # BGR magenta: pose-object boxes
MAX_GRID = 1920  # longest side of the written grid in pixels


def draw_labels(img_bgr: np.ndarray, labels: np.ndarray, schema: "KeypointSchema") -> np.ndarray:
    """A copy of `img_bgr` (H, W, 3) with label rows (n, 5 + 3K) normalised to it drawn on:
    pose objects as a magenta box, limbs and keypoint dots (schema colours; open circle = v 1),
    keypoint objects as thin boxes in their keypoint's colour."""
    out = np.ascontiguousarray(img_bgr).copy()
    h, w = out.shape[:2]
    k = schema.num_keypoints
    lw = max(1, round(max(h, w) / 400))
    for row in np.asarray(labels, np.float64):
        cls = int(row[0])
        xc, yc, bw, bh = row[1] * w, row[2] * h, row[3] * w, row[4] * h
        p1 = (int(round(xc - bw / 2)), int(round(yc - bh / 2)))
        p2 = (int(round(xc + bw / 2)), int(round(yc + bh / 2)))
        if cls > 0:
            cv2.rectangle(out, p1, p2, schema.colors[(cls - 1) % k], 1)
            continue
        cv2.rectangle(out, p1, p2, POSE_COLOR, lw)
        kp = row[5:].reshape(k, 3) * (w, h, 1)
        vis = kp[:, 2] > 0
        pts = [(int(round(x)), int(round(y))) for x, y in kp[:, :2]]
        for a, b in schema.skeleton:
            if vis[a] and vis[b]:
                cv2.line(out, pts[a], pts[b], schema.colors[a], lw, cv2.LINE_AA)
        for j in np.flatnonzero(vis):
            filled = -1 if kp[j, 2] >= 2 else 1
            cv2.circle(out, pts[j], lw + 2, schema.colors[j], filled, cv2.LINE_AA)
    return out


def make_grid(tiles: list[np.ndarray], names: list[str], max_size: int = MAX_GRID) -> np.ndarray:
    """Tiles (same size) in a near-square grid, scaled so the longest side is <= max_size, with
    each tile's name in its corner and a white border between tiles."""
    if not tiles:
        raise KapaoError("no samples to draw; the split has no images")
    n = len(tiles)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    th, tw = tiles[0].shape[:2]
    f = min(1.0, max_size / max(rows * th, cols * tw))
    sh, sw = max(1, int(th * f)), max(1, int(tw * f))
    grid = np.full((rows * sh, cols * sw, 3), 255, np.uint8)
    for i, (tile, name) in enumerate(zip(tiles, names)):
        r, c = divmod(i, cols)
        small = cv2.resize(tile, (sw, sh), interpolation=cv2.INTER_AREA) if (sh, sw) != (th, tw) else tile
        grid[r * sh : (r + 1) * sh, c * sw : (c + 1) * sw] = small
        cv2.putText(grid, name[:40], (c * sw + 5, r * sh + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        cv2.rectangle(grid, (c * sw, r * sh), ((c + 1) * sw - 1, (r + 1) * sh - 1), (255, 255, 255), 2)
    return grid
