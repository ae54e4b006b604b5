"""`kapao export`: write a model (network + decode) as ONNX or TorchScript, optionally INT8."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from kapao.errors import KapaoError, require_torch

if TYPE_CHECKING:
    from kapao.models.kapao import KapaoModel


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--weights (trained) or --cfg (untrained, seeded random weights: for trying the tools)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights", help="weights file (official .pt, kapao .safetensors) or registry name")
    g.add_argument("--cfg", help="model config (kapao-s, ...) with untrained weights, for trying the tools")
    p.add_argument("--data", default=None, help="data YAML giving the keypoint schema (default with --cfg: coco-kp)")


def load_model(args: argparse.Namespace) -> KapaoModel:
    """The model named by --weights or --cfg, float32, eval mode (needs kapao[torch])."""
    return load_model_and_size(args)[0]


def load_model_and_size(args: argparse.Namespace) -> tuple[KapaoModel, int | None]:
    """`load_model` and the size the weights were trained at, when they say (None for --cfg)."""
    require_torch(f"{args.weights or args.cfg}: building the torch model")
    from kapao.models.kapao import KapaoModel
    from kapao.runtime.factory import trained_imgsz
    from kapao.schema import KeypointSchema

    if args.weights:
        from kapao.weights.loader import load

        schema = KeypointSchema.from_yaml(args.data) if args.data else None
        model, meta = load(args.weights, schema=schema)
        return model.float().eval(), trained_imgsz(meta)
    return KapaoModel(args.cfg, KeypointSchema.from_yaml(args.data or "coco-kp")).eval(), None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export to ONNX or TorchScript (network + decode, with metadata)")
    add_model_source(p)
    p.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    p.add_argument("--imgsz", type=int, nargs="+", default=[640], help="input size: one value or height width")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch/height/width (ONNX)")
    p.add_argument("--half", action="store_true", help="fp16 network (for GPU runtimes); the decode stays fp32")
    p.add_argument("--simplify", action="store_true", help="constant-fold and fuse with ONNX Runtime's basic optimiser")
    p.add_argument("--compact", action="store_true",
                   help="lossless half-size fp32 ONNX of fp16-stored weights: BatchNorm kept, fp16-exact weights "
                        "stored as fp16 + Cast (ONNX Runtime folds both at load; how the shipped ONNX is made)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--int8", metavar="IMAGES", default=None,
                   help="also write an INT8 ONNX file calibrated on this folder of real images")
    p.add_argument("--calib-n", type=int, default=32, help="calibration images for --int8")
    p.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="activation-range calibration for --int8")
    p.add_argument("--int8-format", default="qoperator", choices=["qoperator", "qdq", "openvino"],
                   help="qoperator: ONNX for ONNX Runtime; openvino: OpenVINO IR (NNCF), the fastest on "
                        "Intel/AMD CPUs; qdq: ONNX with Q/DQ pairs for other runtimes")
    p.add_argument("--int8-float-layers", type=int, default=0, metavar="N",
                   help="keep the first N model layers float in --int8 (closer to fp32, slower)")
    p.add_argument("--out", default=None, help="output file (default: <weights or cfg stem>.<format>)")


def run(args: argparse.Namespace) -> int:
    require_torch("kapao export")
    from kapao.runtime.export import FORMATS, SUFFIXES, export

    if args.format not in FORMATS:
        raise KapaoError(f"--format {args.format!r} is not supported; use one of {', '.join(FORMATS)}")
    if args.int8 and args.format != "onnx":
        raise KapaoError("--int8 quantizes an ONNX export; use it with --format onnx")
    if args.int8 and args.half:
        raise KapaoError("--int8 starts from the fp32 graph; drop --half")
    if args.compact and (args.format != "onnx" or args.half or args.simplify):
        raise KapaoError("--compact writes an fp32 ONNX with BatchNorm unfolded; use it with --format onnx, "
                         "without --half/--simplify")
    model, trained = load_model_and_size(args)
    stem = Path(args.weights).stem if args.weights else args.cfg
    out = Path(args.out) if args.out else Path(stem + SUFFIXES[args.format])
    imgsz = args.imgsz[0] if len(args.imgsz) == 1 else args.imgsz
    # the trained size travels with the file: runtimes use it when the caller gives no --imgsz
    path = export(model, out, args.format, imgsz, args.dynamic, args.half, args.simplify, args.opset,
                  compact=args.compact, extra_metadata={"default_imgsz": trained} if trained else None)
    print(f"wrote {path} and {path.name}.json ({path.stat().st_size / 1e6:.1f} MB)")
    if args.int8 and args.int8_format == "openvino":
        if args.calib_method != "minmax" or args.int8_float_layers:
            raise KapaoError("--int8-format openvino calibrates with NNCF; drop --calib-method/--int8-float-layers")
        from kapao.runtime.openvino_quantize import quantize_openvino_int8

        q = quantize_openvino_int8(path, path.with_name(path.stem + "-int8.xml"), args.int8, args.calib_n)
        size = q.stat().st_size + q.with_suffix(".bin").stat().st_size
        print(f"wrote {q}, {q.with_suffix('.bin').name} and {q.name}.json ({size / 1e6:.1f} MB)")
    elif args.int8:
        from kapao.runtime.quantize import quantize_int8

        q = quantize_int8(path, path.with_name(path.stem + "-int8.onnx"), args.int8, args.calib_n, args.calib_method,
                          float_layers=args.int8_float_layers, quant_format=args.int8_format)
        print(f"wrote {q} and {q.name}.json ({q.stat().st_size / 1e6:.1f} MB)")
    return 0
