"""`load`: one entry point for official checkpoints, kapao weights files and registry names."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kapao.errors import KapaoError, require_torch

try:
    import torch
except ModuleNotFoundError as e:  # the torch layer without PyTorch: the one-line kapao[torch] error
    if e.name == "torch":
        require_torch("loading torch weights (.pt, .safetensors, registry names)")
    raise

from kapao.config import ModelConfig
from kapao.models.kapao import KapaoModel, our_key
from kapao.schema import KeypointSchema
from kapao.weights import checkpoint, official
from kapao.weights.download import resolve
from kapao.weights.registry import RegisteredWeights
from kapao.weights.safe_pickle import load_plain_pickle


@dataclass(frozen=True)
class WeightsMeta:
    """What a weights file says about the model it holds."""

    config: ModelConfig
    schema: KeypointSchema
    class_names: tuple[str, ...]  # 'person' then one per keypoint, as stored
    source: Path  # the file read
    format: str  # 'official' (pickled YOLOv5 model) or 'kapao' (safetensors from kapao.weights.save)
    stored_dtype: str  # dtype of the stored float weights, e.g. 'float16'
    registry: RegisteredWeights | None = None  # set when loaded by registry name
    info: dict[str, Any] = field(default_factory=dict)  # official: epoch, hyp, ...; kapao: free-form


def sniff_format(path: Path) -> str:
    """'zip' (torch archive), 'safetensors' or 'pickle' from the first bytes; KapaoError otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except IsADirectoryError:
        raise KapaoError(f"{path}: is a directory; give the weights file inside it") from None
    except OSError as e:
        raise KapaoError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    if not head:
        raise KapaoError(f"{path}: empty file; download or export the weights again")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if checkpoint.is_safetensors(head):
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise KapaoError(
        f"{path}: not a checkpoint (neither a torch .pt archive nor a kapao safetensors file); "
        "give an official kapao_*.pt or a file written by kapao convert"
    )


def _load_state(model: KapaoModel, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `state` (our keys) into `model`, converting to its dtypes; clear errors on misfit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise KapaoError(
            f"{path}: the weights do not fit model {model.cfg.name} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, {len(missing)}/{len(unexpected)} in all); "
            "the file is damaged or for another architecture"
        )
    for k, want in expected.items():
        if tuple(state[k].shape) != tuple(want.shape):
            raise KapaoError(
                f"{path}: tensor {k} has shape {tuple(state[k].shape)}, model {model.cfg.name} expects "
                f"{tuple(want.shape)}; the file is for another architecture or keypoint count"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _stored_dtype(state: dict[str, torch.Tensor]) -> str:
    dtypes = {str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()}
    return ",".join(sorted(dtypes))


def _from_official(path: Path, schema: KeypointSchema | None) -> tuple[KapaoModel, WeightsMeta]:
    ckpt = official.read_official(path)
    anchors = official.anchors_from_state(ckpt.state_dict, ckpt.head_index)
    cfg = official.config_from_official_yaml(ckpt.yaml, str(path), anchors, name=f"official-{path.stem}")
    schema = official.resolve_schema(ckpt.num_keypoints, ckpt.names, schema, str(path))
    model = KapaoModel(cfg, schema)
    if ckpt.head_index != len(model.layers):
        raise KapaoError(f"{path}: Detect is layer {ckpt.head_index}, its yaml builds {len(model.layers)} layers")
    state = {our_key(k, ckpt.head_index): v for k, v in ckpt.state_dict.items()}
    _load_state(model, state, path)
    if ckpt.stride and list(ckpt.stride) != model.stride.tolist():
        raise KapaoError(f"{path}: strides {list(ckpt.stride)} differ from the model's {model.stride.tolist()}")
    meta = WeightsMeta(cfg, schema, ckpt.names, path, "official", _stored_dtype(ckpt.state_dict), info=ckpt.info)
    return model, meta


def _from_kapao(path: Path, schema: KeypointSchema | None) -> tuple[KapaoModel, WeightsMeta]:
    ckpt = checkpoint.read(path)
    if schema is not None and schema.num_keypoints != ckpt.schema.num_keypoints:
        raise KapaoError(
            f"{path}: the checkpoint has {ckpt.schema.num_keypoints} keypoints but the schema from {schema.source} "
            f"has {schema.num_keypoints}; pass the data YAML the model was trained with, or none"
        )
    schema = schema or ckpt.schema
    model = KapaoModel(ckpt.config, schema)
    _load_state(model, ckpt.state_dict, path)
    names = tuple(ckpt.schema.class_names)
    return model, WeightsMeta(ckpt.config, schema, names, path, "kapao", _stored_dtype(ckpt.state_dict), info=ckpt.info)


def load(
    path_or_name: str | Path,
    device: str | torch.device = "cpu",
    schema: KeypointSchema | None = None,
    *,
    cache: str | Path | None = None,
    base_url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> tuple[KapaoModel, WeightsMeta]:
    """Load weights into a float32 KapaoModel in eval mode (unfused; call `.fuse()` for inference).

    path_or_name: an official `kapao_*.pt`, a file written by `save`, or a registry name
      (`kapao_s_coco`, ...; downloaded into the cache, see `kapao.weights.download`).
    schema: the keypoint schema; needed only when the file's keypoints are neither COCO nor
      CrowdPose. Its keypoint count must equal the checkpoint's.
    sha256: expected checksum of the file (verified before use).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise KapaoError(f"device {device!r}: not a torch device ({e}); use 'cpu', 'cuda' or 'cuda:0'") from None
    path, entry = resolve(path_or_name, cache=cache, base_url=base_url, sha256=sha256, progress=progress)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        model, meta = _from_kapao(path, schema)
    elif fmt == "zip":
        model, meta = _from_official(path, schema)
    else:
        obj = load_plain_pickle(path)  # restricted: refuses code, tells a legacy file from others
        what = "a pre-1.6 torch file" if isinstance(obj, int) else f"holding {type(obj).__name__}"
        raise KapaoError(
            f"{path}: a plain pickle ({what}), not a torch zip checkpoint; only torch >= 1.6 .pt archives "
            "(official KAPAO files) and kapao safetensors files are supported"
        )
    if entry is not None:
        meta = replace(meta, registry=entry)
    try:
        model = model.to(dev)
    except (RuntimeError, AssertionError) as e:
        raise KapaoError(f"device {device!r}: cannot move the model there ({str(e)[:100]}); use 'cpu'") from None
    return model.eval(), meta
