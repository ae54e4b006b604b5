"""kapao: KAPAO (Keypoints and Poses as Objects) multi-person pose estimation as a package.

    from kapao import KAPAO
    poses = KAPAO("kapao_s_coco.pt")("img.jpg")
"""

from __future__ import annotations

from typing import Any

from kapao.errors import KapaoError
from kapao.schema import KeypointSchema

__version__ = "0.1.0"

# Heavier parts load on first use, so `import kapao` (and the CLI's start) stays quick and needs no
# PyTorch; the names in _NEEDS_TORCH are the torch layer (`pip install "kapao[torch]"`).
_LAZY = {
    "KAPAO": ("kapao.engine.predictor", "KAPAO"),
    "Poses": ("kapao.results", "Poses"),
    "KapaoModel": ("kapao.models.kapao", "KapaoModel"),
    "build_model": ("kapao.models.kapao", "build_model"),
    "load_weights": ("kapao.weights", "load"),
}
_NEEDS_TORCH = {"KapaoModel", "build_model", "load_weights"}

__all__ = ["KAPAO", "KapaoError", "KapaoModel", "KeypointSchema", "Poses", "build_model", "load_weights", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        if name in _NEEDS_TORCH:
            from kapao.errors import require_torch

            require_torch(f"kapao.{name}")
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kapao' has no attribute {name!r}")
