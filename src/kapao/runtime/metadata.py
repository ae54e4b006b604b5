"""Metadata of exported kapao files, read without torch and without the `onnx` package.

Every exported file carries a JSON description (keypoint schema, strides, input size and policy,
precision, output columns): inside the file (ONNX `metadata_props["kapao"]`, read here through
ONNX Runtime's model metadata; OpenVINO IR `<rt_info><kapao value=.../>`, read from the XML;
TorchScript extra file `kapao.json`, read from the zip) and in a `<file>.json` sidecar beside it.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kapao.errors import KapaoError
from kapao.schema import KeypointSchema

if TYPE_CHECKING:
    import onnxruntime

METADATA_KEY = "kapao"
METADATA_VERSION = 1
# bumped whenever the exported graph changes for the same weights (2: elementwise map decode);
# files cached by it (auto-backend exports, the benchmark's) are then rebuilt
GRAPH_REVISION = 2
INPUT_NAME = "images"
OUTPUT_NAME = "output"
EXPORTED_SUFFIXES = (".onnx", ".xml", ".torchscript")


def sidecar_path(path: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def output_columns(schema: KeypointSchema) -> list[str]:
    """Names of the 5 + nc + 2K output columns: box, objectness, class scores, keypoint coordinates."""
    cls = ["cls_person"] + [f"cls_{n}" for n in schema.names]
    kps = [f"{n}_{c}" for n in schema.names for c in ("x", "y")]
    return ["cx", "cy", "w", "h", "obj", *cls, *kps]


def read_metadata(path: str | Path, session: onnxruntime.InferenceSession | None = None) -> dict[str, Any]:
    """Metadata of an exported file: embedded if present, else the sidecar.

    session: an ONNX Runtime session already open on `path` (its model metadata is read instead
    of opening the file again). Raises KapaoError when there is none or it is not valid."""
    path = Path(path)
    if not path.is_file():
        raise KapaoError(f"{path}: no such file; export one with `kapao export --format onnx`")
    text, where = None, str(path)
    if path.suffix == ".onnx":
        text = _onnx_embedded(path, session)
    elif path.suffix in (".torchscript", ".pt", ".ts"):
        text = _torchscript_embedded(path)
    elif path.suffix == ".xml":
        text = _openvino_embedded(path)
    if text is None:
        side = sidecar_path(path)
        if not side.is_file():
            raise KapaoError(
                f"{path}: no kapao metadata inside the file and no sidecar {side.name}; "
                "this is not a kapao export: re-export it with `kapao export` (it writes both)"
            )
        text, where = side.read_text(), str(side)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise KapaoError(f"{where}: kapao metadata is not valid JSON ({e}); re-export the model") from None
    if not isinstance(meta, dict) or "schema" not in meta or "stride" not in meta:
        raise KapaoError(f"{where}: kapao metadata lacks 'schema'/'stride'; re-export the model with `kapao export`")
    return meta


def open_onnx_session(path: Path, options: Any = None, providers: list[str] | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on `path`; a file ONNX Runtime cannot parse is a KapaoError."""
    from kapao.runtime.onnx_backend import import_onnxruntime

    ort = import_onnxruntime()
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KapaoError(f"{path}: ONNX Runtime cannot load it ({first[:200]}); export it again with `kapao export`") from None


def _onnx_embedded(path: Path, session: onnxruntime.InferenceSession | None) -> str | None:
    session = session or open_onnx_session(path)
    return session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)


def _openvino_embedded(path: Path) -> str | None:
    """The `<rt_info><kapao value=.../>` entry of an OpenVINO IR .xml, read without OpenVINO."""
    try:
        entry = ET.parse(path).getroot().find(f"rt_info/{METADATA_KEY}")
    except ET.ParseError as e:
        raise KapaoError(f"{path}: not a valid OpenVINO IR ({e}); export it again with `kapao export`") from None
    return None if entry is None else entry.get("value")


def _torchscript_embedded(path: Path) -> str | None:
    """The `kapao.json` extra file of a TorchScript archive (a zip: `<name>/extra/kapao.json`),
    read without loading the module."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("/extra/kapao.json"):
                    return z.read(name).decode("utf-8")
    except zipfile.BadZipFile:
        return None
    return None


def set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Put `meta` (JSON) under metadata_props['kapao'] of an onnx.ModelProto, replacing any old entry."""
    keep = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)


def schema_from_metadata(meta: dict[str, Any], source: str) -> KeypointSchema:
    """The KeypointSchema recorded in export metadata."""
    return KeypointSchema.from_dict(meta["schema"], source=source)


def check_graph_input(path: str | Path, x: np.ndarray, fixed_hw: tuple[int, int] | None) -> None:
    """The input checks every exported-graph runtime makes before it runs: (B, 3, H, W), and the
    graph's own size when it was exported fixed."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise KapaoError(f"{path}: input must be (B, 3, H, W), got {tuple(x.shape)}")
    if fixed_hw and tuple(x.shape[2:]) != tuple(fixed_hw):
        h, w = fixed_hw
        raise KapaoError(
            f"{path}: this graph is fixed to {h}x{w} but got {x.shape[2]}x{x.shape[3]}; "
            f"letterbox to {h}x{w} or export with --dynamic"
        )


def check_output_width(path: str | Path, width: int, schema: KeypointSchema) -> None:
    """A graph whose rows do not fit its metadata's schema (a foreign graph beside a copied
    sidecar, or a sidecar of another model) is refused before post-processing misreads it."""
    expected = 5 + schema.num_classes + 2 * schema.num_keypoints
    if width != expected:
        k = schema.num_keypoints
        raise KapaoError(
            f"{path}: the graph outputs {width} columns but its metadata's keypoint schema "
            f"(K={k}) needs {expected} (5 + {schema.num_classes} classes + {2 * k} "
            "coordinates); the sidecar belongs to another model: re-export with `kapao export`"
        )
