"""Weights that ship inside the package (no download): the CPU-trained kapao-n model.

`kapao_n_synth` is kapao-n trained from scratch on `kapao synth` scenes (COCO-17 keypoints) with
`hyp.synth`; its recipe and metrics are stored in the file's metadata (`kapao convert`/`load`
show them). It is the default model of `kapao predict`, the API and `make demo`.

It ships twice: `kapao_n_synth.safetensors` (the weights, fp16; the torch layer) and
`kapao_n_synth.onnx`, its dynamic-shape ONNX export for ONNX Runtime, which needs no PyTorch. The
ONNX file is lossless (BatchNorm unfolded, fp16-exact weights stored as fp16 + Cast: see
`kapao.runtime.onnx_compact`) and records the sha256 of the safetensors it came from;
`export_shipped_onnx()` re-creates it (`make shipped-onnx`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kapao.errors import KapaoError, require_torch

SHIPPED = {"kapao_n_synth": "kapao_n_synth.safetensors"}
SHIPPED_ONNX = {"kapao_n_synth": "kapao_n_synth.onnx"}
DEFAULT = "kapao_n_synth"


def _asset(filename: str) -> Path | None:
    ref = resources.files("kapao") / "assets" / filename
    return Path(str(ref)) if ref.is_file() else None


def shipped_weights(name: str) -> Path | None:
    """Path of a shipped weights file by name (with or without suffix), or None."""
    stem = name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".pt")) else name
    return _asset(SHIPPED[stem]) if stem in SHIPPED else None


def shipped_onnx(name: str = DEFAULT) -> Path | None:
    """Path of the shipped ONNX export of a shipped model (`kapao_n_synth`, with or without a
    suffix), or None when there is none installed. Needs no torch."""
    stem = name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".pt", ".onnx")) else name
    return _asset(SHIPPED_ONNX[stem]) if stem in SHIPPED_ONNX else None


def default_weights() -> Path:
    path = shipped_weights(DEFAULT)
    if path is None:
        raise KapaoError(f"the default model {DEFAULT} is not installed with this package; pass --weights")
    return path


def demo_images() -> list[Path]:
    """The synthetic scenes shipped for `make demo` (held out from the model's training set)."""
    folder = resources.files("kapao") / "assets" / "demo"
    return sorted(Path(str(p)) for p in folder.iterdir() if str(p).endswith(".jpg")) if folder.is_dir() else []


def export_shipped_onnx(out: str | Path, name: str = DEFAULT) -> Path:
    """Write the ONNX export of shipped model `name` to `out` (needs kapao[torch]); returns `out`.

    The graph is what `kapao export --weights kapao_n_synth --format onnx --dynamic --compact
    --imgsz 256` writes: batch, height and width symbolic, traced at the size the model was trained
    at (256), fp32 computation on the stored fp16 weights. The embedded metadata adds
    `default_imgsz` (256), `source_weights`, `weights_sha256` (the safetensors file's, so a stale
    copy is detectable without torch) and `weights_info` (its training recipe and best AP). No
    sidecar: the metadata is inside the file.
    """
    require_torch("exporting the shipped model to ONNX")
    import tempfile

    from kapao.runtime.export import export_onnx
    from kapao.weights.download import sha256_of
    from kapao.weights.loader import load

    src = shipped_weights(name)
    if src is None:
        raise KapaoError(f"{name}: not a shipped model, or its weights are not installed; known: {', '.join(SHIPPED)}")
    model, meta = load(src)
    trained = int((meta.info.get("recipe") or {}).get("imgsz") or 256)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"default_imgsz": trained, "source_weights": src.name, "weights_sha256": sha256_of(src),
             "weights_info": meta.info}  # recipe and best AP: what `kapao demo` prints, torch or not
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        written = export_onnx(model, Path(tmp) / out.name, imgsz=trained, dynamic=True, compact=True,
                              extra_metadata=extra)
        written.chmod(0o644)  # a package file, readable by all (the exporter's temp file is 0600)
        written.replace(out)  # same folder: an atomic rename; the sidecar goes with the temp folder
    return out
