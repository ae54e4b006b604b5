"""INT8 static quantization of an exported kapao ONNX file (ONNX Runtime).

INT8 (ONNX Runtime, QDQ format, u8 activations / s8 per-channel weights, which run on VNNI): the
backbone and neck are quantized with activation ranges calibrated on real images; the detection
head's output convs and the whole decode stay in float. Quantizing those destroys the output: the
keypoint offsets are multiplied by anchors of up to ~600 px, so one u8 step of a head logit moves
a keypoint by several pixels.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kapao.data.letterbox import prepare_input, read_image, to_input_batch
from kapao.errors import KapaoError
from kapao.io.writers import write_json
from kapao.runtime.metadata import read_metadata, set_onnx_metadata, sidecar_path

_LAYER = re.compile(r"/layers\.(\d+)/")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def image_files(images: str | Path | Sequence[str | Path], what: str = "calibration images") -> list[Path]:
    """The images of a folder (sorted; by suffix) or the files given, with one-line errors for a
    path that is not a folder and for no images at all. what: how the message names them."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise KapaoError(f"{folder}: {what} must be a folder of images (or a list of files) like the ones you will run on")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = [Path(p) for p in images]
    if not files:
        raise KapaoError(f"{images}: no {what} found (.jpg/.png/...); give a folder of real photos")
    return files


def calibration_batches(
    images: str | Path | Sequence[str | Path],
    hw: tuple[int, int] | None,
    imgsz: int = 640,
    stride: int = 64,
    limit: int = 32,
) -> list[np.ndarray]:
    """Up to `limit` images (a folder or a list of files) pre-processed as the predictor will:
    letterboxed to exactly `hw` for a fixed-size graph, else the demo letterbox at `imgsz`
    (minimal multiple-of-stride rectangle) -> list of (1, 3, H, W) float32 RGB in [0, 1]."""
    files = image_files(images)[:limit]
    out = []
    for f in files:
        chw = prepare_input(read_image(f), imgsz, stride, hw)[0]
        out.append(to_input_batch([chw]))  # exactly what the predictor feeds
    return out


def calibration_source(
    onnx_path: Path, calib_images: str | Path | Sequence[str | Path], num_images: int
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The metadata of an fp32 export (anything else is refused: INT8 starts from fp32) and the
    calibration batches pre-processed for its input (`calibration_batches`)."""
    meta = read_metadata(onnx_path)
    if meta.get("precision", "fp32") != "fp32":
        raise KapaoError(f"{onnx_path}: INT8 quantization starts from an fp32 export, this one is {meta['precision']}")
    hw = None if meta.get("dynamic") else (int(meta["imgsz"][0]), int(meta["imgsz"][1]))
    return meta, calibration_batches(calib_images, hw, max(meta["imgsz"]), int(meta["stride"]), num_images)


def float_tail_nodes(model: Any) -> list[str]:
    """Names of the nodes that must stay float: every node between the graph output and the last
    convolutions before it (the head's 1x1 output convs, included), i.e. the head and the decode.
    model: an onnx.ModelProto; its nodes must have names (the exporter names them)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep: dict[str, Any] = {}
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in keep:
            continue
        keep[node.name] = node
        if node.op_type != "Conv":
            stack.extend(node.input)
    if not any(n.op_type == "Conv" for n in keep.values()):
        raise KapaoError("quantize: found no head convolutions before the output; is this a kapao export?")
    return list(keep)


def leading_layer_nodes(model: Any, n: int) -> list[str]:
    """Names of the nodes of model layers 0..n-1 (the exporter names nodes by module path,
    `/.../layers.<i>/...`)."""
    out = []
    for node in model.graph.node:
        m = _LAYER.search(node.name)
        if m and int(m.group(1)) < n:
            out.append(node.name)
    return out


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over pre-made batches, with the range
    interface of its strided calibration (`CalibStridedMinMax`)."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self._feeds = [{name: b} for b in batches]
        self.set_range(0, len(batches))

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calib_images: str | Path | Sequence[str | Path],
    num_images: int = 32,
    method: str = "minmax",
    per_channel: bool = True,
    quant_format: str = "qoperator",
    float_layers: int = 0,
    op_types: Sequence[str] | None = None,
) -> Path:
    """Static INT8 quantization of an fp32 kapao ONNX file -> `out_path` (+ sidecar).

    Calibrates activation ranges on `num_images` real images pre-processed as the predictor will
    feed them (fixed graph: letterboxed to its size; dynamic: demo letterbox at its imgsz);
    keeps the head's output convs and the decode in float (`float_tail_nodes`). The metadata is
    copied with precision "int8". quant_format: "qoperator" (QLinearConv etc., the fastest on ORT
    CPU here) or "qdq" (QuantizeLinear/DequantizeLinear pairs, portable to other runtimes).
    float_layers: also keep the first N model layers (`layers.0` .. `layers.N-1`, the
    high-resolution stem) in float, trading speed for agreement with fp32.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise KapaoError("INT8 quantization needs onnx and onnxruntime: pip install 'kapao[onnx]'") from None
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if quant_format not in ("qoperator", "qdq"):
        raise KapaoError(f"quantization format {quant_format!r}: use 'qoperator' or 'qdq'")
    if method not in CALIBRATION_METHODS:
        raise KapaoError(f"calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    meta, batches = calibration_source(onnx_path, calib_images, num_images)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".kapao-quant-") as tmpdir:
        pre = Path(tmpdir) / "pre.onnx"
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        proto = onnx.load(str(pre))
        exclude = float_tail_nodes(proto) + leading_layer_nodes(proto, float_layers)
        q = Path(tmpdir) / "int8.onnx"
        quantize_static(
            str(pre),
            str(q),
            _Reader(proto.graph.input[0].name, batches),
            quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            op_types_to_quantize=list(op_types) if op_types else None,
            # min/max: one image per calibration step, ranges merged as it goes (bounded memory)
            extra_options={"CalibStridedMinMax": 1} if method == "minmax" else {},
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
        )
        qproto = onnx.load(str(q))
        meta = {**meta, "precision": "int8", "quantization": {
            "format": quant_format, "activations": "uint8", "weights": "int8 per-channel" if per_channel else "int8",
            "calibration": method, "calibration_images": len(batches), "float_nodes": len(exclude),
            "float_layers": float_layers,
        }}
        set_onnx_metadata(qproto, meta)
        tmp_out = Path(tmpdir) / "final.onnx"
        onnx.save(qproto, str(tmp_out))
        os.replace(tmp_out, out_path)
    write_json(sidecar_path(out_path), meta, indent=1)
    return out_path
