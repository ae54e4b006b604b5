"""The ONNX Runtime backend: runs an exported kapao ONNX file (fp32, fp16 or INT8) on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kapao.errors import KapaoError
from kapao.runtime.base import no_tta
from kapao.runtime.metadata import check_graph_input, check_output_width, open_onnx_session, read_metadata, schema_from_metadata
from kapao.schema import KeypointSchema

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise KapaoError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime") from None
    return onnxruntime


def session_options(threads: int | None = None, optimization: str = "all", exact: bool = False) -> Any:
    """ONNX Runtime session options: graph optimisation level, intra-op threads (None: ORT's
    default, one per physical core), sequential execution (the graph is a chain; inter-op threads
    only contend with intra-op ones on few cores), no thread spinning. exact: forbid MLAS' bf16 fast-math GEMM, the one
    place ORT would lower fp32 precision on its own."""
    ort = import_onnxruntime()
    if optimization not in OPTIMIZATION_LEVELS:
        raise KapaoError(f"onnxruntime optimization {optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    # no busy-waiting of the pool's threads after a run: on few cores they would spin against the
    # post-processing that follows (measured here, 2 threads, kapao-s 1024: post 63 -> 35 ms) and
    # against each other between ops (forward 211 -> 187 ms)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    if exact:
        so.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "0")
    return so


class OnnxBackend:
    """backend(x (B, 3, H, W) float32 in [0, 1]) -> (B, N, 5 + nc + 2K) float32, input pixels.

    path: a file written by `kapao export --format onnx` (or `quantize_int8`), whose metadata
    (embedded or in the `.json` sidecar) gives the keypoint schema and stride.
    providers: "cpu" (default) or "cuda" (needs onnxruntime-gpu).
    threads: intra-op threads (None: ONNX Runtime's default). optimization: graph optimisation level.
    exact: demand an fp32 graph (an fp16 or INT8 file is an error) run without fast-math.
    Implements `kapao.runtime.base.Backend`; attributes: schema, stride, fixed_hw ((H, W) of a
    fixed-size graph, else None), name, precision ("fp32" | "fp16" | "int8"), threads, meta.
    """

    supports_tta = False

    def __init__(
        self,
        path: str | Path,
        providers: str | None = None,
        threads: int | None = None,
        optimization: str = "all",
        exact: bool = False,
    ):
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise KapaoError(f"{self.path}: no such file; export one with `kapao export --format onnx`")
        device = providers or "cpu"
        if device not in PROVIDERS:
            raise KapaoError(f"onnxruntime providers {device!r}: use 'cpu' or 'cuda'")
        provider_list = [PROVIDERS[device]] + (["CPUExecutionProvider"] if device == "cuda" else [])
        if PROVIDERS[device] not in ort.get_available_providers():
            raise KapaoError(
                f"{self.path}: ONNX Runtime here has no {PROVIDERS[device]}; "
                "install onnxruntime-gpu for 'cuda', or use providers='cpu'"
            )
        self.threads = threads
        self.session = open_onnx_session(self.path, session_options(threads, optimization, exact), provider_list)
        meta = read_metadata(self.path, self.session)
        self.meta = meta
        self.schema: KeypointSchema = schema_from_metadata(meta, str(self.path))
        self.stride = int(meta["stride"])
        self.precision = str(meta.get("precision", "fp32"))
        self.default_imgsz: int | None = int(meta["default_imgsz"]) if meta.get("default_imgsz") else None
        if exact and self.precision != "fp32":
            raise KapaoError(
                f"{self.path}: exact mode needs an fp32 graph but this file is {self.precision}; "
                "export without --half/--int8 or drop --exact"
            )
        self.name = f"onnxruntime-{device}-{self.precision}"
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1 or len(inputs[0].shape) != 4 or len(outputs[0].shape) not in (0, 3):
            raise KapaoError(
                f"{self.path}: the graph has {len(inputs)} input(s) {[i.shape for i in inputs]} and outputs "
                f"{[o.shape for o in outputs]}; a kapao export has one (B, 3, H, W) input and one (B, N, C) output: "
                "re-export it with `kapao export`"
            )
        inp, out = inputs[0], outputs[0]
        self._input_name, self._output_name = inp.name, out.name
        self._input_dtype = np.float16 if "float16" in inp.type else np.float32
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        h, w = inp.shape[2:4]
        self.fixed_hw: tuple[int, int] | None = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        width = out.shape[-1] if out.shape else None
        if isinstance(width, int):
            check_output_width(self.path, width, self.schema)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, 3, H, W) float32 in [0, 1] -> (B, N, 5 + nc + 2K) float32, input pixels."""
        x = np.asarray(x)
        check_graph_input(self.path, x, self.fixed_hw)
        arr = x.astype(self._input_dtype, copy=False)
        if self._fixed_batch is not None and arr.shape[0] != self._fixed_batch:
            parts = [self._run(arr[i : i + 1]) for i in range(arr.shape[0])]  # fixed batch-1 graph
            out = np.concatenate(parts, 0)
        else:
            out = self._run(arr)
        check_output_width(self.path, out.shape[-1], self.schema)
        return out.astype(np.float32, copy=False)

    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        no_tta(self)

    def _run(self, arr: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self._output_name], {self._input_name: np.ascontiguousarray(arr)})[0]
        except Exception as e:  # ORT's own Fail/InvalidArgument types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise KapaoError(f"{self.path}: ONNX Runtime failed on a {tuple(arr.shape)} input ({first})") from None
