"""`create_backend`: the one way predict, val, the app, the benchmark and INT8 calibration get a runtime.

What runs, by weights and `backend` (default "auto"):

| weights                                   | auto on CPU                                  | auto on CUDA |
|-------------------------------------------|----------------------------------------------|--------------|
| none (the shipped model)                  | its shipped ONNX on ONNX Runtime (no torch)  | torch        |
| `.onnx`                                   | ONNX Runtime                                 | ORT CUDA     |
| `.xml` (OpenVINO IR)                      | OpenVINO                                     | OpenVINO GPU |
| `.torchscript`                            | torch (TorchScript)                          | same         |
| `.pt` / `.safetensors` / a registry name  | exported once to a cached ONNX, ORT fp32     | torch (fp16 with half) |

precision "bf16" runs OpenVINO's bf16 mode on the (cached) ONNX when OpenVINO is installed, else
the torch bf16 backbone; "int8" quantizes the (cached) fp32 ONNX once, calibrated on `calib`
images or on the shipped scenes: an OpenVINO INT8 IR with NNCF (the fastest here) when OpenVINO
and NNCF are installed, else an ONNX Runtime QOperator file. Test-time augmentation (`tta=True`)
makes auto pick torch, the one backend that runs it. `backend="torch"|"onnxruntime"|"openvino"`
forces a runtime (torch weights are then exported for the graph runtimes as for auto).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kapao.errors import KapaoError, require_torch
from kapao.runtime.base import Backend
from kapao.runtime.cache import ONNX_OPSET, ExportKey, cached_artifact, calibration_digest, weights_digest
from kapao.runtime.metadata import EXPORTED_SUFFIXES, GRAPH_REVISION
from kapao.schema import KeypointSchema

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_IMGSZ = 1280  # the official models' input size, for weights that do not say
CALIBRATION_IMAGES = 32
T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """A validated create_backend call."""

    backend: str
    device: str  # "cpu", "cuda" or "cuda:N"
    precision: str
    half: bool
    threads: int | None
    schema: KeypointSchema | None
    calib: str | Path | Sequence[str | Path] | None
    tta: bool
    quiet: bool

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def create_backend(
    weights: str | Path | None = None,
    backend: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    half: bool = False,
    threads: int | None = None,
    data: str | Path | None = None,
    calib: str | Path | Sequence[str | Path] | None = None,
    tta: bool = False,
    quiet: bool = False,
) -> Backend:
    """The backend for `weights` (a path, a registry name, or None for the shipped model).

    device: "cpu", "cuda" or "cuda:N". precision: "fp32" | "bf16" | "int8". half: fp16 on CUDA
    (torch). threads: ONNX Runtime / OpenVINO threads. data: a data YAML whose keypoint schema
    the weights use (custom keypoint sets). calib: INT8 calibration images (a folder or files).
    tta: the caller will run test-time augmentation. quiet: no one-line export messages.
    """
    if backend not in BACKENDS:
        raise KapaoError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise KapaoError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise KapaoError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if half and not device.startswith("cuda"):
        raise KapaoError("--half is fp16 on CUDA; on the CPU use --precision bf16 or int8")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise KapaoError(f"weights {weights!r}: give a file path or a registered name")
    schema = KeypointSchema.from_yaml(data) if data else None
    req = Request(backend, device, precision, bool(half), threads, schema, calib, bool(tta), bool(quiet))
    if tta and precision != "fp32":
        raise KapaoError("test-time augmentation (--scales/--flips) runs in fp32 on the torch backend; drop --precision")
    path = _shipped_onnx(weights, req)
    if path is not None:
        return _from_exported(path, req)
    if weights is not None and Path(str(weights)).suffix in EXPORTED_SUFFIXES:
        return _from_exported(Path(weights), req)
    return _from_torch_weights(weights, req)


def _shipped_onnx(weights: str | Path | None, req: Request) -> Path | None:
    """The shipped ONNX of the shipped model (no weights, or its name) when the request needs no
    torch model; else None (the torch weights path)."""
    from kapao.weights.shipped import DEFAULT, shipped_onnx

    name = DEFAULT if weights is None else str(weights)
    if weights is not None and (Path(name).exists() or shipped_onnx(name) is None):
        return None  # a file of the user's, or not a shipped name
    if req.backend == "torch" or req.tta or (req.on_cuda and req.backend == "auto"):
        return None
    if req.precision == "bf16" and req.backend == "auto" and not has_module("openvino"):
        return None  # the torch bf16 backbone is the bf16 path without OpenVINO
    return shipped_onnx(name)


# -- exported files ----------------------------------------------------------------------------


def _from_exported(path: Path, req: Request) -> Backend:
    if not path.is_file():
        raise KapaoError(f"{path}: no such file; export one with `kapao export` or pass a .pt/.safetensors/registry name")
    if req.tta:
        raise KapaoError(
            f"{path}: test-time augmentation (--scales/--flips) runs on the torch backend; "
            "pass the torch weights (.pt/.safetensors) instead of an exported file"
        )
    if path.suffix == ".torchscript":
        require_torch(f"{path.name} (a TorchScript file)")
        from kapao.runtime.torchscript_backend import TorchScriptBackend

        return TorchScriptBackend(path, device=req.device)
    if req.backend == "torch":
        raise KapaoError(f"{path}: an exported file runs on onnxruntime or openvino, not --backend torch; drop --backend")
    if path.suffix == ".xml":
        if req.backend == "onnxruntime":
            raise KapaoError(f"{path}: an OpenVINO IR runs on --backend openvino (or auto), not onnxruntime")
        return _openvino(path, req, "fp32" if req.precision == "int8" else req.precision, int8_file=True)
    # .onnx
    if req.precision == "int8":
        from kapao.runtime.metadata import read_metadata

        if read_metadata(path).get("precision") == "int8":
            return _onnx_runtime(path, req) if req.backend != "openvino" else _openvino(path, req, "fp32")
        return _quantized(path, req, stem=path.stem)
    if req.precision == "bf16":
        if req.backend == "onnxruntime":
            raise KapaoError("--precision bf16 runs on OpenVINO (or torch); for ONNX Runtime use fp32 or int8")
        return _openvino(path, req, "bf16")
    if req.backend == "openvino":
        return _openvino(path, req, "fp32")
    return _onnx_runtime(path, req)


def _onnx_runtime(path: Path, req: Request) -> Backend:
    from kapao.runtime.onnx_backend import OnnxBackend

    return OnnxBackend(path, providers="cuda" if req.on_cuda else "cpu", threads=req.threads)


def _openvino(path: Path, req: Request, precision: str, int8_file: bool = False) -> Backend:
    if not has_module("openvino"):
        why = "an OpenVINO IR" if int8_file else f"--precision {precision}" if precision != "fp32" else "--backend openvino"
        raise KapaoError(f"{why} needs OpenVINO: pip install \"kapao[openvino]\"")
    from kapao.runtime.openvino_backend import OpenVinoBackend

    return OpenVinoBackend(path, precision=precision, device="gpu" if req.on_cuda else "cpu", threads=req.threads)


def _calibration_files(calib: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The INT8 calibration images: the caller's folder or files, else the shipped scenes."""
    if calib is None:
        from kapao.weights.shipped import demo_images

        return demo_images()
    from kapao.runtime.quantize import image_files

    files = image_files(calib, "--calib images")
    return files[:CALIBRATION_IMAGES]


