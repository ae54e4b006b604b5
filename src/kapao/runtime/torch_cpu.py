"""Fast torch inference on CPU: explicit fp32 mode, channels-last, bf16 backbone.

Channels-last (NHWC) lets oneDNN skip its layout reorders around every conv (~15 % faster
forward for kapao-s at 704x1024 here); bf16 uses the AVX512-BF16 units (about 2x the fp32 conv
throughput). The head's output convs and the decode always run in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.runtime.base import Backend, no_tta
from kapao.runtime.torch_backend import as_array, as_tensor

PRECISIONS = ("fp32", "bf16")


def _fp32_knobs() -> list[object]:
    """torch's per-backend fp32 precision settings (torch >= 2.9): oneDNN matmul/conv/rnn (which
    may run fp32 work in bf16 on CPUs with AVX512-BF16/AMX), CUDA matmul, cuDNN conv/rnn (tf32)."""
    b = torch.backends
    knobs = [b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn, b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn]
    return [k for k in knobs if hasattr(k, "fp32_precision")]


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Ask torch explicitly for IEEE fp32 convolutions and matmuls inside the block (no implicit
    bf16 or tf32 by oneDNN, CUDA or cuDNN), restoring the previous settings after."""
    knobs = _fp32_knobs()
    if not knobs:  # torch < 2.9: the legacy switches
        saved_legacy = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved_legacy[0])
            torch.backends.cudnn.allow_tf32 = saved_legacy[1]
        return
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        yield
    finally:
        for k, v in zip(knobs, saved):
            k.fp32_precision = v


class ExactFp32Backend:
    """Wraps a torch backend so that every call runs under `exact_fp32()`: the explicit fp32 mode."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.schema = backend.schema
        self.stride = backend.stride
        self.fixed_hw = backend.fixed_hw
        self.precision = backend.precision
        self.default_imgsz = backend.default_imgsz
        self.supports_tta = backend.supports_tta
        self.name = f"{backend.name}-exact"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with exact_fp32():
            return self.backend(x)

    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        with exact_fp32():
            return self.backend.augmented(x, scales, flips)


class CpuTorchBackend:
    """backend(x (B, 3, H, W) float32 in [0, 1]) -> (B, N, 5 + nc + 2K) float32, input pixels.

    BN fused, inference mode, channels-last; backbone and neck in `precision` ("fp32": run under
    `exact_fp32`; "bf16": weights converted once). The head's output convs and the decode stay
    fp32: bf16 keeps 8 mantissa bits, so a bf16 decode would put keypoints on a 4-8 px grid at
    1024 px and a bf16 head would move them by up to ~5 px.
    """

    def __init__(self, model: KapaoModel, precision: str = "bf16", channels_last: bool = True):
        if precision not in PRECISIONS:
            raise KapaoError(f"torch CPU precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        model = model.eval().fuse().float()
        model.requires_grad_(False)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model.layers.to(self.dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self.schema = model.schema
        self.stride = model.max_stride
        self.fixed_hw: tuple[int, int] | None = None
        self.default_imgsz: int | None = None
        self.supports_tta = False
        self.name = f"torch-{'cl-' if channels_last else ''}{precision}"

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = as_tensor(x, torch.device("cpu"), self.dtype)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp32":
            with exact_fp32():
                return as_array(self.model.head.decode(self.model.forward_raw(t)))
        feats = self.model.features(t)
        return as_array(self.model.head.decode(self.model.head([f.float() for f in feats])))

    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        no_tta(self)
