"""Export a KapaoModel (network + decode) to ONNX or TorchScript, with its metadata.

The exported graph maps `images` (B, 3, H, W) float RGB in [0, 1] to `output` (B, N, 5 + nc + 2K):
the decoded predictions in input pixels, the same tensor as `KapaoModel` in eval mode. Everything
post-processing needs (keypoint schema, strides, input size, column layout) travels with the file:
in ONNX `metadata_props["kapao"]` / TorchScript extra file `kapao.json`, and in a JSON sidecar
`<file>.json` beside it, so a file can be inspected and used without the training code.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kapao.errors import KapaoError
from kapao.io.writers import write_json
from kapao.models.kapao import KapaoModel
from kapao.runtime.metadata import (
    GRAPH_REVISION,
    INPUT_NAME,
    METADATA_KEY,
    METADATA_VERSION,
    OUTPUT_NAME,
    check_graph_input,
    output_columns,
    read_metadata,
    schema_from_metadata,
    set_onnx_metadata,
    sidecar_path,
)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}


def normalize_imgsz(imgsz: int | Sequence[int], stride: int) -> tuple[int, int]:
    """640 -> (640, 640); (H, W) -> (H, W). Both must be positive multiples of the model stride."""
    if isinstance(imgsz, int):
        hw = (imgsz, imgsz)
    else:
        vals = [int(v) for v in imgsz]
        if len(vals) not in (1, 2):
            raise KapaoError(f"imgsz {list(imgsz)}: give one size or two (height width)")
        hw = (vals[0], vals[-1])
    for v in hw:
        if v <= 0 or v % stride:
            up = max(stride, -(-v // stride) * stride)
            raise KapaoError(
                f"imgsz {hw[0]}x{hw[1]}: {v} is not a positive multiple of the model stride {stride}; use {up}"
            )
    return hw


def export_metadata(
    model: KapaoModel,
    imgsz: tuple[int, int],
    fmt: str,
    dynamic: bool,
    precision: str,
    opset: int | None = None,
) -> dict[str, Any]:
    """The JSON-able description stored with an exported file (see the module docstring)."""
    from kapao import __version__

    schema = model.schema
    k, nc = schema.num_keypoints, schema.num_classes
    return {
        "kapao_metadata_version": METADATA_VERSION,
        "kapao_version": __version__,
        "graph_revision": GRAPH_REVISION,
        "format": fmt,
        "opset": opset,
        "model": model.cfg.name,
        "schema": schema.to_dict(),
        "strides": [int(s) for s in model.stride.tolist()],
        "stride": model.max_stride,
        "imgsz": list(imgsz),
        "dynamic": bool(dynamic),
        "precision": precision,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, "height", "width"] if dynamic else [1, 3, *imgsz],
            "dtype": "float32",
            "layout": "BCHW, RGB, values in [0, 1], letterboxed with grey 114/255 to multiples of `stride`",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", "rows", 5 + nc + 2 * k],
            "dtype": "float32",
            "columns": output_columns(schema),
            "coordinates": "input pixels (of the letterboxed network input)",
            "slices": {"box_cxcywh": [0, 4], "obj": [4, 5], "cls": [5, 5 + nc], "keypoints_xy": [5 + nc, 5 + nc + 2 * k]},
            "rows": "level (strides ascending), anchor, grid y, grid x",
        },
    }


class _Exported(nn.Module):
    """What gets exported: float32 image in, float32 decoded predictions out, decoded with
    `KapaoHead.decode_maps` (elementwise, no slices: see kapao.models.head). With half=True the
    network runs in fp16 but the decode stays in fp32 (fp16 has 0.5 px steps at 1024 px)."""

    def __init__(self, model: KapaoModel, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.register_buffer("coefficients", model.head.map_decode_coefficients().to(next(model.parameters()).device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.model.head
        maps = head.output_maps(self.model.features(x.to(self.dtype)))
        return head.decode_maps([m.float() for m in maps], self.coefficients)


def _check_model(model: KapaoModel) -> None:
    if not isinstance(model, KapaoModel):
        raise KapaoError(f"export: expected a KapaoModel, got {type(model).__name__}")


def _prepare(model: KapaoModel, half: bool, fuse: bool) -> tuple[_Exported, torch.device]:
    """A copy of `model` in eval mode, BN folded when `fuse`, Focus as one strided conv, fp16 when
    `half` (head buffers fp32 for the decode), wrapped for export; and its device. The caller's
    model is untouched."""
    model = copy.deepcopy(model).float().eval()
    model.requires_grad_(False)
    if fuse:
        model.fuse()
    model.focus_as_conv()
    device = next(model.parameters()).device
    dtype = torch.float16 if half else torch.float32
    if half:
        model.half()
        model.head.float()  # anchor_grid and stride for the fp32 decode
        model.head.m.half()  # the head's output convs take the fp16 features
    return _Exported(model, dtype).eval(), device


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def export_onnx(
    model: KapaoModel,
    path: str | Path,
    imgsz: int | Sequence[int] = 640,
    dynamic: bool = False,
    half: bool = False,
    simplify: bool = False,
    opset: int = 17,
    extra_metadata: dict[str, Any] | None = None,
    compact: bool = False,
) -> Path:
    """Write `model` (network + decode) as ONNX to `path` plus the sidecar `path.json`; returns `path`.

    dynamic: batch, height and width are symbolic (any multiple of the stride); otherwise the graph
    is fixed to (1, 3, H, W) and the decode grids are constants. half: fp16 network for GPU
    runtimes (input and output stay float32, the decode fp32). simplify: constant-fold and fuse with ONNX Runtime's portable basic-level
    optimiser. The decode is written with concatenation, so the graph has no ScatterND.
    extra_metadata: more entries for the metadata (e.g. `default_imgsz`, the size the weights were
    trained at, which runtimes use when the caller gives none).
    compact: lossless half-size file for fp32 graphs of fp16-stored weights: BatchNorm is kept as
    nodes instead of folded into the convs, and every weight exact in fp16 is stored as fp16 + Cast
    (`kapao.runtime.onnx_compact`); ONNX Runtime folds the Casts and the BatchNorms at load.
    """
    try:
        import onnx
    except ImportError:
        raise KapaoError("ONNX export needs the onnx package: pip install 'kapao[onnx]'") from None
    _check_model(model)
    if compact and (half or simplify):
        raise KapaoError("compact stores an fp32 graph with BatchNorm unfolded; it does not go with half or simplify")
    path = Path(path)
    hw = normalize_imgsz(imgsz, model.max_stride)
    wrapped, device = _prepare(model, half, fuse=False)  # the exporter folds BN into the convs (unless compact)
    # PRESERVE on the eval-mode model: inference graph, but the eval peephole pass that folds BN is skipped
    mode = {"training": torch.onnx.TrainingMode.PRESERVE} if compact else {}
    x = torch.zeros(1, 3, *hw, device=device)
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "rows"}} if dynamic else None
    tmp = _temp_beside(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes
            # the TorchScript-based exporter: deterministic, no onnxscript dependency
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(
                wrapped,
                (x,),
                str(tmp),
                **legacy,
                opset_version=int(opset),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                do_constant_folding=True,
                **mode,
            )
        if simplify:
            _ort_simplify(tmp)
        proto = onnx.load(str(tmp))
        if compact:
            from kapao.runtime.onnx_compact import compact_fp16_initializers

            compact_fp16_initializers(proto)
        meta = {**export_metadata(model, hw, "onnx", dynamic, "fp16" if half else "fp32", opset), **(extra_metadata or {})}
        set_onnx_metadata(proto, meta)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(sidecar_path(path), meta, indent=1)
    return path


def _ort_simplify(path: Path) -> None:
    """Rewrite `path` with ONNX Runtime's basic (provider-independent, standard-op) optimisations."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise KapaoError("--simplify uses onnxruntime: pip install 'kapao[onnx]'") from None
    out = path.with_name(path.name + ".simplified")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out)
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        os.replace(out, path)
    finally:
        out.unlink(missing_ok=True)


