"""`Poses`: the result of KAPAO on one image, in original-image pixels.

Produced by `kapao.postprocess.postprocess` for predict, val and the demos alike; converts to the
COCO results format, plain dicts and CSV rows, and draws itself through `kapao.viz`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kapao.errors import KapaoError
from kapao.schema import KeypointSchema


@dataclass
class Poses:
    """Poses of one image (N persons, K keypoints of `schema`), as the official code reports them.

    boxes:      (N, 4) float32 person boxes x1, y1, x2, y2, rounded to whole pixels as the official
    scores:     (N,) float32 person confidences (obj * cls), descending (NMS order)
    keypoints:  (N, K, 3) float64 x, y, conf; conf is the confidence of the keypoint object fused
                into that keypoint, 0 where the keypoint comes from the pose object alone
    schema:     the keypoint schema (names, skeleton, colours)
    image_hw:   (h, w) of the original image
    path:       where the image came from, if it was a file
    kp_objects: optional (M, 6) float32 keypoint objects x1, y1, x2, y2, conf, kp_type (0-based
                keypoint index), rescaled and clipped to the image, in NMS order
    track_ids:  optional (N,) int64 identities from `kapao.track`
    backend:    the name of the runtime that predicted them (e.g. "onnxruntime-cpu-fp32"), if known
    """

    boxes: np.ndarray
    scores: np.ndarray
    keypoints: np.ndarray
    schema: KeypointSchema
    image_hw: tuple[int, int]
    path: str | None = None
    kp_objects: np.ndarray | None = None
    track_ids: np.ndarray | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        k = self.schema.num_keypoints
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.keypoints = np.asarray(self.keypoints, dtype=np.float64)
        if self.keypoints.size == 0:
            self.keypoints = self.keypoints.reshape(0, k, 3)
        n = len(self.boxes)
        where = f"Poses({self.path or 'image'})"
        if self.keypoints.shape[1:] != (k, 3) or len(self.keypoints) != n or len(self.scores) != n:
            raise KapaoError(
                f"{where}: inconsistent shapes boxes {self.boxes.shape}, scores {self.scores.shape}, "
                f"keypoints {self.keypoints.shape}; expected (N, 4), (N,), (N, {k}, 3)"
            )
        if self.kp_objects is not None:
            self.kp_objects = np.asarray(self.kp_objects, dtype=np.float32).reshape(-1, 6)
        if self.track_ids is not None:
            self.track_ids = np.asarray(self.track_ids, dtype=np.int64).reshape(-1)
            if len(self.track_ids) != n:
                raise KapaoError(f"{where}: {len(self.track_ids)} track ids for {n} poses")
        self.image_hw = (int(self.image_hw[0]), int(self.image_hw[1]))

    @classmethod
    def empty(cls, schema: KeypointSchema, image_hw: tuple[int, int], path: str | None = None) -> "Poses":
        k = schema.num_keypoints
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros((0, k, 3)), schema, image_hw, path, np.zeros((0, 6)))

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> "Poses":
        """A subset of the persons (an int keeps a length-1 Poses); kp_objects stay image-level."""
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"pose index {i} out of range for {len(self)} poses")
            i %= len(self)
            index = slice(i, i + 1)
        elif not isinstance(index, slice):
            index = np.asarray(index)
        return Poses(
            self.boxes[index],
            self.scores[index],
            self.keypoints[index],
            self.schema,
            self.image_hw,
            self.path,
            self.kp_objects,
            None if self.track_ids is None else self.track_ids[index],
            self.backend,
        )

    def __repr__(self) -> str:
        src = f", path={self.path!r}" if self.path else ""
        return f"Poses(n={len(self)}, k={self.schema.num_keypoints}, image_hw={self.image_hw}{src})"

    def to_coco(self, image_id: int, category_id: int = 1, include_bbox: bool = False) -> list[dict[str, Any]]:
        """COCO keypoint results (what val.py writes): one dict per person with `keypoints` flattened
        as x1, y1, c1, x2, ... and `score`; `include_bbox` adds `bbox` as [x, y, w, h]."""
        out = []
        for i in range(len(self)):
            det: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(category_id),
                "keypoints": self.keypoints[i].reshape(-1).tolist(),
                "score": float(self.scores[i]),
            }
            if include_bbox:
                x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
                det["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            out.append(det)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: image info, keypoint names, and per person box, score, keypoints."""
        people = []
        for i in range(len(self)):
            person: dict[str, Any] = {
                "box": self.boxes[i].tolist(),
                "score": float(self.scores[i]),
                "keypoints": self.keypoints[i].tolist(),
            }
            if self.track_ids is not None:
                person["track_id"] = int(self.track_ids[i])
            people.append(person)
        return {
            "path": self.path,
            "image_hw": list(self.image_hw),
            "backend": self.backend,
            "keypoint_names": list(self.schema.names),
            "poses": people,
            "kp_objects": None if self.kp_objects is None else self.kp_objects.tolist(),
        }

    def csv_header(self) -> list[str]:
        cols = ["image", "pose", "score", "x1", "y1", "x2", "y2"]
        for name in self.schema.names:
            cols += [f"{name}_x", f"{name}_y", f"{name}_conf"]
        return cols

    def csv_rows(self, image: str | int | None = None) -> list[list[Any]]:
        """One row per person matching `csv_header()`; `image` defaults to the path."""
        label = self.path if image is None else image
        rows = []
        for i in range(len(self)):
            row: list[Any] = [label if label is not None else "", i, float(self.scores[i])]
            row += [float(v) for v in self.boxes[i]]
            row += [float(v) for v in self.keypoints[i].reshape(-1)]
            rows.append(row)
        return rows

    def plot(self, image: np.ndarray | None = None, **draw_options: Any) -> np.ndarray:
        """A drawn copy of `image` (H, W, 3) BGR (default: read from `path`); options as `kapao.viz`."""
        from kapao.viz import draw_poses  # drawing pulls in extra code only when used

        if image is None:
            if self.path is None:
                raise KapaoError("Poses.plot: no image given and these poses have no path; pass the BGR image")
            from kapao.data.letterbox import read_image

            image = read_image(self.path)
        if tuple(image.shape[:2]) != self.image_hw:
            raise KapaoError(
                f"Poses.plot: image is {image.shape[:2]} but the poses are for {self.image_hw}; pass the original image"
            )
        return draw_poses(image, self, **draw_options)


def write_csv(poses_list: Sequence[Poses], path: str | Path) -> Path:
    """Write every person of every image to one CSV file (header once), atomically."""
    from kapao.io.writers import atomic_write_bytes

    if not poses_list:
        raise KapaoError(f"{path}: no poses to write; run prediction on at least one image first")
    names = poses_list[0].schema.names
    if any(p.schema.names != names for p in poses_list):
        raise KapaoError(f"{path}: poses use different keypoint schemas; write one CSV per schema")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(poses_list[0].csv_header())
    for i, poses in enumerate(poses_list):
        writer.writerows(poses.csv_rows(image=poses.path if poses.path is not None else i))
    return atomic_write_bytes(path, buf.getvalue().encode())
