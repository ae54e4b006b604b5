"""NumPy post-processing (`kapao.postprocess`) vs the torch/torchvision path it replaced.

    python benchmarks/bench_postprocess.py [--repeat 30] [--threads 2] [--quick]

Both paths run on the same raw rows (B=1, KAPAO's decoded `(1, N, 57)` output), side by side in
one process: `nms` = `run_nms` (confidence filter + class-aware NMS), `total` = `postprocess`
(NMS + rescaling + keypoint-object fusion into `Poses`; the fusion is the same NumPy code in both).
Medians over `--repeat` alternating runs, in ms. Every row also checks that both paths keep the
same detections in the same order and give the same poses (`same`).

Cases: trained-like outputs (few confident candidates): the golden crafted prediction (7 persons,
208 keypoint-object rows, 5754 noise rows), a synthetic 1024 x 1024 output with 20 persons and
~300 keypoint objects (duplicates included) over 65280 rows, and the shipped trained KAPAO-N on a
shipped scene at 640; junk-heavy outputs (random weights, thousands of candidates): the golden
seeded KAPAO-S forward at 640 and the same weights (the e2e checkpoint) through eager torch at 1024
on the golden image.
The old path is `benchmarks/torch_postprocess_ref.py`. Set KAPAO_SHARED to the folder holding
golden/ (default: ../shared beside the checkout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import torch_postprocess_ref as ref
from kapao.data.letterbox import preprocess_demo, read_image, to_input_batch
from kapao.postprocess import postprocess, run_nms
from kapao.presets import get_preset
from kapao.schema import coco_schema

SHARED = Path(os.environ.get("KAPAO_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
PRESETS = ("val", "demo", "demo_video")


def synthetic_trained(seed: int = 0, n_person: int = 20, side: int = 1024) -> np.ndarray:
    """(1, 65280, 57) rows like a trained KAPAO's at 1024: 20 persons (4 jittered duplicates each),
    ~300 visible keypoints as 32-px keypoint objects (1-3 duplicates), the rest noise (obj < 0.01)."""
    rng = np.random.default_rng(seed)
    n_rows = 3 * sum((side // s) ** 2 for s in (8, 16, 32, 64))
    pred = np.zeros((n_rows, 57), np.float32)
    pred[:, :2] = rng.uniform(0, side, (n_rows, 2))
    pred[:, 2:4] = rng.uniform(4, 200, (n_rows, 2))
    pred[:, 4] = rng.uniform(0, 0.01, n_rows)
    pred[:, 5:23] = rng.uniform(0, 0.2, (n_rows, 18))
    pred[:, 23:] = rng.uniform(0, side, (n_rows, 34))
    rows = iter(rng.permutation(n_rows))
    for _ in range(n_person):
        cx, cy = rng.uniform(100, side - 100, 2)
        w, h = rng.uniform(60, 160), rng.uniform(150, 380)
        kps = np.stack((cx + rng.uniform(-w / 2, w / 2, 17), cy + rng.uniform(-h / 2, h / 2, 17)), 1)
        score = rng.uniform(0.6, 0.97)
        for d in range(4):
            r = next(rows)
            pred[r, :4] = (cx, cy, w, h) + rng.normal(0, 4, 4)
            pred[r, 4], pred[r, 5:23] = score - 0.1 * d, 0.0
            pred[r, 5] = 0.98
            pred[r, 23:] = (kps + rng.normal(0, 3, kps.shape)).reshape(-1)
        for t in np.flatnonzero(rng.random(17) < 0.88):  # ~15 visible keypoints per person
            for d in range(int(rng.integers(1, 4))):
                r = next(rows)
                pred[r, :4] = (*(kps[t] + rng.normal(0, 3, 2)), 32, 32)
                pred[r, 4], pred[r, 5:23] = rng.uniform(0.3, 0.95), 0.0
                pred[r, 6 + t] = 0.95
    return pred[None]


def seeded_random_s(weights: Path, image: np.ndarray, imgsz: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The goldens' seed-0 random-weight KAPAO-S (the e2e official-format checkpoint) through eager
    torch (eval, unfused) on `image` at `imgsz` (demo letterbox) -> (raw rows (1, N, 57), input (H, W))."""
    from kapao.weights.loader import load

    model, _ = load(weights)
    chw, _, _ = preprocess_demo(image, imgsz, int(model.max_stride))
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(to_input_batch([chw])))
    return out.numpy(), tuple(chw.shape[1:])


