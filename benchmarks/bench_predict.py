"""Per-stage time of `kapao predict` on CPU (not a test): read, pre, forward, NMS, fusion, draw.

    python benchmarks/bench_predict.py [--quick] [--imgsz 640 1024 1280] [--images N] [--threads T]
                                       [--weights W] [--preset demo|val] [--device cpu]

Each image goes through the predict path one at a time (batch 1, as the demos): `read_image`
(JPEG decode), `prepare_input` (letterbox, auto padding) + `to_input_batch`, the torch backend
(KAPAO-S, BN fused), `run_nms`, `postprocess_dets` (rescale + keypoint-object fusion into Poses)
and `Poses.plot`.
Default weights: the official-format e2e checkpoint (shared/golden/e2e/kapao_s_coco_seed0.pt,
random-rule weights, so the detection counts are high: NMS/fusion work is near its worst case);
default images: all of shared/data/coco_mini/images. One untimed warm-up image per size.
Prints mean ms/image per stage, the total and images/s, per size. --quick: 4 images.
shared/ is found beside the checkout or at $KAPAO_SHARED.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from kapao.data.letterbox import prepare_input, read_image, to_input_batch
from kapao.postprocess import postprocess_dets, run_nms
from kapao.presets import get_preset
from kapao.runtime.factory import create_backend

SHARED = Path(os.environ.get("KAPAO_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STAGES = ("read", "pre", "forward", "nms", "fusion", "draw")


def time_one(path: Path, backend, imgsz: int, preset) -> tuple[dict[str, float], int]:
    """ms per stage for one image, and the number of poses found."""
    t = [time.perf_counter()]
    img = read_image(path)
    t.append(time.perf_counter())
    chw, _, _ = prepare_input(img, imgsz, backend.stride, backend.fixed_hw)
    x = to_input_batch([chw])
    t.append(time.perf_counter())
    pred = backend(x)
    t.append(time.perf_counter())
    person_dets, kp_dets = run_nms(pred, preset, backend.schema.num_keypoints)
    t.append(time.perf_counter())
    poses = postprocess_dets(person_dets, kp_dets, preset, tuple(chw.shape[1:]), [img.shape[:2]], backend.schema)[0]
    t.append(time.perf_counter())
    poses.plot(img)
    t.append(time.perf_counter())
    return {s: (b - a) * 1000.0 for s, a, b in zip(STAGES, t, t[1:])}, len(poses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(SHARED / "golden" / "e2e" / "kapao_s_coco_seed0.pt"))
    ap.add_argument("--images", default=str(SHARED / "data" / "coco_mini" / "images"), help="folder of images")
    ap.add_argument("--n", type=int, default=None, help="number of images (default: all; --quick: 4)")
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640, 1024, 1280])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="4 images per size: a smoke run")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    n = args.n or (4 if args.quick else len(paths))
    paths = paths[: n + 1]  # +1: the warm-up image
    if len(paths) < 2:
        raise SystemExit(f"{args.images}: need at least 2 images (1 warm-up + 1 timed)")
    preset = get_preset(args.preset)
    backend = create_backend(args.weights, backend="torch", device=args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, device {args.device}")
    print(f"weights {args.weights}")
    print(f"{len(paths) - 1} timed images from {args.images} (+1 warm-up), preset {preset.name}, batch 1")
    header = (f"{'imgsz':>6} " + " ".join(f"{s:>8}" for s in STAGES)
              + f" {'total':>8} {'img/s':>7} {'fwd p50':>8} {'poses':>6}")
    print("\nmean ms per image")
    print(header)
    print("-" * len(header))
    for imgsz in args.imgsz:
        time_one(paths[0], backend, imgsz, preset)  # warm-up: allocator, kernels
        rows, poses = [], 0
        for p in paths[1:]:
            ms, k = time_one(p, backend, imgsz, preset)
            rows.append(ms)
            poses += k
        mean = {s: statistics.fmean(r[s] for r in rows) for s in STAGES}
        total = sum(mean.values())
        p50 = statistics.median(r["forward"] for r in rows)
        print(f"{imgsz:>6} " + " ".join(f"{mean[s]:>8.1f}" for s in STAGES)
              + f" {total:>8.1f} {1000.0 / total:>7.2f} {p50:>8.1f} {poses / len(rows):>6.1f}")
    print("\nstages: read = JPEG decode; pre = letterbox + to float array; forward = network + decode;"
          " nms = run_nms; fusion = rescale + keypoint-object fusion (postprocess_dets); draw = Poses.plot")


if __name__ == "__main__":
    main()
