"""The TorchScript backend: runs a file written by `kapao export --format torchscript`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kapao.errors import KapaoError
from kapao.runtime.base import no_tta
from kapao.runtime.metadata import check_output_width, read_metadata, schema_from_metadata
from kapao.runtime.torch_backend import as_array, as_tensor
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
        self.default_imgsz: int | None = None
        self.supports_tta = False
        self.name = f"torchscript-{self.precision}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
                self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as e:
            raise KapaoError(f"{self.path}: not a loadable TorchScript file ({str(e).splitlines()[0]}); re-export it") from None

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = as_array(self.module(as_tensor(x, self.device, torch.float32)))
        check_output_width(self.path, out.shape[-1], self.schema)
        return out

    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        no_tta(self)
