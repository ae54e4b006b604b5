"""Training hyperparameters: one validated dataclass, loaded from a YAML (`configs/hyps/*.yaml`).

The YAML holds the unscaled loss gains; `scale_hyp` adapts them to the model and data exactly as
the official training script does (3 levels, 80 classes and 640 px are the reference point).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from kapao.config import read_yaml
from kapao.errors import KapaoError

HYP_NAMES = ("hyp.kp-p6", "hyp.kp", "hyp.synth")

# Keys that may be left out of a YAML, with their defaults (everything else is required).
_OPTIONAL = {"label_smoothing": 0.0}
# Probabilities and fractions that must lie in [0, 1].
_UNIT = ("flipud", "fliplr", "mosaic", "mixup", "copy_paste", "hsv_h", "hsv_s", "hsv_v", "translate", "lrf",
         "label_smoothing", "warmup_momentum", "momentum")


@dataclass(frozen=True)
class Hyp:
    """YOLOv5/KAPAO hyperparameters (optimizer, loss gains, augmentation)."""

    lr0: float
    lrf: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    warmup_momentum: float
    warmup_bias_lr: float
    box: float
    cls: float
    cls_pw: float
    obj: float
    obj_pw: float
    kp: float
    iou_t: float
    anchor_t: float
    fl_gamma: float
    hsv_h: float
    hsv_s: float
    hsv_v: float
    degrees: float
    translate: float
    scale: float
    shear: float
    perspective: float
    flipud: float
    fliplr: float
    mosaic: float
    mixup: float
    copy_paste: float
    kp_bbox: float
    label_smoothing: float = 0.0
    source: str = dataclasses.field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        for f in fields(self):
            if f.name == "source":
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise KapaoError(f"{where}: hyp '{f.name}' is {v!r}; expected a number")
            if v != v or v in (float("inf"), float("-inf")):
                raise KapaoError(f"{where}: hyp '{f.name}' is {v}; expected a finite number")
            if v < 0:
                raise KapaoError(f"{where}: hyp '{f.name}' is {v}; it must be >= 0")
            object.__setattr__(self, f.name, float(v))
        for name in _UNIT:
            if getattr(self, name) > 1:
                raise KapaoError(f"{where}: hyp '{name}' is {getattr(self, name)}; expected a value in [0, 1]")
        if self.lr0 <= 0:
            raise KapaoError(f"{where}: hyp 'lr0' must be > 0")
        if self.anchor_t <= 1:
            raise KapaoError(f"{where}: hyp 'anchor_t' is {self.anchor_t}; it must be > 1 (4.0 is usual)")
        if not 0 < self.kp_bbox < 1:
            raise KapaoError(f"{where}: hyp 'kp_bbox' is {self.kp_bbox}; expected a fraction in (0, 1)")

    def to_dict(self) -> dict[str, float]:
        """The hyperparameters as a plain dict (the official `hyp` dict layout)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<memory>") -> "Hyp":
        if not isinstance(d, dict):
            raise KapaoError(f"{source}: a hyp file must be a mapping of name: value")
        known = [f.name for f in fields(cls) if f.name != "source"]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise KapaoError(f"{source}: unknown hyp key(s) {unknown}; known keys: {', '.join(known)}")
        missing = [k for k in known if k not in d and k not in _OPTIONAL]
        if missing:
            raise KapaoError(f"{source}: missing hyp key(s) {missing}; see configs/hyps/hyp.kp-p6.yaml")
        values = {**_OPTIONAL, **d}
        return cls(**values, source=source)


def shipped_hyp_yaml(name: str) -> Path | None:
    """Path of a hyp YAML shipped with kapao (`hyp.kp-p6`, `hyp.kp`), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if not stem.startswith("hyp."):
        stem = f"hyp.{stem}"
    ref = resources.files("kapao") / "configs" / "hyps" / f"{stem}.yaml"
    return Path(str(ref)) if ref.is_file() else None


def load_hyp(path: str | Path = "hyp.kp-p6") -> Hyp:
    """Hyperparameters from a YAML file path or a shipped name (`hyp.kp-p6`, `hyp.kp`)."""
    p = Path(path)
    if not p.is_file():
        shipped = shipped_hyp_yaml(str(path))
        if shipped is None:
            raise KapaoError(f"{path}: hyp YAML not found; give a file path or one of: {', '.join(HYP_NAMES)}")
        p = shipped
    data = read_yaml(p)
    return Hyp.from_dict(data if data is not None else {}, source=str(p))


def scale_hyp(hyp: Hyp, num_levels: int, num_classes: int, imgsz: int, label_smoothing: float = 0.0) -> Hyp:
    """Loss gains for a model with `num_levels` output levels, `num_classes` classes (1 + K) and
    training size `imgsz`, as the official train.py scales them (same float operations, so the
    values are bit-identical): box, kp x 3/nl; cls x nc/80 x 3/nl; obj x (imgsz/640)^2 x 3/nl."""
    if num_levels < 1 or num_classes < 1 or imgsz < 1:
        raise KapaoError(f"scale_hyp: num_levels, num_classes and imgsz must be >= 1 "
                         f"(got {num_levels}, {num_classes}, {imgsz})")
    nl = num_levels
    return dataclasses.replace(
        hyp,
        box=hyp.box * (3.0 / nl),
        cls=hyp.cls * (num_classes / 80.0 * 3.0 / nl),
        obj=hyp.obj * ((imgsz / 640) ** 2 * 3.0 / nl),
        kp=hyp.kp * (3.0 / nl),
        label_smoothing=float(label_smoothing),
    )
