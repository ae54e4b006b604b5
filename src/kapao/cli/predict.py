"""`kapao predict SOURCE`: poses on images, folders, globs, videos and webcams."""

from __future__ import annotations

import argparse
import sys

from kapao.engine.predict_job import PredictJob, run_predict_job
from kapao.engine.predictor import KAPAO, normalize_flips
from kapao.presets import preset_names
from kapao.runtime.factory import BACKENDS, PRECISIONS
from kapao.viz import DrawOptions

# CLI flag -> Preset field; only flags the user gave override the preset
THRESHOLD_FLAGS = {
    "conf_thres": float,
    "iou_thres": float,
    "conf_thres_kp": float,
    "iou_thres_kp": float,
    "conf_thres_kp_person": float,
    "overwrite_tol": float,
    "max_det": int,
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, help="weights file (official .pt, kapao .safetensors, .onnx) or registry name; default: the shipped model")
    p.add_argument("--data", default=None, help="data YAML whose keypoint schema the weights use (needed only for custom keypoint sets)")
    add_backend_args(p)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """Where and how the network runs: shared by predict and val."""
    p.add_argument("--device", default="cpu", help="cpu or cuda:0")
    p.add_argument("--half", action="store_true", help="fp16 inference (CUDA only)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="auto (default): on the CPU, torch weights are exported once to a cached ONNX file and run "
                        "by ONNX Runtime; .onnx runs on ONNX Runtime, .xml on OpenVINO; on CUDA and for TTA, torch")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="bf16: OpenVINO bf16 (or the torch bf16 backbone) on AVX512-BF16 CPUs; int8: an INT8 copy "
                        "quantized once and cached (OpenVINO INT8 IR when installed), calibrated on --calib images; "
                        "fp32 is stated explicitly to runtimes that would pick bf16 themselves")
    p.add_argument("--calib", default=None, metavar="FOLDER",
                   help="images to calibrate --precision int8 on (default: the shipped synthetic scenes)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime/openvino threads (default: one per core)")


def add_threshold_args(p: argparse.ArgumentParser) -> None:
    for name, typ in THRESHOLD_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help="override the preset")
    p.add_argument("--no-kp-dets", action="store_true", help="do not fuse keypoint objects into the poses")
    p.add_argument("--clip-all-keypoints", action="store_true", help="clip every keypoint to the image (the official code clips only the first two)")
    p.add_argument("--scales", type=float, nargs="+", default=None, help="TTA scales, e.g. 0.8 1 1.2")
    p.add_argument("--flips", type=int, nargs="+", default=None, help="TTA flips per scale: -1 none, 3 left-right, 2 up-down")


def threshold_overrides(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in THRESHOLD_FLAGS if getattr(args, k) is not None}
    if args.no_kp_dets:
        out["use_kp_dets"] = False
    if args.clip_all_keypoints:
        out["clip_all_keypoints"] = True
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict poses on images, folders, globs, videos or a webcam")
    p.add_argument("source", nargs="+", help="image, folder, glob, video file or webcam index (several allowed)")
    add_model_args(p)
    p.add_argument("--imgsz", type=int, default=None, help="inference size (longest side, rounded up to the stride); default: the size the weights were trained at (1280 for the official ones)")
    p.add_argument("--preset", default=None, choices=preset_names(), help="thresholds (default: demo for images, demo_video for videos)")
    add_threshold_args(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    g = p.add_argument_group("drawing (the official demo options)")
    g.add_argument("--bbox", action="store_true", help="draw person boxes and scores")
    g.add_argument("--no-pose", action="store_true", help="do not draw the skeletons")
    g.add_argument("--face", action="store_true", help="draw face keypoints")
    g.add_argument("--kp-bbox", action="store_true", help="draw the boxes of fused keypoint objects")
    g.add_argument("--kp-obj", action="store_true", help="draw keypoint objects only (raw keypoint detections)")
    g.add_argument("--color-pose", type=int, nargs=3, default=[255, 0, 255], metavar=("B", "G", "R"))
    g.add_argument("--color-kp", type=int, nargs=3, default=[0, 255, 255], metavar=("B", "G", "R"))
    g.add_argument("--schema-colors", action="store_true", help="colour keypoints and limbs by the schema's colours")
    g.add_argument("--line-thick", type=int, default=2)
    g.add_argument("--kp-size", type=int, default=1)
    g.add_argument("--kp-thick", type=int, default=2)
    g.add_argument("--alpha", type=float, default=1.0, help="opacity of the drawing over the image")
    g.add_argument("--fps", action="store_true", help="FPS overlay on video frames")
    g.add_argument("--track", action="store_true", help="track persons across video frames and draw their IDs")
    o = p.add_argument_group("outputs")
    o.add_argument("--project", default="runs/predict")
    o.add_argument("--name", default="exp")
    o.add_argument("--exist-ok", action="store_true")
    o.add_argument("--nosave", action="store_true", help="do not save drawn images/videos")
    o.add_argument("--gif", action="store_true", help="also save videos as GIFs")
    o.add_argument("--gif-size", type=int, default=480, help="longest side of the GIF")
    o.add_argument("--start", type=float, default=None, help="video start (seconds)")
    o.add_argument("--end", type=float, default=None, help="video end (seconds)")
    o.add_argument("--save-json", action="store_true", help="COCO results JSON of all poses")
    o.add_argument("--save-csv", action="store_true", help="one CSV row per person")
    o.add_argument("--display", action="store_true", help="show results in a window (needs a screen)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    model = KAPAO(args.weights, device=args.device, half=args.half, backend=args.backend, data=args.data,
                  precision=args.precision, threads=args.threads, calib=args.calib, tta=bool(args.scales or args.flips))
    draw = DrawOptions.from_kwargs(
        bbox=args.bbox, pose=not args.no_pose, face=args.face, kp_bbox=args.kp_bbox, kp_obj=args.kp_obj,
        color_pose=None if args.schema_colors else tuple(args.color_pose),
        color_kp=None if args.schema_colors else tuple(args.color_kp),
        line_thick=args.line_thick, kp_size=args.kp_size, kp_thick=args.kp_thick, alpha=args.alpha,
    )
    job = PredictJob(
        source=args.source if len(args.source) > 1 else args.source[0],
        imgsz=args.imgsz, preset=args.preset, overrides=threshold_overrides(args),
        scales=args.scales, flips=normalize_flips(args.flips), batch_size=args.batch_size, draw=draw,
        project=args.project, name=args.name, exist_ok=args.exist_ok, save_images=not args.nosave,
        gif=args.gif, gif_size=args.gif_size, start_s=args.start, end_s=args.end,
        save_json=args.save_json, save_csv=args.save_csv, display=args.display, track=args.track,
        fps_overlay=args.fps, progress=not args.quiet,
    )
    summary = run_predict_job(model, job)
    print(summary.report())
    print(f"results in {summary.run_dir}")
    for e in summary.errors:
        print(f"kapao predict: error: {e}", file=sys.stderr)
    return 1 if summary.errors else 0
