"""Model weights: official KAPAO checkpoints (read safely), kapao's own format, the registry.

model, meta = kapao.weights.load("kapao_s_coco")          # registry name, cached download
model, meta = kapao.weights.load("path/kapao_s_coco.pt")  # official checkpoint
kapao.weights.save(model, "kapao_s_coco.safetensors", info={"source": "official"})
"""

from kapao.weights.checkpoint import save
from kapao.weights.download import cache_dir, fetch
from kapao.weights.loader import WeightsMeta, load
from kapao.weights.registry import REGISTRY, RegisteredWeights
from kapao.weights.shipped import default_weights, demo_images, shipped_weights

__all__ = [
    "REGISTRY", "RegisteredWeights", "WeightsMeta", "cache_dir", "default_weights", "demo_images", "fetch", "load",
    "save", "shipped_weights",
]
