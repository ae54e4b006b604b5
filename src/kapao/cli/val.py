"""`kapao val`: OKS AP of a model on a COCO-format keypoint set (COCO, CrowdPose, or any schema)."""

from __future__ import annotations

import argparse

from kapao.cli.predict import add_backend_args, add_threshold_args, threshold_overrides
from kapao.engine.predictor import normalize_flips
from kapao.errors import KapaoError, require_torch
from kapao.io.writers import next_run_dir, write_json
from kapao.runtime.factory import create_backend


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("val", help="evaluate OKS AP on a COCO-format keypoint set")
    p.add_argument("--data", required=True, help="data YAML (coco-kp, crowdpose, or your own)")
    p.add_argument("--weights", default=None, help="weights file or registry name; default: the shipped model")
    add_backend_args(p)
    p.add_argument("--imgsz", type=int, default=1280)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rect", action="store_true", help="rectangular batches (sorted by aspect ratio) as the official --rect")
    p.add_argument("--pad", type=float, default=0.0, help="rect batch padding (in strides)")
    p.add_argument("--task", default="val", choices=["val", "test"], help="test: write the results JSON only")
    p.add_argument("--split", default="val", help="data YAML split to evaluate")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--evaluator", default=None, choices=["pycocotools", "faster", "xtcocotools"], help="default: by the schema")
    p.add_argument("--count-fused", action="store_true", help="print how many keypoint objects were fused per keypoint type")
    add_threshold_args(p)
    p.add_argument("--project", default="runs/val")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    require_torch("kapao val (its dataset loader)")
    from kapao.data.dataset import KeypointDataset, split_source
    from kapao.engine.evaluator import run_validation

    source = split_source(args.data, args.split)
    tta = bool(args.scales or args.flips)
    backend = create_backend(args.weights, args.backend, args.device, args.precision, args.half, args.threads,
                             args.data, calib=args.calib, tta=tta)
    if tta and not backend.supports_tta:
        raise KapaoError(f"--scales/--flips (test-time augmentation) run on the fp32 torch backend, not {backend.name}")
    if backend.schema.num_keypoints != source.schema.num_keypoints:
        raise KapaoError(
            f"{args.weights}: the model has {backend.schema.num_keypoints} keypoints, {args.data} has "
            f"{source.schema.num_keypoints}; use weights trained for this keypoint set"
        )
    dataset = KeypointDataset(
        source.annotations, source.schema, args.imgsz, images_dir=source.images, augment=False,
        rect=args.rect, batch_size=args.batch_size, stride=int(backend.stride), pad=args.pad,
    )
    if dataset.ann.summary.num_skipped:
        print(dataset.ann.summary)
    result = run_validation(
        backend,
        dataset, "val", batch_size=args.batch_size, scales=args.scales, flips=normalize_flips(args.flips),
        workers=args.workers, task=args.task, progress=not args.quiet, evaluator=args.evaluator,
        **threshold_overrides(args),
    )
    run_dir = next_run_dir(args.project, args.name, args.exist_ok)
    results_path = write_json(run_dir / f"results_{args.task}.json", result.results)
    print(f"{result.num_images} images, {len(result.results)} detections -> {results_path}")
    if result.metrics is not None:
        print(result.metrics.table())
        metrics_path = result.metrics.to_json(run_dir / "metrics.json")
        print(f"metrics -> {metrics_path}")
    if args.count_fused:
        names = source.schema.names
        print("fused keypoint objects: " + ", ".join(f"{n} {c}" for n, c in zip(names, result.fused_per_keypoint.tolist())))
    print(f"{result.speed_line()} (backend {result.backend})")
    return 0
