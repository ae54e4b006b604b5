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
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kapao.errors import KapaoError
from kapao.io.writers import write_json
from kapao.models.kapao import KapaoModel
from kapao.schema import KeypointSchema

METADATA_KEY = "kapao"
METADATA_VERSION = 1
# bumped whenever the exported graph changes for the same weights (2: elementwise map decode);
# files cached by it (e.g. the benchmark's exports) are then rebuilt
GRAPH_REVISION = 2
INPUT_NAME = "images"
OUTPUT_NAME = "output"
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


def check_graph_input(path: str | Path, x: torch.Tensor, fixed_hw: tuple[int, int] | None) -> None:
    """The input checks every exported-graph runtime makes before it runs: (B, 3, H, W), and the
    graph's own size when it was exported fixed."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise KapaoError(f"{path}: input must be (B, 3, H, W), got {tuple(x.shape)}")
    if fixed_hw and tuple(x.shape[2:]) != fixed_hw:
        h, w = fixed_hw
        raise KapaoError(
            f"{path}: this graph is fixed to {h}x{w} but got {x.shape[2]}x{x.shape[3]}; "
            f"letterbox to {h}x{w} or export with --dynamic"
        )


def output_columns(schema: KeypointSchema) -> list[str]:
    """Names of the 5 + nc + 2K output columns: box, objectness, class scores, keypoint coordinates."""
    cls = ["cls_person"] + [f"cls_{n}" for n in schema.names]
    kps = [f"{n}_{c}" for n in schema.names for c in ("x", "y")]
    return ["cx", "cy", "w", "h", "obj", *cls, *kps]


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


def sidecar_path(path: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported file: embedded (ONNX metadata_props / TorchScript extra file /
    OpenVINO IR rt_info) if present, else the sidecar. Raises KapaoError when neither exists or it
    is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise KapaoError(f"{path}: no such file; export one with `kapao export --format onnx`")
    text, where = None, str(path)
    if path.suffix == ".onnx":
        text = _onnx_embedded(path)
    elif path.suffix in (".torchscript", ".pt", ".ts"):
        text = _torchscript_embedded(path)
    elif path.suffix == ".xml":
        text = _openvino_embedded(path)
    if text is None:
        side = sidecar_path(path)
        if not side.is_file():
            raise KapaoError(
                f"{path}: no kapao metadata inside the file and no sidecar {side.name}; "
                "re-export it with `kapao export` (it writes both)"
            )
        text, where = side.read_text(), str(side)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise KapaoError(f"{where}: kapao metadata is not valid JSON ({e}); re-export the model") from None
    if not isinstance(meta, dict) or "schema" not in meta or "stride" not in meta:
        raise KapaoError(f"{where}: kapao metadata lacks 'schema'/'stride'; re-export the model with `kapao export`")
    return meta


def _onnx_embedded(path: Path) -> str | None:
    try:
        import onnx
    except ImportError:
        return None  # the sidecar carries the same; onnx is only needed to write files
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise KapaoError(f"{path}: not a valid ONNX file ({type(e).__name__}); export it again with `kapao export`") from None
    for prop in m.metadata_props:
        if prop.key == METADATA_KEY:
            return prop.value
    return None


def _openvino_embedded(path: Path) -> str | None:
    """The `<rt_info><kapao value=.../>` entry of an OpenVINO IR .xml, read without OpenVINO."""
    import xml.etree.ElementTree as ET

    try:
        entry = ET.parse(path).getroot().find(f"rt_info/{METADATA_KEY}")
    except ET.ParseError as e:
        raise KapaoError(f"{path}: not a valid OpenVINO IR ({e}); export it again with `kapao export`") from None
    return None if entry is None else entry.get("value")


def _torchscript_embedded(path: Path) -> str | None:
    """The `kapao.json` extra file of a TorchScript archive (a zip: `<name>/extra/kapao.json`),
    read without loading the module."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("/extra/kapao.json"):
                    return z.read(name).decode("utf-8")
    except zipfile.BadZipFile:
        return None
    return None


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
) -> Path:
    """Write `model` (network + decode) as ONNX to `path` plus the sidecar `path.json`; returns `path`.

    dynamic: batch, height and width are symbolic (any multiple of the stride); otherwise the graph
    is fixed to (1, 3, H, W) and the decode grids are constants. half: fp16 network for GPU
    runtimes (input and output stay float32, the decode fp32). simplify: constant-fold and fuse with ONNX Runtime's portable basic-level
    optimiser. The decode is written with concatenation, so the graph has no ScatterND.
    """
    try:
        import onnx
    except ImportError:
        raise KapaoError("ONNX export needs the onnx package: pip install 'kapao[onnx]'") from None
    _check_model(model)
    path = Path(path)
    hw = normalize_imgsz(imgsz, model.max_stride)
    wrapped, device = _prepare(model, half, fuse=False)  # the exporter folds BN into the convs
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
            )
        if simplify:
            _ort_simplify(tmp)
        proto = onnx.load(str(tmp))
        meta = export_metadata(model, hw, "onnx", dynamic, "fp16" if half else "fp32", opset)
        set_onnx_metadata(proto, meta)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(sidecar_path(path), meta, indent=1)
    return path


def set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Put `meta` (JSON) under metadata_props['kapao'] of an onnx.ModelProto, replacing any old entry."""
    keep = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)


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
) -> Path:
    """Dispatch to `export_onnx` / `export_torchscript` by format name."""
    if fmt == "onnx":
        return export_onnx(model, path, imgsz, dynamic, half, simplify, opset)
    if fmt == "torchscript":
        return export_torchscript(model, path, imgsz, half)
    raise KapaoError(f"export format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")


def schema_from_metadata(meta: dict[str, Any], source: str) -> KeypointSchema:
    """The KeypointSchema recorded in export metadata."""
    return KeypointSchema.from_dict(meta["schema"], source=source)