def shipped_trained(shared: Path) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The shipped trained KAPAO-N on a shipped synthetic scene at 640, or None if unavailable."""
    try:
        from kapao.engine.predictor import KAPAO

        scene = Path(__file__).resolve().parents[1] / "src" / "kapao" / "assets" / "demo" / "scene_000001.jpg"
        img = read_image(scene)
        model = KAPAO(device="cpu")
        chw, _, _ = preprocess_demo(img, 640, model.backend.stride)
        x = to_input_batch([chw])
        return np.asarray(model.backend(x)), img.shape[:2]
    except Exception as e:  # the predictor is optional here
        print(f"(shipped model case skipped: {type(e).__name__}: {e})")
        return None


def ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def same(pred: np.ndarray, preset: str, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> bool:
    a_pd, a_kd = run_nms(pred, preset)
    b_pd, b_kd = ref.run_nms(torch.from_numpy(pred), preset)
    ok = np.array_equal(a_pd[0], b_pd[0].numpy()) and np.array_equal(a_kd[0], b_kd[0].numpy())
    a = postprocess(pred, preset, input_hw, [orig_hw], coco_schema())[0]
    b = ref.postprocess(torch.from_numpy(pred), preset, input_hw, [orig_hw], coco_schema())[0]
    fields = ("boxes", "scores", "keypoints", "kp_objects")
    return ok and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the NumPy path is single-threaded)")
    ap.add_argument("--quick", action="store_true", help="5 repeats, no 1024 random-model forward")
    args = ap.parse_args()
    repeat = 5 if args.quick else args.repeat
    torch.set_num_threads(args.threads)
    golden = SHARED / "golden"
    image = np.load(golden / "inputs.npz")["A_bgr"]
    schema = coco_schema()

    crafted = np.load(golden / "postprocess.npz")["crafted_pred"]
    cases = [("trained-like", "golden crafted 640", crafted, (448, 640), (426, 640)),
             ("trained-like", "synthetic 1024, 20 persons", synthetic_trained(), (1024, 1024), (1024, 1024))]
    shipped = shipped_trained(SHARED)
    if shipped is not None:
        cases.append(("trained-like", "shipped KAPAO-N scene 640", shipped[0], (640, 640), shipped[1]))
    forward = np.load(golden / "forward_s640.npz")["output"]
    cases.append(("junk-heavy", "golden random S 640", forward, (448, 640), (426, 640)))
    if not args.quick:
        x, input_hw = seeded_random_s(golden / "e2e" / "kapao_s_coco_seed0.pt", image, 1024)
        cases.append(("junk-heavy", "random S 1024 (eager)", x, input_hw, image.shape[:2]))

    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, numpy {np.__version__}, "
          f"CPUs {os.cpu_count()}, medians of {repeat} runs (ms)")
    head = (f"{'kind':<13} {'case':<28} {'preset':<11} {'rows':>6} {'cand':>6} {'persons':>7} {'kp obj':>6} "
            f"{'nms torch':>9} {'nms numpy':>9} {'total torch':>11} {'total numpy':>11} {'speed-up':>8} same")
    print(head)
    print("-" * len(head))
    for kind, name, pred, input_hw, orig_hw in cases:
        tpred = torch.from_numpy(pred)
        for preset in PRESETS:
            p = get_preset(preset)
            cand = int((pred[0, :, 4] > min(p.conf_thres, p.conf_thres_kp)).sum())
            pd, kd = run_nms(pred, p)
            run = {
                "nms torch": lambda: ref.run_nms(tpred, p),
                "nms numpy": lambda: run_nms(pred, p),
                "total torch": lambda: ref.postprocess(tpred, p, input_hw, [orig_hw], schema),
                "total numpy": lambda: postprocess(pred, p, input_hw, [orig_hw], schema),
            }
            for fn in run.values():
                fn()  # warm-up
            times = {k: [] for k in run}
            for _ in range(repeat):  # alternating, so that drift of the machine hits both
                for k, fn in run.items():
                    times[k].append(ms(fn))
            t = {k: statistics.median(v) for k, v in times.items()}
            ok = "yes" if same(pred, preset, input_hw, orig_hw) else "NO"
            print(f"{kind:<13} {name:<28} {preset:<11} {pred.shape[1]:>6} {cand:>6} {len(pd[0]):>7} {len(kd[0]):>6} "
                  f"{t['nms torch']:>9.2f} {t['nms numpy']:>9.2f} {t['total torch']:>11.2f} {t['total numpy']:>11.2f} "
                  f"{t['total torch'] / t['total numpy']:>7.2f}x {ok}")
    print("rows = raw rows; cand = rows with obj above the lower of the two thresholds; persons / kp obj = "
          "detections kept; speed-up = total torch / total numpy")


if __name__ == "__main__":
    main()
