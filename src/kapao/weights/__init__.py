"""Model weights: official KAPAO checkpoints (read safely), kapao's own format, the registry.

model, meta = kapao.weights.load("kapao_s_coco")          # registry name, cached download
model, meta = kapao.weights.load("path/kapao_s_coco.pt")  # official checkpoint
kapao.weights.save(model, "kapao_s_coco.safetensors", info={"source": "official"})
kapao.weights.shipped_onnx()                               # the shipped model as ONNX (no torch)

Names load on first use: the registry, downloads and the shipped files need no PyTorch; `load`,
`save` and `WeightsMeta` are the torch layer (`pip install "kapao[torch]"`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kapao.weights.checkpoint import save
    from kapao.weights.download import cache_dir, fetch
    from kapao.weights.loader import WeightsMeta, load
    from kapao.weights.registry import REGISTRY, RegisteredWeights
    from kapao.weights.shipped import default_weights, demo_images, shipped_onnx, shipped_weights

# name -> (module, needs torch)
_LAZY: dict[str, tuple[str, bool]] = {
    "save": ("kapao.weights.checkpoint", True),
    "WeightsMeta": ("kapao.weights.loader", True),
    "load": ("kapao.weights.loader", True),
    "cache_dir": ("kapao.weights.download", False),
    "fetch": ("kapao.weights.download", False),
    "REGISTRY": ("kapao.weights.registry", False),
    "RegisteredWeights": ("kapao.weights.registry", False),
    "default_weights": ("kapao.weights.shipped", False),
    "demo_images": ("kapao.weights.shipped", False),
    "shipped_onnx": ("kapao.weights.shipped", False),
    "shipped_weights": ("kapao.weights.shipped", False),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kapao.weights' has no attribute {name!r}")
    module, needs_torch = _LAZY[name]
    if needs_torch:
        from kapao.errors import require_torch

        require_torch(f"kapao.weights.{name} (torch weights: .pt, .safetensors, registry names)")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