def export_torchscript(
    model: KapaoModel,
    path: str | Path,
    imgsz: int | Sequence[int] = 640,
    half: bool = False,
) -> Path:
    """Trace `model` (network + decode) with torch.jit.trace and save it with the metadata as the
    extra file `kapao.json` and as the sidecar `path.json`; returns `path`. The trace records
    shapes symbolically, so the module accepts any batch and any multiple of the stride."""
    _check_model(model)
    path = Path(path)
    hw = normalize_imgsz(imgsz, model.max_stride)
    wrapped, device = _prepare(model, half, fuse=True)
    x = torch.zeros(1, 3, *hw, device=device)
    meta = export_metadata(model, hw, "torchscript", True, "fp16" if half else "fp32")
    tmp = _temp_beside(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapped, (x,), strict=False, check_trace=False)
        traced.save(str(tmp), _extra_files={"kapao.json": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(sidecar_path(path), meta, indent=1)
    return path


def export(
    model: KapaoModel,
    path: str | Path,
    fmt: str = "onnx",
    imgsz: int | Sequence[int] = 640,
    dynamic: bool = False,
    half: bool = False,
    simplify: bool = False,
    opset: int = 17,
    compact: bool = False,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Dispatch to `export_onnx` / `export_torchscript` by format name (extra_metadata: ONNX only)."""
    if fmt == "onnx":
        return export_onnx(model, path, imgsz, dynamic, half, simplify, opset, extra_metadata=extra_metadata, compact=compact)
    if compact:
        raise KapaoError("compact (lossless fp16 weight storage) is an ONNX option; use it with format onnx")
    if fmt == "torchscript":
        return export_torchscript(model, path, imgsz, half)
    raise KapaoError(f"export format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")


__all__ = [
    "FORMATS", "GRAPH_REVISION", "INPUT_NAME", "METADATA_KEY", "OUTPUT_NAME", "SUFFIXES", "check_graph_input",
    "export", "export_metadata", "export_onnx", "export_torchscript", "normalize_imgsz", "output_columns",
    "read_metadata", "schema_from_metadata", "set_onnx_metadata", "sidecar_path",
]
