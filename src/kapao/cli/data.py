"""`kapao data show DATA.yaml`: a grid of (augmented) samples with their labels drawn, to check them.

Like YOLOv5's train_batch.jpg: each tile is one item exactly as the network gets it, with the pose
objects (box + skeleton + keypoints) and the keypoint objects (small boxes, coloured by keypoint
type from the schema) decoded from its label rows.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

from kapao.errors import KapaoError
from kapao.schema import KeypointSchema

POSE_COLOR = (255, 0, 255)  # BGR magenta: pose-object boxes
MAX_GRID = 1920  # longest side of the written grid in pixels


def draw_labels(img_bgr: np.ndarray, labels: np.ndarray, schema: KeypointSchema) -> np.ndarray:
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


def data_show(
    data_yaml: str | Path,
    split: str = "train",
    n: int = 16,
    imgsz: int = 640,
    seed: int = 0,
    out: str | Path | None = None,
    hyp: str | Path = "hyp.kp-p6",
) -> Path:
    """Write a grid of `n` samples of `split` (train: augmented with `hyp`; val: letterboxed) with
    their labels drawn; returns the image path (default `data_show_<split>.jpg`)."""
    from kapao.data.dataset import KeypointDataset
    from kapao.hyp import load_hyp
    from kapao.io.writers import write_image

    if n < 1:
        raise KapaoError(f"--n is {n}; ask for at least 1 sample")
    kwargs = {"hyp": load_hyp(hyp)} if split == "train" else {}
    ds = KeypointDataset.from_data_yaml(data_yaml, split, imgsz=imgsz, seed=seed, **kwargs)
    if len(ds) == 0:
        raise KapaoError(f"{data_yaml}: the {split} split has no usable images; see the annotation summary")
    # a permutation of the items; more samples than items draw them again with the next epoch's
    # augmentation, so no two tiles are identical
    order = np.random.default_rng(seed).permutation(len(ds))
    tiles, names = [], []
    for j in range(n):
        ds.set_epoch(j // len(ds))
        img, lab, path, _ = ds[int(order[j % len(ds)])]
        bgr = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[:, :, ::-1])
        tiles.append(draw_labels(bgr, lab[:, 1:].numpy(), ds.schema))
        names.append(Path(path).name)
    grid = make_grid(tiles, names)
    target = Path(out) if out is not None else Path(f"data_show_{split}.jpg")
    return write_image(target, grid)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at a dataset: `kapao data show DATA.yaml`")
    verbs = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    s = verbs.add_parser("show", help="write a grid of augmented samples with their pose and keypoint objects drawn")
    s.add_argument("data", help="data YAML (a path, or coco-kp / crowdpose)")
    s.add_argument("--split", default="train", choices=["train", "val", "test"], help="split to draw (default train)")
    s.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    s.add_argument("--imgsz", type=int, default=640, help="sample size in pixels, a multiple of 64 (default 640)")
    s.add_argument("--seed", type=int, default=0, help="random seed for the picks and the augmentation")
    s.add_argument("--hyp", default="hyp.kp-p6", help="augmentation hyperparameters (default hyp.kp-p6)")
    s.add_argument("--out", default=None, help="output image (default data_show_<split>.jpg)")


def run(args: argparse.Namespace) -> int:
    path = data_show(args.data, args.split, args.n, args.imgsz, args.seed, args.out, args.hyp)
    print(path)
    return 0
