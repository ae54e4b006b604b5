"""Time the OKS keypoint evaluator on a COCO-val-sized synthetic set (not a test).

Builds a seeded synthetic ground truth of 5,000 images (COCO val2017 has 5,000 images and about
6,300 persons with keypoints) and a results file with noisy copies of every person plus false
positives, writes both as JSON, then times `evaluate_keypoints` with pycocotools and, when it is
installed, faster-coco-eval (and checks that both give the same stats).

    .venv/bin/python benchmarks/bench_evaluator.py [--images 5000] [--dets-per-image 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from kapao.engine.metrics import evaluate_keypoints, faster_available
from kapao.schema import coco_schema


def synthetic_set(images: int, dets_per_image: int, seed: int, k: int = 17) -> tuple[dict, list[dict]]:
    """A COCO keypoint GT of `images` 640x480 images with 0-4 people each (some without labelled
    keypoints), and results: each labelled person with keypoint noise ~ 5% of its size, plus random
    false positives up to `dets_per_image` per image."""
    rng = np.random.default_rng(seed)
    gt_images, anns, dets = [], [], []
    for img_id in range(1, images + 1):
        gt_images.append({"id": img_id, "file_name": f"{img_id:012d}.jpg", "width": 640, "height": 480})
        n_people = int(rng.choice(5, p=[0.3, 0.3, 0.2, 0.1, 0.1]))
        for _ in range(n_people):
            w, h = rng.uniform(20, 300), rng.uniform(40, 460)
            x0, y0 = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            xy = np.c_[rng.uniform(x0, x0 + w, k), rng.uniform(y0, y0 + h, k)]
            v = rng.choice(3, size=k, p=[0.3, 0.2, 0.5]) * (rng.uniform() > 0.2)  # 20%: no keypoints
            xy[v == 0] = 0
            kp = np.c_[xy, v].round(2)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "iscrowd": 0,
                         "area": round(w * h * 0.6, 2), "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                         "num_keypoints": int((v > 0).sum()), "keypoints": kp.ravel().tolist()})
            if v.any():
                noisy = xy + rng.normal(0, 0.05 * np.sqrt(w * h), (k, 2))
                dets.append({"image_id": img_id, "category_id": 1, "score": float(rng.uniform(0.3, 1)),
                             "keypoints": np.c_[noisy, rng.uniform(0, 1, k)].round(2).ravel().tolist()})
        for _ in range(max(dets_per_image - n_people, 0)):
            kp = np.c_[rng.uniform(0, 640, k), rng.uniform(0, 480, k), rng.uniform(0, 1, k)].round(2)
            dets.append({"image_id": img_id, "category_id": 1, "score": float(rng.uniform(0.001, 0.5)),
                         "keypoints": kp.ravel().tolist()})
    gt = {"images": gt_images, "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": list(coco_schema().names)}]}
    return gt, dets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dets-per-image", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gt, dets = synthetic_set(args.images, args.dets_per_image, args.seed)
    labelled = sum(a["num_keypoints"] > 0 for a in gt["annotations"])
    print(f"synthetic set: {args.images} images, {len(gt['annotations'])} persons ({labelled} with keypoints), "
          f"{len(dets)} results (seed {args.seed})")
    schema = coco_schema()
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, res_path = Path(tmp) / "gt.json", Path(tmp) / "results.json"
        gt_path.write_text(json.dumps(gt))
        res_path.write_text(json.dumps(dets))
        evaluators = ["pycocotools"] + (["faster"] if faster_available() else [])
        rows = []
        for name in evaluators:
            t0 = time.perf_counter()
            m = evaluate_keypoints(gt_path, res_path, schema, evaluator=name)
            total = time.perf_counter() - t0
            rows.append((m, total))
    print(f"{'evaluator':<18} {'eval s':>8} {'total s':>8} {'AP':>7} {'AP50':>7} {'AR':>7}")
    for m, total in rows:
        print(f"{m.evaluator:<18} {m.seconds:8.2f} {total:8.2f} {m.ap:7.4f} {m.ap50:7.4f} {m.ar:7.4f}")
    print("eval s: evaluate + accumulate + summarize; total s: also reading and checking the JSON files")
    if len(rows) == 2:
        a, b = rows[0][0], rows[1][0]
        diff = max(abs(a[k] - b[k]) for k in a.stats)
        print(f"faster-coco-eval vs pycocotools: largest stat difference {diff:.1e}; "
              f"speed-up {a.seconds / b.seconds:.1f}x")
    else:
        print("faster-coco-eval is not installed (pip install faster-coco-eval): only pycocotools timed")


if __name__ == "__main__":
    main()
