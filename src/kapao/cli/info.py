"""`kapao info`: the model family, shipped keypoint schemas and registered weights."""

from __future__ import annotations

import argparse

from kapao.config import MODEL_NAMES
from kapao.errors import require_torch
from kapao.schema import KeypointSchema


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show models, keypoint schemas and parameter counts")
    p.add_argument("--data", default="coco-kp", help="data YAML whose keypoint schema sizes the head")


def run(args: argparse.Namespace) -> int:
    require_torch("kapao info (it builds each model to count its parameters)")
    from kapao.models.kapao import KapaoModel

    schema = KeypointSchema.from_yaml(args.data)
    print(f"keypoint schema {args.data}: K={schema.num_keypoints}, classes={schema.num_classes}")
    print(f"{'model':<10}{'params':>14}{'strides':>20}")
    for name in MODEL_NAMES:
        model = KapaoModel(name, schema)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<10}{n:>14,}{str([int(s) for s in model.stride.tolist()]):>20}")
    return 0
