"""Keypoint-object fusion: the vectorized `kapao.postprocess.fuse_keypoints` vs a plain per-object loop.

    python benchmarks/bench_fusion.py [--repeat 50]

Inputs are the fusion stage's real inputs: rescaled person keypoints, person scores and keypoint
objects. Cases: the golden crafted and forward predictions (through `run_nms` + rescaling, each
preset), and synthetic cases with 300 keypoint objects (spread over the 17 types, all of one type,
and a batch of 8 such images). Every case also checks that both paths give identical poses.
Set KAPAO_SHARED to the folder holding golden/ (default: ../shared beside the checkout).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from kapao.postprocess import fuse_keypoints, rescale_dets, run_nms
from kapao.presets import get_preset
from kapao.schema import coco_schema


def loop_fuse(poses, scores, kp_objects, conf_thres_kp_person, overwrite_tol):
    """Straightforward reference: the official per-object loop, one image at a time."""
    out = []
    for p, s, objs in zip(poses, scores, kp_objects):
        p = np.array(p, dtype=np.float64, copy=True)
        mask = np.asarray(s, np.float32) > np.float32(conf_thres_kp_person)
        chosen = p[mask]
        if len(chosen) and len(objs):
            for x1, y1, x2, y2, conf, kp_type in np.asarray(objs, np.float32):
                x, y = np.mean(np.array([x1, x2], np.float32)), np.mean(np.array([y1, y2], np.float32))
                kps = chosen[:, int(kp_type)]
                dist = np.linalg.norm(kps[:, :2] - np.array([[x, y]]), axis=-1)
                m = np.argmin(dist)
                if conf > kps[m, 2] and dist[m] < overwrite_tol:
                    kps[m] = [x, y, conf]
            p[mask] = chosen
        out.append(p)
    return out


def golden_case(pred: np.ndarray, preset_name: str):
    """Fusion inputs of one golden prediction (448x640 input, 426x640 original)."""
    preset = get_preset(preset_name)
    pd, kd = run_nms(pred, preset)
    dets = rescale_dets(pd[0], (448, 640), (426, 640))
    kps = dets[:, 6:].reshape(-1, 17, 2)
    poses = np.concatenate((kps, np.zeros((len(kps), 17, 1))), 2)
    boxes = rescale_dets(kd[0], (448, 640), (426, 640))[:, :4]
    objs = np.concatenate((boxes, kd[0][:, 4:5], kd[0][:, 5:6] - 1), 1)
    return [poses], [dets[:, 4]], [objs], preset


def synthetic_case(rng, n_person: int, n_obj: int, one_type: bool):
    """n_person poses in a 640x480 image and n_obj 32-px keypoint objects near their keypoints."""
    poses = np.zeros((n_person, 17, 3))
    centres = rng.uniform((80, 80), (560, 400), size=(n_person, 1, 2))
    poses[..., :2] = (centres + rng.normal(0, 40, size=(n_person, 17, 2))).astype(np.float32)
    scores = np.sort(rng.uniform(0.1, 1.0, n_person)).astype(np.float32)[::-1].copy()
    kp_type = np.full(n_obj, 5) if one_type else rng.integers(0, 17, n_obj)
    owner = rng.integers(0, n_person, n_obj)
    xy = poses[owner, kp_type, :2] + rng.normal(0, 12, size=(n_obj, 2))
    objs = np.zeros((n_obj, 6), np.float32)
    objs[:, :2], objs[:, 2:4] = xy - 16, xy + 16
    objs[:, 4] = np.sort(rng.uniform(0.2, 1.0, n_obj))[::-1]  # NMS order
    objs[:, 5] = kp_type
    return [poses], [scores], [objs], get_preset("val")


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.min(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(2)
    assert coco_schema().num_keypoints == 17

    cases = []
    golden = Path(os.environ.get("KAPAO_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "golden"
    if (golden / "postprocess.npz").is_file():
        crafted = np.load(golden / "postprocess.npz")["crafted_pred"]
        for name in ("val", "demo", "demo_video"):
            cases.append((f"golden crafted, {name}", golden_case(crafted, name)))
        forward = np.load(golden / "forward_s640.npz")["output"]
        cases.append(("golden forward, val", golden_case(forward, "val")))
    else:
        print(f"({golden} not found: golden cases skipped)")
    rng = np.random.default_rng(0)
    cases.append(("synthetic 300 objs, 17 types", synthetic_case(rng, 20, 300, one_type=False)))
    cases.append(("synthetic 300 objs, 1 type", synthetic_case(rng, 20, 300, one_type=True)))
    batch = [synthetic_case(rng, 20, 300, one_type=False) for _ in range(8)]
    merged = tuple(sum((c[i] for c in batch), []) for i in range(3))
    cases.append(("synthetic 8 images x 300 objs", (*merged, batch[0][3])))

    head = (f"{'case':<32} {'imgs':>4} {'persons':>8} {'kp objs':>8} {'max/type':>8} "
            f"{'vectorized ms':>14} {'loop ms':>9} {'speedup':>8}")
    print(head)
    print("-" * len(head))
    for label, (poses, scores, objs, preset) in cases:
        thr, tol = preset.conf_thres_kp_person, preset.overwrite_tol
        fast, _ = fuse_keypoints(poses, scores, objs, thr, tol)
        slow = loop_fuse(poses, scores, objs, thr, tol)
        assert all(np.array_equal(a, b) for a, b in zip(fast, slow)), label
        steps = max((np.bincount(o[:, 5].astype(int), minlength=17).max() for o in objs if len(o)), default=0)
        t_fast = best_ms(lambda: fuse_keypoints(poses, scores, objs, thr, tol), args.repeat)
        t_slow = best_ms(lambda: loop_fuse(poses, scores, objs, thr, tol), args.repeat)
        n_p = sum(len(p) for p in poses)
        n_o = sum(len(o) for o in objs)
        print(f"{label:<32} {len(poses):>4} {n_p:>8} {n_o:>8} {steps:>8} "
              f"{t_fast:>14.3f} {t_slow:>9.3f} {t_slow / t_fast:>7.1f}x")
    print(f"\nbest of {args.repeat} runs (the machine is shared); "
          "'max/type' = the most objects of one keypoint type in an image")


if __name__ == "__main__":
    main()
