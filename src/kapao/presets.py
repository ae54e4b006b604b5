"""Post-processing presets: the one place that owns the val and demo thresholds.

The official code repeats its thresholds in val.py, demos/image.py and demos/video.py with
different defaults; here each set is a named, frozen, printable `Preset`, and every caller
(predict, val, demos, the app) takes `get_preset(name, **overrides)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from types import MappingProxyType
from typing import Any

from kapao.errors import KapaoError


@dataclass(frozen=True)
class Preset:
    """Thresholds for NMS and keypoint-object fusion (see `kapao.postprocess`).

    conf_thres / iou_thres:       person (and combined) NMS: obj > conf, obj*cls > conf, IoU
    conf_thres_kp / iou_thres_kp: keypoint-object NMS
    conf_thres_kp_person:         only persons scoring above this receive keypoint objects
    overwrite_tol:                a keypoint object replaces a pose keypoint only if it is closer
                                  than this (original-image pixels) and more confident
    use_kp_dets:                  fuse keypoint objects into poses at all
    max_det / max_nms:            cap on kept detections per NMS call / boxes entering NMS
    clip_all_keypoints:           False = official behaviour (only keypoints 0 and 1 are clipped
                                  to the image); True clips every keypoint
    """

    name: str
    conf_thres: float
    iou_thres: float
    conf_thres_kp: float
    iou_thres_kp: float
    conf_thres_kp_person: float
    overwrite_tol: float
    use_kp_dets: bool = True
    max_det: int = 300
    max_nms: int = 30000
    clip_all_keypoints: bool = False

    def __post_init__(self) -> None:
        where = f"preset {self.name!r}"
        for f in ("conf_thres", "iou_thres", "conf_thres_kp", "iou_thres_kp", "conf_thres_kp_person"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise KapaoError(f"{where}: {f} is {v!r}; use a number in [0, 1]")
        tol = self.overwrite_tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise KapaoError(f"{where}: overwrite_tol is {tol!r}; use a positive distance in pixels")
        for f in ("max_det", "max_nms"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KapaoError(f"{where}: {f} is {v!r}; use a positive integer")
        for f in ("use_kp_dets", "clip_all_keypoints"):
            if not isinstance(getattr(self, f), bool):
                raise KapaoError(f"{where}: {f} is {getattr(self, f)!r}; use true or false")

    @property
    def combined_nms(self) -> bool:
        """The official `run_nms` rule: one NMS call for persons and keypoint objects when the IoU
        thresholds are equal and the keypoint confidence threshold is not below the person one."""
        return self.iou_thres == self.iou_thres_kp and self.conf_thres_kp >= self.conf_thres

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        width = max(len(f.name) for f in fields(self))
        lines = [f"preset {self.name}"]
        lines += [f"  {f.name:<{width}}  {getattr(self, f.name)}" for f in fields(self) if f.name != "name"]
        lines.append(f"  {'(nms)':<{width}}  {'combined' if self.combined_nms else 'separate'}")
        return "\n".join(lines)


_PRESETS = MappingProxyType(
    {
        # val.py defaults
        "val": Preset("val", conf_thres=0.001, iou_thres=0.65, conf_thres_kp=0.2, iou_thres_kp=0.25,
                      conf_thres_kp_person=0.3, overwrite_tol=50),
        # demos/image.py defaults
        "demo": Preset("demo", conf_thres=0.7, iou_thres=0.45, conf_thres_kp=0.5, iou_thres_kp=0.45,
                       conf_thres_kp_person=0.2, overwrite_tol=25),
        # demos/video.py defaults (lower person threshold, wider tolerance: combined NMS)
        "demo_video": Preset("demo_video", conf_thres=0.5, iou_thres=0.45, conf_thres_kp=0.5, iou_thres_kp=0.45,
                             conf_thres_kp_person=0.2, overwrite_tol=50),
    }
)


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str | Preset = "demo", **overrides: Any) -> Preset:
    """The named preset (`val`, `demo`, `demo_video`) or a given Preset, with fields overridden.

    Overrides whose value is None are ignored, so CLI options left unset fall through.
    """
    if isinstance(name, Preset):
        base = name
    else:
        if name not in _PRESETS:
            raise KapaoError(f"unknown preset {name!r}; choose one of: {', '.join(_PRESETS)}")
        base = _PRESETS[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(Preset)} - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KapaoError(f"preset {base.name!r}: unknown field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
    return replace(base, **overrides) if overrides else base
