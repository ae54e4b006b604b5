"""Speed of `kapao val` (`run_validation`) on the mini sets (not a test): images/s and ms/image per stage.

    python benchmarks/bench_val.py [--quick] [--imgsz 640 1280] [--sets coco crowdpose]
                                   [--batch-size 8] [--rect] [--threads T]

COCO: shared/data/coco_mini (30 val2017 images) with the official-format e2e checkpoint
(shared/golden/e2e/kapao_s_coco_seed0.pt). CrowdPose: shared/data/crowdpose_mini (3 images) with
KAPAO-S built for the CrowdPose schema and the goldens' deterministic weight rule (seed 0,
shared/golden/README.md section 2; no trained CrowdPose checkpoint is needed for timing).
Both use the `val` preset (conf 0.001: near-worst-case detection counts with random weights) and
BN-fused torch backends. One untimed warm-up forward per (set, size). Prints, per run: images,
wall seconds, images/s, mean ms/image of read (dataloader), pre, forward, nms, fusion, the
evaluator's own seconds (pycocotools / xtcocotools) and AP (meaningless with random weights; shown
as a sanity check that the evaluation ran). --quick: 640 only.
shared/ is found beside the checkout or at $KAPAO_SHARED.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch

from kapao.data.dataset import KeypointDataset
from kapao.engine.evaluator import run_validation
from kapao.models.kapao import KapaoModel
from kapao.runtime.base import Backend
from kapao.runtime.factory import create_backend
from kapao.runtime.torch_backend import TorchBackend
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema

SHARED = Path(os.environ.get("KAPAO_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STAGES = ("read", "pre", "forward", "nms", "fusion")
def seeded_weights(model: KapaoModel, seed: int = 0) -> KapaoModel:
    """Fill `model` with the goldens' deterministic weight rule (shared/golden/README.md section 2),
    using the one implementation the tests keep in tests/weight_rule.py (loaded by file path)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "weight_rule.py"
    spec = importlib.util.spec_from_file_location("kapao_weight_rule", path)
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    rule.apply_weight_rule(model, seed)
    return model


def backend_for(set_name: str, device: str) -> Backend:
    if set_name == "coco":
        return create_backend(SHARED / "golden" / "e2e" / "kapao_s_coco_seed0.pt", backend="torch", device=device)
    return TorchBackend(seeded_weights(KapaoModel("kapao-s", crowdpose_schema())), device=device)


def dataset_for(set_name: str, schema: KeypointSchema, imgsz: int, batch_size: int, rect: bool) -> KeypointDataset:
    root = SHARED / "data" / ("coco_mini" if set_name == "coco" else "crowdpose_mini")
    return KeypointDataset(root / "person_keypoints.json", schema, imgsz, images_dir=root / "images",
                           rect=rect, batch_size=batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["coco", "crowdpose"], choices=["coco", "crowdpose"])
    ap.add_argument("--imgsz", type=int, nargs="+", default=None, help="default 640 1280 (--quick: 640)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rect", action="store_true", help="rectangular batches (official --rect)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="640 only: a smoke run")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.imgsz or ([640] if args.quick else [640, 1280])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"device {args.device}, batch {args.batch_size}, {'rect' if args.rect else 'square'} batches, preset val")
    header = (f"{'set':<15}{'imgsz':>6}{'images':>7}{'wall s':>8}{'img/s':>7} "
              + " ".join(f"{s:>8}" for s in STAGES) + f"{'eval s':>8}{'dets':>7}{'AP':>7}")
    print("\nms per image (mean)")
    print(header)
    print("-" * len(header))
    for set_name in args.sets:
        backend = backend_for(set_name, args.device)
        schema = coco_schema() if set_name == "coco" else crowdpose_schema()
        for imgsz in sizes:
            dataset = dataset_for(set_name, schema, imgsz, args.batch_size, args.rect)
            backend(np.zeros((min(args.batch_size, len(dataset)), 3, imgsz, imgsz), np.float32))  # warm-up: allocator, kernels
            t0 = time.perf_counter()
            result = run_validation(backend, dataset, "val", batch_size=args.batch_size, progress=False)
            wall = time.perf_counter() - t0
            per = result.times.per_image()
            metrics = result.metrics
            print(f"{set_name + '_mini':<15}{imgsz:>6}{result.num_images:>7}{wall:>8.2f}"
                  + f"{result.num_images / wall:>7.2f} "
                  + " ".join(f"{per.get(s, 0.0):>8.1f}" for s in STAGES)
                  + f"{metrics.seconds if metrics else float('nan'):>8.2f}{len(result.results):>7}"
                  + f"{metrics.ap if metrics else float('nan'):>7.3f}")
    print("\nread = dataloader (decode + letterbox); pre = to float; forward = network + decode (BN fused);"
          " nms = run_nms; fusion = rescale + keypoint-object fusion; eval s = evaluator time for the whole set")


if __name__ == "__main__":
    main()
