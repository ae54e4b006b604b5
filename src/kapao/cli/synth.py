"""`kapao synth OUT`: write a synthetic COCO-format keypoint dataset and its data YAML."""

from __future__ import annotations

import argparse
import time

from kapao.errors import KapaoError
from kapao.schema import KeypointSchema


def _range(text: str, what: str, cast: type = int) -> tuple:
    """'A-B' (or a single 'A') -> (A, B)."""
    parts = text.split("-") if "-" in text.strip("-") else [text, text]
    try:
        lo, hi = (cast(p) for p in parts)
    except (TypeError, ValueError):
        raise KapaoError(f"{what} {text!r} is not a range; write MIN-MAX, e.g. 1-6") from None
    return lo, hi


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic multi-person keypoint dataset (COCO JSON + data YAML)")
    p.add_argument("out", help="output folder (images/, annotations/, data.yaml)")
    p.add_argument("--images", type=int, default=1000, help="training images (default 1000)")
    p.add_argument("--val-images", type=int, default=None, help="val images (default: a tenth of --images, >= 1)")
    p.add_argument("--imgsz", type=int, default=640, help="long image side in pixels (default 640)")
    p.add_argument("--people", default="1-6", help="persons per image, MIN-MAX (default 1-6)")
    p.add_argument("--aspect", default="1-1", help="width/height range, LO-HI (default 1-1: square)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    p.add_argument("--data", default="coco-kp", help="data YAML whose keypoint schema to label (default coco-kp)")
    p.add_argument(
        "--min-person", type=float, default=30.0, help="long side of the smallest person in pixels (default 30)"
    )
    p.add_argument(
        "--clutter", type=float, default=1.0, help="background clutter and occluders, 0 (none) to 3 (default 1)"
    )
    p.add_argument(
        "--side-cue", type=float, default=0.0,
        help="lighten every person's left limbs by this fraction (0-1): an easy left/right cue; train with fliplr 0",
    )
    p.add_argument("--workers", type=int, default=1, help="processes to render with (output does not depend on it)")


def run(args: argparse.Namespace) -> int:
    from kapao.data.synthetic import synthesize

    schema = KeypointSchema.from_yaml(args.data)
    people = _range(args.people, "--people")
    aspect = _range(args.aspect, "--aspect", float)
    t0 = time.perf_counter()
    data_yaml = synthesize(
        args.out,
        args.images,
        val_images=args.val_images,
        imgsz=args.imgsz,
        people=people,
        seed=args.seed,
        schema=schema,
        aspect=aspect,
        min_person=args.min_person,
        clutter=args.clutter,
        side_cue=args.side_cue,
        workers=max(1, args.workers),
    )
    dt = time.perf_counter() - t0
    print(f"wrote {args.out}: K={schema.num_keypoints} keypoints, data YAML {data_yaml} ({dt:.1f} s)")
    return 0