def _quantized(onnx_path: Path, req: Request, stem: str) -> Backend:
    """INT8 from an fp32 ONNX file, quantized once per (file, calibration images) and cached."""
    files = _calibration_files(req.calib)
    if req.calib is None and not req.quiet:
        print("kapao: INT8 calibrated on the shipped synthetic scenes; pass --calib FOLDER with images like yours "
              "for better agreement with fp32", flush=True)
    use_openvino = req.backend != "onnxruntime" and has_module("openvino") and has_module("nncf")
    if req.backend == "openvino" and not use_openvino:
        raise KapaoError('OpenVINO INT8 needs OpenVINO and NNCF: pip install "kapao[openvino]"')
    if not use_openvino and not has_module("onnx"):
        raise KapaoError('INT8 quantization needs OpenVINO + NNCF (pip install "kapao[openvino]") or the onnx package')
    key = ExportKey(
        weights_digest(onnx_path), "dynamic", _version(), ONNX_OPSET, GRAPH_REVISION,
        "openvino-int8" if use_openvino else "onnxruntime-int8", calibration_digest(files),
    )
    if use_openvino:
        from kapao.runtime.openvino_quantize import quantize_openvino_int8

        return cached_artifact(
            key, stem, "model-int8.xml", lambda out: quantize_openvino_int8(onnx_path, out, files, num_images=len(files)),
            lambda p: _openvino(p, req, "fp32", int8_file=True), f"{stem} as an OpenVINO INT8 IR", req.quiet,
        )
    from kapao.runtime.quantize import quantize_int8

    return cached_artifact(
        key, stem, "model-int8.onnx", lambda out: quantize_int8(onnx_path, out, files, num_images=len(files)),
        lambda p: _onnx_runtime(p, req), f"{stem} as an INT8 ONNX file", req.quiet,
    )


