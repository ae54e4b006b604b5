"""Official KAPAO checkpoints (`kapao_{s,m,l}_{coco,crowdpose}.pt`) -> state dict, config, schema.

An official checkpoint is a `torch.save` dict whose `ema` (if not None) or `model` entry is a whole
pickled YOLOv5 `models.yolo.Model` (fp16). It is read through `safe_pickle` (nothing in it runs),
then the stand-in module tree is walked like `nn.Module.state_dict()` would, giving the official
keys `model.<i>....`, and the model's `yaml` dict is translated into our `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kapao.config import MODEL_NAMES, ModelConfig, load_model_config
from kapao.errors import KapaoError
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema
from kapao.weights.safe_pickle import NdarrayStandIn, StandIn, load_torch_archive

# Blocks of the official YAML whose rows carry over unchanged.
_SAME_BLOCKS = {"Focus", "Conv", "C3", "SPP"}


@dataclass(frozen=True)
class OfficialCheckpoint:
    """What an official checkpoint holds that a re-implementation needs."""

    state_dict: dict[str, torch.Tensor]  # official keys `model.<i>...`, stored dtypes (fp16, int64)
    yaml: dict[str, Any]  # the model's parsed YOLOv5 YAML
    names: tuple[str, ...]  # class names: 'person' then one per keypoint
    nc: int  # classes = 1 + K
    num_coords: int  # 2K
    stride: tuple[float, ...]  # per output level
    head_index: int  # index of the Detect layer (`model.<head_index>.m.*`)
    info: dict[str, Any] = field(default_factory=dict)  # epoch, best_fitness, yaml_file, hyp, ...

    @property
    def num_keypoints(self) -> int:
        return self.num_coords // 2


def _modules(obj: StandIn) -> dict[str, Any]:
    return dict(obj.attrs.get("_modules") or {})


def _collect_state(module: Any, prefix: str, out: dict[str, torch.Tensor], path: Path) -> None:
    """nn.Module.state_dict() over stand-ins: parameters, persistent buffers, then children."""
    if not isinstance(module, StandIn):
        raise KapaoError(f"{path}: '{prefix.rstrip('.')}' is not a module; the checkpoint is damaged")
    attrs = module.attrs
    skip = set(attrs.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, t in (attrs.get(kind) or {}).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise KapaoError(f"{path}: '{prefix}{name}' is not a tensor; the checkpoint is damaged")
            out[prefix + name] = t
    for name, child in _modules(module).items():
        if child is not None:
            _collect_state(child, f"{prefix}{name}.", out, path)


def _jsonable(v: Any) -> Any:
    """Plain-data view of an attribute for `info` (tensors and arrays become lists)."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, NdarrayStandIn):
        a = v.to_numpy()
        return None if a is None else a.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Read an official checkpoint safely. Raises KapaoError if it is not one."""
    path = Path(path)
    top = load_torch_archive(path)
    if isinstance(top, StandIn):
        top = {"model": top}
    if not isinstance(top, dict):
        raise KapaoError(f"{path}: a torch file but not a KAPAO checkpoint (holds {type(top).__name__}, not a dict)")
    model = top.get("ema") if top.get("ema") is not None else top.get("model")
    if not (isinstance(model, StandIn) and model.qualname.endswith(".Model")):
        raise KapaoError(
            f"{path}: no official model object under 'model' or 'ema' (keys: {sorted(map(str, top))}); "
            "give an official kapao_*.pt or a file written by kapao convert"
        )
    attrs = model.attrs
    state: dict[str, torch.Tensor] = {}
    _collect_state(model, "", state, path)

    seq = _modules(model).get("model")
    layers = _modules(seq) if isinstance(seq, StandIn) else {}
    if not layers:
        raise KapaoError(f"{path}: the model object has no layers; the checkpoint is damaged")
    head_key = list(layers)[-1]
    head = layers[head_key]
    if not (isinstance(head, StandIn) and head.qualname.endswith(".Detect")):
        raise KapaoError(f"{path}: the last layer is not a Detect head; not a KAPAO checkpoint")
    hattrs = head.attrs

    nc = attrs.get("nc", hattrs.get("nc"))
    num_coords = attrs.get("num_coords", hattrs.get("num_coords"))
    if num_coords is None and isinstance(hattrs.get("no"), int) and isinstance(nc, int):
        num_coords = hattrs["no"] - 5 - nc
    y = attrs.get("yaml")
    names = attrs.get("names")
    if not isinstance(nc, int) or not isinstance(num_coords, int):
        raise KapaoError(f"{path}: the model has no class/coordinate counts (nc, num_coords); not a KAPAO checkpoint")
    if num_coords <= 0 or num_coords % 2 or nc != 1 + num_coords // 2:
        raise KapaoError(
            f"{path}: nc={nc} and num_coords={num_coords} do not describe a KAPAO model "
            "(expected nc = 1 + K classes and 2K coordinates)"
        )
    if not isinstance(y, dict):
        raise KapaoError(f"{path}: the model has no 'yaml' config dict; not a KAPAO checkpoint")
    if isinstance(names, dict):  # some YOLOv5 versions store {index: name}
        names = [names[k] for k in sorted(names)]
    if not (isinstance(names, (list, tuple)) and len(names) == nc and all(isinstance(n, str) for n in names)):
        names = ["person", *(f"kp{i}" for i in range(num_coords // 2))]
    stride_t = attrs.get("stride", hattrs.get("stride"))
    stride = tuple(float(s) for s in stride_t.tolist()) if isinstance(stride_t, torch.Tensor) else ()

    info = {
        "epoch": top.get("epoch"),
        "best_fitness": _jsonable(top.get("best_fitness")),
        "yaml_file": attrs.get("yaml_file"),
        "hyp": _jsonable(attrs.get("hyp")),
        "used": "ema" if top.get("ema") is not None else "model",
    }
    return OfficialCheckpoint(
        state_dict=state,
        yaml=y,
        names=tuple(names),
        nc=nc,
        num_coords=num_coords,
        stride=stride,
        head_index=int(head_key),
        info={k: _jsonable(v) for k, v in info.items()},
    )


def _config_row(row: Any, i: int, source: str) -> list[Any]:
    """One official YAML row [from, n, module, args] -> our row (block names and args as ours)."""
    if not (isinstance(row, (list, tuple)) and len(row) == 4):
        raise KapaoError(f"{source}: model yaml layer {i} is not [from, number, module, args]: {row!r}")
    src, n, block, args = row
    args = list(args or [])
    if block in _SAME_BLOCKS:
        return [src, n, block, args]
    if block in ("nn.Upsample", "Upsample"):
        size = args[0] if args else None
        factor = args[1] if len(args) > 1 else 2
        mode = args[2] if len(args) > 2 else "nearest"
        if size not in (None, "None") or mode != "nearest" or not isinstance(factor, (int, float)):
            raise KapaoError(f"{source}: layer {i} is Upsample{args}; only [None, <factor>, 'nearest'] is supported")
        return [src, n, "Upsample", [int(factor)]]
    if block == "Concat":
        if args and args[0] != 1:
            raise KapaoError(f"{source}: layer {i} concatenates along dim {args[0]}; only dim 1 is supported")
        return [src, n, "Concat", []]
    raise KapaoError(f"{source}: model yaml layer {i} uses {block!r}, which kapao does not implement")


def config_from_official_yaml(
    y: dict[str, Any], source: str, anchors_px: list[list[float]] | None = None, name: str = "official"
) -> ModelConfig:
    """Translate an official YOLOv5 model YAML dict to our ModelConfig.

    `nn.Upsample [None, 2, 'nearest']` -> `Upsample [2]`, `Concat [1]` -> `Concat []`, the final
    `Detect [nc, anchors]` row -> `head_from`. `anchors_px` (pixels, per level) is used when the
    YAML gives an anchor count instead of sizes. The result is the shipped `kapao-s/m/l` config
    when it equals one, else a config called `name`.
    """
    rows = list(y.get("backbone") or []) + list(y.get("head") or [])
    if not rows or not isinstance(rows[-1], (list, tuple)) or len(rows[-1]) != 4 or rows[-1][2] != "Detect":
        raise KapaoError(f"{source}: model yaml does not end with a Detect row; not a KAPAO model")
    head_src = rows[-1][0]
    anchors = y.get("anchors")
    if not isinstance(anchors, (list, tuple)):
        if anchors_px is None:
            raise KapaoError(f"{source}: model yaml gives no anchor sizes and the checkpoint has no anchor_grid")
        anchors = anchors_px
    d = {
        "name": name,
        "depth_multiple": y.get("depth_multiple"),
        "width_multiple": y.get("width_multiple"),
        "anchors": anchors,
        "layers": [_config_row(r, i, source) for i, r in enumerate(rows[:-1])],
        "head_from": list(head_src) if isinstance(head_src, (list, tuple)) else [head_src],
    }
    if d["depth_multiple"] is None or d["width_multiple"] is None:
        raise KapaoError(f"{source}: model yaml lacks depth_multiple/width_multiple")
    cfg = ModelConfig.from_dict(d, source=source)
    for shipped_name in MODEL_NAMES:
        shipped = load_model_config(shipped_name)
        if {**shipped.to_dict(), "name": ""} == {**cfg.to_dict(), "name": ""}:
            return shipped
    return ModelConfig.from_dict({**cfg.to_dict(), "name": name}, source=source)


def schema_from_names(names: tuple[str, ...]) -> KeypointSchema | None:
    """The shipped schema whose keypoint names equal `names[1:]` (COCO-17, CrowdPose-14), or None."""
    kp = tuple(n.strip().lower().replace(" ", "_") for n in names[1:])
    for make in (coco_schema, crowdpose_schema):
        schema = make()
        if schema.names == kp:
            return schema
    return None


def resolve_schema(
    num_keypoints: int, names: tuple[str, ...], schema: KeypointSchema | None, source: str
) -> KeypointSchema:
    """The caller's schema if given (its K must match), else the one the class names identify."""
    if schema is not None:
        if schema.num_keypoints != num_keypoints:
            raise KapaoError(
                f"{source}: the checkpoint has {num_keypoints} keypoints but the schema from {schema.source} has "
                f"{schema.num_keypoints}; pass the data YAML the model was trained with"
            )
        return schema
    found = schema_from_names(names)
    if found is None or found.num_keypoints != num_keypoints:
        raise KapaoError(
            f"{source}: its {num_keypoints} keypoint names are neither COCO nor CrowdPose; pass the model's "
            "keypoint schema (schema=KeypointSchema.from_yaml(DATA.yaml) in Python, --data DATA.yaml on the CLI)"
        )
    return found


def anchors_from_state(state: dict[str, torch.Tensor], head_index: int) -> list[list[float]] | None:
    """Anchor sizes in pixels per level from the Detect `anchor_grid` buffer, if present."""
    t = state.get(f"model.{head_index}.anchor_grid")
    if t is None:
        return None
    return t.float().reshape(t.shape[0], -1).tolist()
