"""Weights that ship inside the package (no download): the CPU-trained kapao-n model.

`kapao_n_synth` is kapao-n trained from scratch on `kapao synth` scenes (COCO-17 keypoints) with
`hyp.synth`; its recipe and metrics are stored in the file's metadata (`kapao convert`/`load`
show them). It is the default model of `kapao predict`, the API and `make demo`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kapao.errors import KapaoError

SHIPPED = {"kapao_n_synth": "kapao_n_synth.safetensors"}
DEFAULT = "kapao_n_synth"


def shipped_weights(name: str) -> Path | None:
    """Path of a shipped weights file by name (with or without suffix), or None."""
    stem = name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".pt")) else name
    if stem not in SHIPPED:
        return None
    ref = resources.files("kapao") / "assets" / SHIPPED[stem]
    return Path(str(ref)) if ref.is_file() else None


def default_weights() -> Path:
    path = shipped_weights(DEFAULT)
    if path is None:
        raise KapaoError(f"the default model {DEFAULT} is not installed with this package; pass --weights")
    return path


def demo_images() -> list[Path]:
    """The synthetic scenes shipped for `make demo` (held out from the model's training set)."""
    folder = resources.files("kapao") / "assets" / "demo"
    return sorted(Path(str(p)) for p in folder.iterdir() if str(p).endswith(".jpg")) if folder.is_dir() else []
