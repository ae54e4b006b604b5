"""The OpenVINO backend: runs an exported kapao ONNX file with OpenVINO's CPU (or GPU) plugin.

OpenVINO's CPU plugin is the fastest fp32 and bf16 convolution runtime on x86 here. On CPUs with
AVX512-BF16 or AMX it *chooses bf16 by itself* (its default inference precision), so this backend
always states the precision: "fp32" (the exact mode asks for f32 explicitly) or "bf16". The graph
is compiled once per input shape (letterboxed frames of one video share a shape) and kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kapao.errors import KapaoError
from kapao.runtime.base import no_tta
from kapao.runtime.metadata import check_graph_input, check_output_width, read_metadata, schema_from_metadata
from kapao.schema import KeypointSchema

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
DEVICES = {"cpu": "CPU", "gpu": "GPU"}


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise KapaoError("the openvino backend needs OpenVINO: pip install 'kapao[openvino]'") from None
    return openvino


class OpenVinoBackend:
    """backend(x (B, 3, H, W) float32 in [0, 1]) -> (B, N, 5 + nc + 2K) float32, input pixels.

    path: a file written by `kapao export --format onnx` (dynamic or fixed shape): fp32 ONNX, an
    INT8 OpenVINO IR (`--int8 IMAGES --int8-format openvino`, NAME.xml + NAME.bin, the fastest),
    or INT8 ONNX in QDQ format (`--int8-format qdq`), whose Q/DQ pairs OpenVINO turns into int8
    (VNNI) convolutions.
    precision: "fp32" (IEEE f32, stated explicitly) or "bf16" (OpenVINO keeps the precision-
    sensitive ops, e.g. the decode's sigmoids, in f32 where its plugin needs them).
    threads: inference threads (None: OpenVINO's default, one per physical core).
    max_shapes: compiled shapes kept (least recently used dropped first).
    Implements `kapao.runtime.base.Backend`; attributes: schema, stride, fixed_hw, name,
    precision, threads, meta.
    """

    supports_tta = False

    def __init__(
        self,
        path: str | Path,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        max_shapes: int = 8,
    ):
        ov = _import_openvino()
        self.path = Path(path)
        if precision not in PRECISIONS:
            raise KapaoError(f"openvino precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if device not in DEVICES:
            raise KapaoError(f"openvino device {device!r}: use one of {', '.join(DEVICES)}")
        meta = read_metadata(self.path)
        self.meta = meta
        self.schema: KeypointSchema = schema_from_metadata(meta, str(self.path))
        self.stride = int(meta["stride"])
        self.default_imgsz: int | None = int(meta["default_imgsz"]) if meta.get("default_imgsz") else None
        file_precision = str(meta.get("precision", "fp32"))
        qformat = str((meta.get("quantization") or {}).get("format", ""))
        if file_precision == "int8" and qformat not in ("openvino", "qdq"):
            raise KapaoError(
                f"{self.path}: OpenVINO runs INT8 OpenVINO IR or QDQ files, this one is {qformat or 'unknown'}; "
                "export with --int8 IMAGES --int8-format openvino"
            )
        if file_precision not in ("fp32", "int8"):
            raise KapaoError(
                f"{self.path}: the openvino backend takes an fp32 or INT8 (QDQ) export, this file is "
                f"{file_precision}; export without --half and pick --precision bf16 here instead"
            )
        # an INT8 file runs its quantized convs in int8, the rest (head, decode) at `precision`
        self.precision = "int8" if file_precision == "int8" else precision
        self.threads = threads
        self._core = ov.Core()
        if DEVICES[device] not in self._core.available_devices:
            raise KapaoError(f"{self.path}: OpenVINO sees no {DEVICES[device]} device here; use device='cpu'")
        try:
            self._model = self._core.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long texts
            raise KapaoError(f"{self.path}: OpenVINO cannot read it ({str(e).splitlines()[0]}); re-export it") from None
        self._device = DEVICES[device]
        self._config: dict[str, str] = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = str(int(threads))
        shape = self._model.input(0).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.fixed_hw: tuple[int, int] | None = (dims[2], dims[3]) if dims[2] and dims[3] else None
        self._fixed_batch = dims[0]
        out_dim = self._model.output(0).get_partial_shape()[-1]
        if out_dim.is_static:
            check_output_width(self.path, out_dim.get_length(), self.schema)
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._max_shapes = max_shapes
        self.name = f"openvino-{device}-{self.precision}"

    def _request(self, shape: tuple[int, ...]) -> Any:
        """An infer request of the graph compiled for this exact input shape (cached)."""
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        model = self._model.clone()
        model.reshape({model.input(0).any_name: list(shape)})
        compiled = self._core.compile_model(model, self._device, self._config)
        request = compiled.create_infer_request()
        self._compiled[shape] = request
        if len(self._compiled) > self._max_shapes:
            self._compiled.popitem(last=False)
        return request

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, 3, H, W) float32 in [0, 1] -> (B, N, 5 + nc + 2K) float32, input pixels."""
        x = np.asarray(x)
        check_graph_input(self.path, x, self.fixed_hw)
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if self._fixed_batch is not None and arr.shape[0] != self._fixed_batch:
            out = np.concatenate([self._run(arr[i : i + 1]) for i in range(arr.shape[0])], 0)
        else:
            out = self._run(arr)
        check_output_width(self.path, out.shape[-1], self.schema)
        return out

    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        no_tta(self)

    def _run(self, arr: np.ndarray) -> np.ndarray:
        request = self._request(tuple(arr.shape))
        request.infer({0: arr})
        # copy: the request's output buffer is reused by its next inference
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
