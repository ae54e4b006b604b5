"""`kapao benchmark`: per-stage speed and pose agreement of each backend and precision."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from kapao.cli.export import add_model_source, load_model
from kapao.errors import KapaoError, require_torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="per-stage ms and images/s per backend and precision, on real images")
    add_model_source(p)
    p.add_argument("--images", required=True, help="folder of real images to time on")
    p.add_argument("--n", type=int, default=20, help="images to time (the first n, sorted); the rest calibrate INT8")
    p.add_argument("--calib", default=None, metavar="FOLDER",
                   help="calibrate INT8 on this folder's images instead (then all --n can be timed)")
    p.add_argument("--imgsz", type=int, nargs="+", default=[640, 1024, 1280], help="inference sizes")
    # names checked in run(): kapao.runtime.bench (which holds them) imports torch
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="backends to time (default: all; an unknown name lists them); "
                        "the first is the reference for the OKS agreement")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument("--preset", default="demo", help="post-processing thresholds (val, demo, demo_video)")
    p.add_argument("--workdir", default=".kapao-bench", help="where the weights are saved for the graph rows (their exports go to the export cache, $KAPAO_HOME/exports)")
    p.add_argument("--no-bound", action="store_true", help="skip the 3x3-conv GFLOP/s measurement")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed passes over the images per row; each stage reports the median pass")


def _images(folder: Path, option: str) -> list[Path]:
    if not folder.is_dir():
        raise KapaoError(f"{option} {folder}: not a folder; give a folder of real photos")
    from kapao.runtime.quantize import IMAGE_SUFFIXES

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KapaoError(f"{option} {folder}: no .jpg/.png images in it")
    return files


def run(args: argparse.Namespace) -> int:
    require_torch("kapao benchmark (it times the torch backends beside the exported ones)")
    import torch

    from kapao.runtime.bench import BACKENDS, format_bounds, format_header, measure_bounds, run_benchmark

    backends = list(args.backends or BACKENDS)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise KapaoError(f"--backends {' '.join(unknown)}: unknown; use some of {', '.join(BACKENDS)}")
    folder = Path(args.images)
    files = _images(folder, "--images")
    timed, calib = files[: args.n], (files[args.n :] or files)
    if args.calib:
        calib = _images(Path(args.calib), "--calib")
    model = load_model(args)
    threads = int(args.threads or torch.get_num_threads())
    print(f"kapao benchmark: {model.cfg.name}, {len(timed)} images from {folder}, {threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    bounds = {} if args.no_bound else measure_bounds(threads)
    if bounds:
        print(format_bounds(bounds, threads))
    print(format_header())
    if args.rounds < 1:
        raise KapaoError(f"--rounds {args.rounds}: give at least 1")
    run_benchmark(model, timed, args.imgsz, backends, threads, args.preset, args.workdir, calib, print, bounds,
                  args.rounds)
    return 0
