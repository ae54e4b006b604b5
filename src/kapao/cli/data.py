"""`kapao data show DATA.yaml`: a grid of (augmented) samples with their labels drawn, to check them.

Like YOLOv5's train_batch.jpg: each tile is one item exactly as the network gets it, with the pose
objects (box + skeleton + keypoints) and the keypoint objects (small boxes, coloured by keypoint
type from the schema) decoded from its label rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kapao.errors import KapaoError, require_torch
from kapao.viz import draw_labels, make_grid


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
    require_torch("kapao data show (the training data pipeline)")
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
