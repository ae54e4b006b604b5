"""`kapao demo`: the shipped model on the shipped scenes, end to end, saying what it did.

This is what `make demo` runs: predict (drawn images + COCO JSON) with the demo preset, then score
the same scenes with the val preset against their annotations (they were held out from training).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kapao.engine.metrics import evaluate_keypoints
from kapao.engine.predict_job import PredictJob, run_predict_job
from kapao.engine.predictor import KAPAO
from kapao.errors import KapaoError
from kapao.viz import DrawOptions
from kapao.weights.shipped import default_weights, demo_images, shipped_onnx


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the shipped model on the shipped scenes and report what it found")
    p.add_argument("--weights", default=None, help="weights to demo (default: the shipped kapao_n_synth)")
    p.add_argument("--imgsz", type=int, default=256, help="inference size (the shipped model was trained at 256)")
    p.add_argument("--project", default="runs/demo")
    p.add_argument("--name", default="exp")


def describe(weights: str | None) -> tuple[str, str, int, dict[str, Any]]:
    """(file name, model config, keypoints, training info) of the weights to demo, from an exported
    file's metadata (the shipped model: its ONNX, which needs no torch) or from torch weights."""
    if weights is None:
        weights = str(shipped_onnx() or default_weights())
    if weights is not None and Path(weights).suffix in (".onnx", ".xml"):
        from kapao.runtime.metadata import read_metadata, schema_from_metadata

        meta = read_metadata(weights)
        k = schema_from_metadata(meta, weights).num_keypoints
        return Path(weights).name, str(meta.get("model")), k, meta.get("weights_info") or {}
    from kapao.weights import load  # torch weights: the one-line kapao[torch] error without torch

    _, m = load(weights)
    return Path(weights).name, m.config.name, m.schema.num_keypoints, m.info or {}


def run(args: argparse.Namespace) -> int:
    images = demo_images()
    if not images:
        raise KapaoError("the demo scenes are not installed with this package (kapao/assets/demo); reinstall kapao")
    name, cfg, k, info = describe(args.weights)
    print(f"model: {name} ({cfg}, {k} keypoints)")
    if "recipe" in info:
        r = info["recipe"]
        print(f"  trained from scratch on synthetic scenes: {r.get('epochs')} epochs at {r.get('imgsz')} px, "
              f"best val OKS AP {info.get('best_ap', float('nan')):.3f}")
    print(f"scenes: {len(images)} synthetic images held out from training ({images[0].parent})")
    model = KAPAO(args.weights)  # None: the shipped model (its ONNX on the CPU, no torch needed)
    job = PredictJob(source=[str(p) for p in images], imgsz=args.imgsz, preset="demo",
                     draw=DrawOptions(bbox=True), project=args.project, name=args.name, save_json=True, progress=False)
    summary = run_predict_job(model, job)
    print(f"predict (demo preset): {summary.persons} person(s) in {summary.images} image(s), {summary.seconds:.1f} s")
    for path in summary.outputs:
        print(f"  saved {path}")
    gt = images[0].parent / "person_keypoints.json"
    if gt.is_file():
        gt_data = json.loads(gt.read_text())
        ids = {im["file_name"]: im["id"] for im in gt_data["images"]}
        results = []
        for poses in model([str(p) for p in images], imgsz=args.imgsz, preset="val"):
            results.extend(poses.to_coco(ids[Path(poses.path).name]))
        metrics = evaluate_keypoints(gt_data, results, model.schema)
        print(f"OKS AP on these scenes (val preset): AP {metrics.ap:.3f}, AP50 {metrics.ap50:.3f}, AR {metrics.ar:.3f}")
    print(f"open the drawn images in {summary.run_dir}")
    return 1 if summary.errors else 0