# -- torch weights -------------------------------------------------------------------------------


def _from_torch_weights(weights: str | Path | None, req: Request) -> Backend:
    name = Path(str(weights)).name if weights is not None else "the shipped model on the torch backend"
    require_torch(f"{name} (torch weights; pass an exported .onnx file to run without torch)")
    from kapao.weights.download import resolve
    from kapao.weights.shipped import default_weights

    path, _entry = resolve(weights if weights is not None else default_weights())
    graph_runtime = req.backend in ("onnxruntime", "openvino") or (
        req.backend == "auto" and not req.on_cuda and not req.tta and has_module("onnxruntime")
    )
    if req.precision == "bf16" and req.backend == "auto" and not has_module("openvino"):
        graph_runtime = False  # the torch bf16 backbone is the bf16 path without OpenVINO
    if req.precision == "int8" and not graph_runtime:
        raise KapaoError("--precision int8 runs on OpenVINO or ONNX Runtime (CPU); drop --backend torch / --device cuda")
    if not graph_runtime:
        return _torch(weights, req)
    if req.precision == "fp32" and req.backend != "openvino":
        # the session itself checks the entry: a corrupt cached file is rebuilt
        return _cached_onnx(path, weights, req, lambda p: _onnx_runtime(p, req))
    onnx_path = _cached_onnx(path, weights, req, lambda p: _checked_onnx(p))
    return _from_exported(onnx_path, req)


def _checked_onnx(path: Path) -> Path:
    """`path` once ONNX Runtime has parsed it (a KapaoError for a corrupt file)."""
    from kapao.runtime.metadata import open_onnx_session

    open_onnx_session(path)
    return path


def _schema_tag(schema: KeypointSchema | None) -> str:
    return "" if schema is None else hashlib.sha256(json.dumps(schema.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _cached_onnx(path: Path, weights: str | Path | None, req: Request, open_entry: Callable[[Path], T]) -> T:
    """`open_entry` of the dynamic-shape fp32 ONNX export of a torch weights file, from the cache
    or built now (and rebuilt when `open_entry` raises KapaoError on it)."""
    key = ExportKey(
        weights_digest(path), "dynamic", _version(), ONNX_OPSET, GRAPH_REVISION, "onnx-fp32", _schema_tag(req.schema),
    )

    def build(out: Path) -> None:
        from kapao.runtime.export import export_onnx
        from kapao.weights.loader import load

        model, meta = load(path, schema=req.schema)
        trained = trained_imgsz(meta)
        stride = model.max_stride
        size = max(stride, -(-(trained or DEFAULT_IMGSZ) // stride) * stride)
        export_onnx(model, out, imgsz=size, dynamic=True, opset=ONNX_OPSET, extra_metadata={
            "default_imgsz": trained or DEFAULT_IMGSZ, "source_weights": str(weights or path.name), "weights_sha256": key.weights_sha256,
        })

    return cached_artifact(key, path.stem, "model.onnx", build, open_entry, f"{path.name} as ONNX", req.quiet)


def trained_imgsz(meta: object) -> int | None:
    """The size weights were trained at: a kapao file's recipe, or the registry's (official 1280)."""
    info = getattr(meta, "info", None) or {}
    registry = getattr(meta, "registry", None)
    trained = (info.get("recipe") or {}).get("imgsz") if isinstance(info, dict) else None
    trained = trained or (registry.input_size if registry is not None else None)
    return int(trained) if trained else None


def _torch(weights: str | Path | None, req: Request) -> Backend:
    from kapao.runtime.torch_backend import TorchBackend
    from kapao.weights import default_weights
    from kapao.weights.loader import load

    model, meta = load(weights if weights is not None else default_weights(), device="cpu", schema=req.schema)
    runner: Backend
    if req.precision == "bf16":
        if req.on_cuda:
            raise KapaoError("--precision bf16 is the CPU path; on CUDA use --half")
        from kapao.runtime.torch_cpu import CpuTorchBackend

        runner = CpuTorchBackend(model, "bf16")
    else:
        runner = TorchBackend(model, device=req.device, half=req.half)
    runner.default_imgsz = trained_imgsz(meta) or DEFAULT_IMGSZ
    return runner


def _version() -> str:
    from kapao import __version__

    return __version__
