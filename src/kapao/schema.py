"""The keypoint schema: what the K keypoints are, as data.

One validated object, built from the `keypoints:` section of a data YAML, carries everything that
depends on the keypoint set (names, left-right flip index, skeleton, OKS sigmas, keypoint-object
size, colours). Training, val, drawing and export read it from here, never from constants.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kapao.config import read_yaml
from kapao.errors import KapaoError


def _default_colors(num_keypoints: int) -> list[tuple[int, int, int]]:
    """Evenly spaced hues (BGR) so every keypoint type is distinguishable."""
    colors = []
    for k in range(num_keypoints):
        r, g, b = colorsys.hsv_to_rgb(k / max(num_keypoints, 1), 0.85, 1.0)
        colors.append((int(b * 255), int(g * 255), int(r * 255)))
    return colors


@dataclass(frozen=True)
class KeypointSchema:
    """The keypoint set of a dataset and model (K keypoints, classes = 1 + K)."""

    names: tuple[str, ...]
    flip_index: tuple[int, ...]
    skeleton: tuple[tuple[int, int], ...] = ()
    oks_sigmas: tuple[float, ...] = ()
    kp_bbox: float = 0.05
    face: tuple[int, ...] = ()
    colors: tuple[tuple[int, int, int], ...] = field(default=())
    evaluator: str = "coco"
    source: str = "<memory>"

    def __post_init__(self) -> None:
        k = len(self.names)
        where = self.source
        if k == 0:
            raise KapaoError(f"{where}: keypoints.names is empty; list one name per keypoint")
        if len(set(self.names)) != k:
            raise KapaoError(f"{where}: keypoints.names has duplicates; names must be unique")
        if len(self.flip_index) != k:
            raise KapaoError(
                f"{where}: 'flip_index' has {len(self.flip_index)} entries, expected {k} (one per keypoint)"
            )
        if sorted(self.flip_index) != list(range(k)) or any(
            self.flip_index[self.flip_index[i]] != i for i in range(k)
        ):
            raise KapaoError(
                f"{where}: 'flip_index' must be a permutation of 0..{k - 1} that is its own inverse "
                "(left and right swap in pairs)"
            )
        for a, b in self.skeleton:
            if not (0 <= a < k and 0 <= b < k):
                raise KapaoError(f"{where}: skeleton edge [{a}, {b}] is outside 0..{k - 1} (use 0-based indices)")
        if self.oks_sigmas and len(self.oks_sigmas) != k:
            raise KapaoError(f"{where}: 'oks_sigmas' has {len(self.oks_sigmas)} entries, expected {k}")
        if any(s <= 0 for s in self.oks_sigmas):
            raise KapaoError(f"{where}: 'oks_sigmas' must all be > 0")
        if not 0 < self.kp_bbox < 1:
            raise KapaoError(f"{where}: 'kp_bbox' is {self.kp_bbox}; expected a fraction in (0, 1)")
        if any(not 0 <= i < k for i in self.face):
            raise KapaoError(f"{where}: 'face' indices must be in 0..{k - 1}")
        if self.colors and len(self.colors) != k:
            raise KapaoError(f"{where}: 'colors' has {len(self.colors)} entries, expected {k}")
        if self.evaluator not in ("coco", "crowdpose"):
            raise KapaoError(f"{where}: 'evaluator' is {self.evaluator!r}; use 'coco' or 'crowdpose'")
        if not self.colors:
            object.__setattr__(self, "colors", tuple(_default_colors(k)))

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """Person class + one keypoint-object class per keypoint."""
        return 1 + len(self.names)

    @property
    def class_names(self) -> list[str]:
        return ["person", *self.names]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "flip_index": list(self.flip_index),
            "skeleton": [list(e) for e in self.skeleton],
            "oks_sigmas": list(self.oks_sigmas),
            "kp_bbox": self.kp_bbox,
            "face": list(self.face),
            "colors": [list(c) for c in self.colors],
            "evaluator": self.evaluator,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<memory>") -> "KeypointSchema":
        if not isinstance(d, dict):
            raise KapaoError(f"{source}: 'keypoints' must be a mapping with names, flip_index, ...")
        unknown = set(d) - {"names", "flip_index", "skeleton", "oks_sigmas", "kp_bbox", "face", "colors", "evaluator"}
        if unknown:
            raise KapaoError(f"{source}: unknown keypoints field(s) {sorted(unknown)}")
        for required in ("names", "flip_index"):
            if required not in d:
                raise KapaoError(f"{source}: keypoints.{required} is missing")
        try:
            return cls(
                names=tuple(str(n) for n in d["names"]),
                flip_index=tuple(int(i) for i in d["flip_index"]),
                skeleton=tuple((int(a), int(b)) for a, b in d.get("skeleton") or ()),
                oks_sigmas=tuple(float(s) for s in d.get("oks_sigmas") or ()),
                kp_bbox=float(d.get("kp_bbox", 0.05)),
                face=tuple(int(i) for i in d.get("face") or ()),
                colors=tuple(tuple(int(c) for c in col) for col in d.get("colors") or ()),
                evaluator=str(d.get("evaluator", "coco")),
                source=source,
            )
        except (TypeError, ValueError) as e:
            raise KapaoError(f"{source}: malformed keypoints section ({e})") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "KeypointSchema":
        """Schema from a data YAML (its `keypoints:` section), a file path or a shipped name."""
        data, source = load_data_yaml(path)
        if "keypoints" not in data:
            raise KapaoError(f"{source}: no 'keypoints:' section; see configs/data/coco-kp.yaml for the format")
        return cls.from_dict(data["keypoints"], source=source)


def shipped_data_yaml(name: str) -> Path | None:
    """Path of a data YAML shipped with kapao (`coco-kp`, `crowdpose`), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    ref = resources.files("kapao") / "configs" / "data" / f"{stem}.yaml"
    return Path(str(ref)) if ref.is_file() else None


def load_data_yaml(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read a data YAML given as a path or the name of a shipped one; returns (dict, source name)."""
    p = Path(path)
    if not p.is_file():
        shipped = shipped_data_yaml(str(path))
        if shipped is None:
            raise KapaoError(f"{path}: data YAML not found; give a file path or one of: coco-kp, crowdpose")
        p = shipped
    data = read_yaml(p)
    if not isinstance(data, dict):
        raise KapaoError(f"{p}: expected a mapping at the top level of the data YAML")
    return data, str(p)


def coco_schema() -> KeypointSchema:
    return KeypointSchema.from_yaml("coco-kp")


def crowdpose_schema() -> KeypointSchema:
    return KeypointSchema.from_yaml("crowdpose")
