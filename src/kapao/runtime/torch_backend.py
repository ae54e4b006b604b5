"""The PyTorch backend: a KapaoModel prepared for inference (fused BN, eval, optional fp16).

Torch layer (`pip install "kapao[torch]"`): the inference core reaches it only through
`kapao.runtime.factory.create_backend`. Input and output are NumPy arrays like every backend's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kapao.models.kapao import KapaoModel
from kapao.schema import KeypointSchema


def as_tensor(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A (B, 3, H, W) batch as a tensor on `device` (no copy for a contiguous float32 CPU array)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device, dtype)


def as_array(y: torch.Tensor) -> np.ndarray:
    """Raw rows back to a float32 NumPy array on the CPU."""
    return y.detach().float().cpu().numpy()


class TorchBackend:
    """backend(x (B, 3, H, W) float32 in [0, 1]) -> decoded predictions (B, N, 5 + nc + 2K), input pixels.

    BatchNorm is folded into the convs as the official loader does (`fuse=True`), so outputs match
    the official demo/val numbers; `half` runs fp16 on CUDA only (CPU fp16 convs are slow or missing).
    The one backend with test-time augmentation (`augmented`).
    """

    fixed_hw: tuple[int, int] | None = None
    supports_tta = True

    def __init__(self, model: KapaoModel, device: str | torch.device = "cpu", half: bool = False, fuse: bool = True):
        self.device = torch.device(device)
        self.half = bool(half) and self.device.type == "cuda"
        model = model.to(self.device).eval()
        if fuse:
            model.fuse()
        self.model = model.half() if self.half else model.float()
        self.model.requires_grad_(False)
        self.schema: KeypointSchema = model.schema
        self.stride = model.max_stride
        self.precision = "fp16" if self.half else "fp32"
        self.name = f"torch-{self.device.type}-{self.precision}"
        self.default_imgsz: int | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return as_array(self.model(as_tensor(x, self.device, self.dtype)))

    @torch.inference_mode()
    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        """The official TTA: each scale/flip pass de-augmented and their rows concatenated."""
        t = as_tensor(x, self.device, self.dtype)
        return as_array(self.model(t, augment=True, scales=scales, flips=flips))
