"""The PyTorch backend: a KapaoModel prepared for inference (fused BN, eval, optional fp16)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kapao.models.kapao import KapaoModel
from kapao.schema import KeypointSchema


class TorchBackend:
    """backend(x (B, 3, H, W) float in [0, 1]) -> decoded predictions (B, N, 5 + nc + 2K), input pixels.

    BatchNorm is folded into the convs as the official loader does (`fuse=True`), so outputs match
    the official demo/val numbers; `half` runs fp16 on CUDA only (CPU fp16 convs are slow or missing).
    """

    name = "torch"
    fixed_hw: tuple[int, int] | None = None

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

    @torch.inference_mode()
    def __call__(
        self,
        x: torch.Tensor,
        scales: Sequence[float] | None = None,
        flips: Sequence[int | None] | None = None,
    ) -> torch.Tensor:
        x = x.to(self.device, torch.float16 if self.half else torch.float32)
        if scales and (list(scales) != [1] or any(flips or [])):
            out = self.model(x, augment=True, scales=scales, flips=flips)
        else:
            out = self.model(x)
        return out.float()
