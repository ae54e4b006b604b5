"""`kapao convert SOURCE OUT`: an official checkpoint (or registry name) -> kapao's own weights file."""

from __future__ import annotations

import argparse
from pathlib import Path

from kapao.errors import require_torch
from kapao.schema import KeypointSchema


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official KAPAO .pt (read safely) to a kapao safetensors file",
        description="Read an official KAPAO checkpoint without running its pickle and write weights, model "
        "config and keypoint schema to one safetensors file that kapao.weights.load rebuilds the model from.",
    )
    p.add_argument("source", help="official kapao_*.pt, a kapao weights file, or a registry name (kapao_s_coco)")
    p.add_argument("out", type=Path, help="output file, e.g. kapao_s_coco.safetensors")
    p.add_argument("--data", help="data YAML with the keypoint schema (needed if not COCO-17 or CrowdPose-14)")
    p.add_argument(
        "--fp32", action="store_true", help="store float32 weights (default: float16, as the official files)"
    )
    p.add_argument("--sha256", help="expected sha256 of SOURCE; refuse the file if it differs")


def run(args: argparse.Namespace) -> int:
    require_torch("kapao convert")
    from kapao.weights.checkpoint import save
    from kapao.weights.loader import load

    schema = KeypointSchema.from_yaml(args.data) if args.data else None
    model, meta = load(args.source, schema=schema, sha256=args.sha256)
    n = len(model.state_dict())
    print(f"read   {meta.source} ({meta.format} checkpoint, {meta.stored_dtype}, {n} tensors)")
    k = meta.schema.num_keypoints
    strides = "/".join(str(int(s)) for s in model.stride.tolist())
    print(f"model  {meta.config.name}, K={k} keypoints ({Path(meta.schema.source).stem} schema), strides {strides}")
    info = {"converted_from": str(meta.source), "source_format": meta.format, **meta.info}
    if meta.registry is not None:
        r = meta.registry
        info["registry"] = {
            "name": r.name,
            "dataset": r.dataset,
            "input_size": r.input_size,
            "reported_ap": r.reported_ap,
        }
    out = save(model, args.out, info=info, half=not args.fp32)
    size_mb = out.stat().st_size / 1e6
    print(f"wrote  {out} ({'float32' if args.fp32 else 'float16'}, {size_mb:.1f} MB, {n} tensors + config + schema)")
    return 0
