"""The TorchScript backend: runs a file written by `kapao export --format torchscript`."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kapao.errors import KapaoError
from kapao.runtime.export import read_metadata, schema_from_metadata
from kapao.schema import KeypointSchema


class TorchScriptBackend:
    """backend(x (B, 3, H, W) float32 in [0, 1]) -> (B, N, 5 + nc + 2K) float32, input pixels.

    The traced module needs no kapao model code; its metadata (embedded `kapao.json` or the
    sidecar) gives the schema and stride. Any batch and any multiple of the stride are accepted.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.schema: KeypointSchema = schema_from_metadata(self.meta, str(self.path))
        self.stride = int(self.meta["stride"])
        self.precision = str(self.meta.get("precision", "fp32"))
        self.device = torch.device(device)
        self.fixed_hw: tuple[int, int] | None = None
        self.name = f"torchscript-{self.precision}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
                self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as e:
            raise KapaoError(f"{self.path}: not a loadable TorchScript file ({str(e).splitlines()[0]}); re-export it") from None
        self._width = 5 + self.schema.num_classes + 2 * self.schema.num_keypoints

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x.to(self.device, torch.float32))
        if out.shape[-1] != self._width:
            raise KapaoError(
                f"{self.path}: the module outputs {out.shape[-1]} columns but its metadata's keypoint schema "
                f"needs {self._width}; the sidecar belongs to another model: re-export with `kapao export`"
            )
        return out.float()
