"""The one interface every inference backend implements, so that callers never branch on its type.

A backend maps a preprocessed batch to the raw prediction rows that `kapao.postprocess` turns into
`Poses`:

    x    (B, 3, H, W) float32 RGB in [0, 1], letterboxed to multiples of `stride` (NumPy)
    ->   (B, N, 5 + nc + 2K) float32 rows `[cx, cy, w, h, obj, cls_0..cls_K, kx_1, ky_1, ...]`
         in input (letterboxed) pixels, nc = 1 + K, ordered level -> anchor -> y -> x

Input-shape policy: `fixed_hw` is the (H, W) a fixed-size graph was exported at (every image is
letterboxed to exactly that size), or None for a dynamic graph / eager model (each image gets the
smallest stride multiple that holds it, as the official demo does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from kapao.schema import KeypointSchema

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@runtime_checkable
class Backend(Protocol):
    """What predict, val, the app, the benchmark and INT8 calibration need of a runtime.

    name:          display name, e.g. "onnxruntime-cpu-fp32" (printed in run summaries, stored in
                   `Poses.backend` and in metrics metadata)
    schema:        the keypoint set the model predicts
    stride:        the largest stride; inputs are multiples of it
    fixed_hw:      (H, W) of a fixed-size graph, or None (dynamic)
    precision:     "fp32" | "fp16" | "bf16" | "int8"
    default_imgsz: the size the weights were trained at when known (None: the caller's default)
    supports_tta:  whether `augmented` runs test-time augmentation (only the torch backend does)
    """

    name: str
    schema: KeypointSchema
    stride: int
    fixed_hw: tuple[int, int] | None
    precision: str
    default_imgsz: int | None
    supports_tta: bool

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 in [0, 1] -> (B, N, 5 + nc + 2K) float32 in input pixels."""
        ...

    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        """Test-time augmentation (official `scale_img` + flips, merged rows); backends that
        cannot run it raise KapaoError."""
        ...


def no_tta(backend: Backend) -> NoReturn:
    """The one error for test-time augmentation on a backend that has none."""
    from kapao.errors import KapaoError

    raise KapaoError(
        f"test-time augmentation (--scales/--flips) runs on the torch backend, not {backend.name}; "
        "drop --backend (auto picks torch for TTA) or pass --backend torch"
    )
