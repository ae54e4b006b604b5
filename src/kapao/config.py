"""Model configs: YAML files shipped as package data (`kapao-n/s/m/l`), validated once at load."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kapao.errors import KapaoError

BLOCKS = ("Focus", "Conv", "C3", "SPP", "Upsample", "Concat")


def read_yaml(path: Path) -> Any:
    """The parsed YAML file, or a one-line KapaoError naming the file (for every config kind)."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise KapaoError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KapaoError(f"{path}: cannot be read ({e}); check the file") from None
MODEL_NAMES = ("kapao-n", "kapao-s", "kapao-m", "kapao-l")


@dataclass(frozen=True)
class LayerSpec:
    """One layer: inputs (`-1` = previous layer), repeats before depth scaling, block name, args."""

    sources: tuple[int, ...]
    repeats: int
    block: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    depth_multiple: float
    width_multiple: float
    anchors: tuple[tuple[float, ...], ...]  # per level: (w0, h0, w1, h1, ...) in input pixels
    layers: tuple[LayerSpec, ...]  # backbone then neck, indexed as the official `model.<i>`
    head_from: tuple[int, ...]

    @property
    def num_levels(self) -> int:
        return len(self.head_from)

    @property
    def anchors_per_level(self) -> int:
        return len(self.anchors[0]) // 2

    def to_dict(self) -> dict[str, Any]:
        def spec(s: LayerSpec) -> list[Any]:
            src: Any = s.sources[0] if len(s.sources) == 1 else list(s.sources)
            return [src, s.repeats, s.block, list(s.args)]

        return {
            "name": self.name,
            "depth_multiple": self.depth_multiple,
            "width_multiple": self.width_multiple,
            "anchors": [list(a) for a in self.anchors],
            "layers": [spec(s) for s in self.layers],
            "head_from": list(self.head_from),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<memory>") -> "ModelConfig":
        if not isinstance(d, dict):
            raise KapaoError(f"{source}: a model config must be a mapping")
        missing = [k for k in ("depth_multiple", "width_multiple", "anchors", "head_from") if k not in d]
        if "layers" not in d and "backbone" not in d:
            missing.append("backbone")
        if missing:
            raise KapaoError(f"{source}: model config is missing {missing}; see configs/models/kapao-s.yaml")
        raw_layers = list(d["layers"]) if "layers" in d else list(d["backbone"]) + list(d.get("neck") or [])
        layers = []
        for i, row in enumerate(raw_layers):
            if not (isinstance(row, (list, tuple)) and len(row) == 4):
                raise KapaoError(f"{source}: layer {i} must be [from, repeats, block, args], got {row!r}")
            src, n, block, args = row
            sources = tuple(int(s) for s in (src if isinstance(src, (list, tuple)) else [src]))
            if block not in BLOCKS:
                raise KapaoError(f"{source}: layer {i} uses unknown block {block!r}; known: {', '.join(BLOCKS)}")
            for s in sources:
                if s >= i or (s < 0 and s != -1):
                    raise KapaoError(f"{source}: layer {i} reads from {s}; use -1 or an earlier layer index")
            layers.append(LayerSpec(sources, int(n), str(block), tuple(args or ())))
        anchors = tuple(tuple(float(v) for v in a) for a in d["anchors"])
        if not anchors or any(len(a) != len(anchors[0]) or len(a) % 2 for a in anchors):
            raise KapaoError(f"{source}: 'anchors' must be one list of (w, h) pairs per level, same count each")
        head_from = tuple(int(i) for i in d["head_from"])
        if len(head_from) != len(anchors):
            raise KapaoError(f"{source}: 'head_from' has {len(head_from)} levels but 'anchors' has {len(anchors)}")
        if any(not 0 <= i < len(layers) for i in head_from):
            raise KapaoError(f"{source}: 'head_from' indices must name layers 0..{len(layers) - 1}")
        return cls(
            name=str(d.get("name", Path(source).stem)),
            depth_multiple=float(d["depth_multiple"]),
            width_multiple=float(d["width_multiple"]),
            anchors=anchors,
            layers=tuple(layers),
            head_from=head_from,
        )


def shipped_model_config(name: str) -> Path | None:
    stem = name[:-5] if name.endswith(".yaml") else name
    ref = resources.files("kapao") / "configs" / "models" / f"{stem}.yaml"
    return Path(str(ref)) if ref.is_file() else None


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A shipped config by name (`kapao-s`) or a YAML file path."""
    p = Path(name_or_path)
    if not p.is_file():
        shipped = shipped_model_config(str(name_or_path))
        if shipped is None:
            raise KapaoError(
                f"{name_or_path}: unknown model config; use one of {', '.join(MODEL_NAMES)} or a YAML path"
            )
        p = shipped
    return ModelConfig.from_dict(read_yaml(p), source=str(p))
