"""kapao's own weights file: safetensors with the config, schema and free-form info as metadata.

One file rebuilds the model: tensors under our parameter names (`layers.<i>...`, `head.*`), and
string metadata `format`, `format_version`, `model_config` (JSON of `ModelConfig.to_dict()`),
`schema` (JSON of `KeypointSchema.to_dict()`) and `info` (JSON; training recipe, metrics, origin).
Safetensors holds no code, so loading it is safe by construction.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kapao.config import ModelConfig
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.models.layers import Conv
from kapao.schema import KeypointSchema

FORMAT = "kapao-weights"
FORMAT_VERSION = 1
# Kept float32 even in half files: they are rebuilt from the config and must stay exact.
_FP32_SUFFIXES = ("head.anchors", "head.anchor_grid")


@dataclass(frozen=True)
class KapaoCheckpoint:
    state_dict: dict[str, torch.Tensor]  # our keys, stored dtypes
    config: ModelConfig
    schema: KeypointSchema
    info: dict[str, Any]


def is_safetensors(head: bytes) -> bool:
    """True if the first bytes look like a safetensors header (u64 length, then a JSON object)."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def save(model: KapaoModel, path: str | Path, info: dict[str, Any] | None = None, half: bool = True) -> Path:
    """Write `model` (unfused) to `path` atomically; fp16 floats when `half` (anchors stay fp32).

    `info` is free-form JSON-serializable data kept with the weights (recipe, metrics, origin).
    """
    path = Path(path)
    if any(isinstance(m, Conv) and isinstance(m.bn, torch.nn.Identity) for m in model.modules()):
        raise KapaoError(f"{path}: refusing to save a fused model (BatchNorm folded away); save it before .fuse()")
    try:
        info_json = json.dumps(info or {}, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise KapaoError(f"{path}: info must be JSON-serializable ({e})") from None
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if half and v.is_floating_point() and not k.endswith(_FP32_SUFFIXES):
            v = v.half()
        tensors[k] = v.contiguous().clone()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(model.cfg.to_dict()),
        "schema": json.dumps(model.schema.to_dict()),
        "info": info_json,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KapaoError(f"{path}: cannot write here ({e.strerror}); choose another output path") from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)  # replaces the file, so the mode is set after
        os.chmod(tmp, 0o644)  # weights are shared files, not secrets (mkstemp makes them private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | Path) -> KapaoCheckpoint:
    """Read a file written by `save`. Raises KapaoError for truncated or foreign files."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise KapaoError(
                    f"{path}: a safetensors file without kapao metadata; "
                    "write it with kapao convert or kapao.weights.save"
                )
            if int(meta.get("format_version", "0")) > FORMAT_VERSION:
                raise KapaoError(f"{path}: written by a newer kapao (format {meta['format_version']}); upgrade kapao")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise KapaoError(f"{path}: truncated or corrupt weights file ({e}); write or download it again") from None
    try:
        cfg_d, schema_d, info = (json.loads(meta[k]) for k in ("model_config", "schema", "info"))
    except (KeyError, json.JSONDecodeError) as e:
        raise KapaoError(f"{path}: damaged kapao metadata ({e}); write the file again with kapao convert") from None
    config = ModelConfig.from_dict(cfg_d, source=str(path))
    schema = KeypointSchema.from_dict(schema_d, source=str(path))
    return KapaoCheckpoint(state, config, schema, info if isinstance(info, dict) else {})
