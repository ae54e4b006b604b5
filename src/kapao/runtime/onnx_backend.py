"""The ONNX Runtime backend: runs an exported kapao ONNX file (fp32, fp16 or INT8) on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kapao.errors import KapaoError
from kapao.runtime.export import check_graph_input, read_metadata, schema_from_metadata
from kapao.schema import KeypointSchema

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise KapaoError("the onnxruntime backend needs ONNX Runtime: pip install 'kapao[onnx]'") from None
    return onnxruntime


def session_options(threads: int | None = None, optimization: str = "all", exact: bool = False) -> Any:
    """ONNX Runtime session options: graph optimisation level, intra-op threads (None: ORT's
    default, one per physical core), sequential execution (the graph is a chain; inter-op threads
    only contend with intra-op ones on few cores), no thread spinning. exact: forbid MLAS' bf16 fast-math GEMM, the one
    place ORT would lower fp32 precision on its own."""
    ort = _import_ort()
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
    Attributes: schema, stride, fixed_hw ((H, W) of a fixed-size graph, else None), name,
    precision ("fp32" | "fp16" | "int8"), threads (as configured).
    """

    def __init__(
        self,
        path: str | Path,
        providers: str | None = None,
        threads: int | None = None,
        optimization: str = "all",
        exact: bool = False,
    ):
        ort = _import_ort()
        self.path = Path(path)
        meta = read_metadata(self.path)
        self.meta = meta
        self.schema: KeypointSchema = schema_from_metadata(meta, str(self.path))
        self.stride = int(meta["stride"])
        self.precision = str(meta.get("precision", "fp32"))
        if exact and self.precision != "fp32":
            raise KapaoError(
                f"{self.path}: exact mode needs an fp32 graph but this file is {self.precision}; "
                "export without --half/--int8 or drop --exact"
            )
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
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads, optimization, exact), providers=provider_list
            )
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise KapaoError(f"{self.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]}); re-export it") from None
        self.name = f"onnxruntime-{device}-{self.precision}"
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self._input_name, self._output_name = inp.name, out.name
        self._input_dtype = np.float16 if "float16" in inp.type else np.float32
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        h, w = inp.shape[2:4]
        self.fixed_hw: tuple[int, int] | None = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        self._width = 5 + self.schema.num_classes + 2 * self.schema.num_keypoints
        width = out.shape[-1] if out.shape else None
        if isinstance(width, int):
            self._check_width(width)

    def _check_width(self, width: int) -> None:
        if width != self._width:
            s = self.schema
            raise KapaoError(
                f"{self.path}: the graph outputs {width} columns but its metadata's keypoint schema "
                f"(K={s.num_keypoints}) needs {self._width} (5 + {s.num_classes} classes + {2 * s.num_keypoints} "
                "coordinates); the sidecar belongs to another model: re-export with `kapao export`"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) float in [0, 1] -> (B, N, 5 + nc + 2K) float32 (on the CPU)."""
        check_graph_input(self.path, x, self.fixed_hw)
        arr = x.detach().cpu().numpy().astype(self._input_dtype, copy=False)
        if self._fixed_batch is not None and arr.shape[0] != self._fixed_batch:
            parts = [self._run(arr[i : i + 1]) for i in range(arr.shape[0])]  # fixed batch-1 graph
            out = np.concatenate(parts, 0)
        else:
            out = self._run(arr)
        self._check_width(out.shape[-1])
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def _run(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run([self._output_name], {self._input_name: np.ascontiguousarray(arr)})[0]
