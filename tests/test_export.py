"""Export: ONNX (fixed and dynamic) and TorchScript equal the eager model and the official golden
forward output; metadata travels with the files; no ScatterND; clear errors for bad requests."""

from __future__ import annotations

import copy

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kapao.cli.main import main
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.runtime.export import (
    METADATA_KEY,
    export,
    export_onnx,
    export_torchscript,
    normalize_imgsz,
    output_columns,
    read_metadata,
    sidecar_path,
)
from kapao.runtime.torchscript_backend import TorchScriptBackend
from kapao.schema import coco_schema, crowdpose_schema
from weight_rule import apply_weight_rule, seeded_kapao_s

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from kapao.runtime.onnx_backend import OnnxBackend  # noqa: E402

# golden/README.md: probabilities atol 1e-5; pixel coordinates rtol 1e-5, atol 2e-3. The exported
# graph has BatchNorm folded into the convs (the exporter and ONNX Runtime both fold it), and the
# README measures the official fused-vs-unfused forward difference on this input at up to
# 0.0127 px on coordinates and 3.8e-6 on probabilities: coordinates get that allowance.
PROB_ATOL = 1e-5
COORD_RTOL = 1e-5
COORD_ATOL_FUSED = 0.0127
PROB = slice(4, 23)  # obj + 18 class columns (COCO)


def assert_matches(out: np.ndarray, ref: np.ndarray | torch.Tensor) -> None:
    """A backend's (B, N, C) NumPy output against a reference (NumPy, or an eager model's tensor)."""
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    ref = np.asarray(ref)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out[..., PROB], ref[..., PROB], rtol=0, atol=PROB_ATOL)
    for cols in (slice(0, 4), slice(23, None)):
        np.testing.assert_allclose(out[..., cols], ref[..., cols], rtol=COORD_RTOL, atol=COORD_ATOL_FUSED)


@pytest.fixture(scope="module")
def model() -> KapaoModel:
    return seeded_kapao_s()


@pytest.fixture(scope="module")
def forward_golden(golden: Path) -> dict[str, np.ndarray]:
    d = np.load(golden / "forward_s640.npz")
    return {"input": d["input"], "output": d["output"]}


@pytest.fixture(scope="module")
def onnx_fixed(model: KapaoModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "s_448x640.onnx", imgsz=(448, 640))


@pytest.fixture(scope="module")
def onnx_dynamic(model: KapaoModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "s_dyn.onnx", imgsz=256, dynamic=True, simplify=True)


def op_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_fixed_onnx_equals_official_golden(onnx_fixed: Path, forward_golden: dict) -> None:
    out = OnnxBackend(onnx_fixed)(forward_golden["input"])
    assert_matches(out, forward_golden["output"])


def test_dynamic_onnx_equals_golden_and_eager(onnx_dynamic: Path, forward_golden: dict, model: KapaoModel) -> None:
    backend = OnnxBackend(onnx_dynamic)
    assert backend.fixed_hw is None
    # exported at 256x256, run at the golden's 448x640
    assert_matches(backend(forward_golden["input"]), forward_golden["output"])
    # and another shape and batch, against our eager model
    x = torch.rand(2, 3, 320, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    assert_matches(backend(x.numpy()), ref)


def test_no_scatter_nodes(onnx_fixed: Path, onnx_dynamic: Path) -> None:
    for path in (onnx_fixed, onnx_dynamic):
        ops = op_counts(path)
        assert "ScatterND" not in ops and "ScatterElements" not in ops, ops
        assert ops["Conv"] == 81  # 77 backbone/neck convs (BN folded) + 4 head convs


def test_fixed_graph_has_static_shapes(onnx_fixed: Path) -> None:
    proto = onnx.load(str(onnx_fixed))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 448, 640]
    out_dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == [1, 17850, 57]
    assert "Range" not in op_counts(onnx_fixed)  # decode grids folded to constants


def test_metadata_embedded_and_sidecar(onnx_fixed: Path, model: KapaoModel) -> None:
    proto = onnx.load(str(onnx_fixed))
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    side = json.loads(sidecar_path(onnx_fixed).read_text())
    assert embedded == side == read_metadata(onnx_fixed)
    assert side["schema"] == coco_schema().to_dict()
    assert side["strides"] == [8, 16, 32, 64] and side["stride"] == 64
    assert side["imgsz"] == [448, 640] and side["dynamic"] is False and side["precision"] == "fp32"
    cols = side["output"]["columns"]
    assert len(cols) == 57 == side["output"]["shape"][-1]
    assert cols[:6] == ["cx", "cy", "w", "h", "obj", "cls_person"]
    assert cols[6] == "cls_nose" and cols[23:25] == ["nose_x", "nose_y"] and cols[-1] == "right_ankle_y"
    assert side["output"]["slices"] == {"box_cxcywh": [0, 4], "obj": [4, 5], "cls": [5, 23], "keypoints_xy": [23, 57]}
    # the sidecar alone is enough once the embedded copy is gone
    del proto.metadata_props[:]
    bare = onnx_fixed.with_name("bare.onnx")
    onnx.save(proto, str(bare))
    sidecar_path(bare).write_text(sidecar_path(onnx_fixed).read_text())
    assert read_metadata(bare) == side


def test_output_columns_other_schema() -> None:
    cols = output_columns(crowdpose_schema())
    assert len(cols) == 5 + 15 + 28 and cols[5] == "cls_person" and cols[-1] == "neck_y"


def test_torchscript_equals_eager(model: KapaoModel, tmp_path: Path, forward_golden: dict) -> None:
    path = export_torchscript(model, tmp_path / "s.torchscript", imgsz=256)
    meta = read_metadata(path)
    assert meta["format"] == "torchscript" and meta["schema"] == coco_schema().to_dict()
    assert json.loads(sidecar_path(path).read_text()) == meta
    backend = TorchScriptBackend(path)
    assert backend.schema.to_dict() == model.schema.to_dict() and backend.stride == 64 and backend.fixed_hw is None
    out = backend(forward_golden["input"])  # traced at 256, run at 448x640
    # against the same graph run eagerly on this CPU (BN folded, Focus as one conv): the trace
    # itself must change nothing; the eager form against the official golden is test_models'
    eager = copy.deepcopy(model).fuse().focus_as_conv()
    with torch.no_grad():
        ref = eager(torch.from_numpy(forward_golden["input"]))
    assert_matches(out, ref)
    np.testing.assert_allclose(out[..., PROB], ref.numpy()[..., PROB], rtol=0, atol=1e-6)
    assert backend(np.zeros((2, 3, 128, 192), np.float32)).shape == (2, 3 * (16 * 24 + 8 * 12 + 4 * 6 + 2 * 3), 57)
    junk = tmp_path / "junk.torchscript"
    junk.write_bytes(b"not a zip")
    sidecar_path(junk).write_text(sidecar_path(path).read_text())
    with pytest.raises(KapaoError, match="not a loadable TorchScript file"):
        TorchScriptBackend(junk)


def test_export_leaves_model_untouched(model: KapaoModel, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "h.onnx", imgsz=128, half=True)
    after = model.state_dict()
    assert set(before) == set(after)  # not fused
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert not model.training


def test_half_export_float_io(model: KapaoModel, tmp_path: Path) -> None:
    path = export_onnx(model, tmp_path / "h.onnx", imgsz=128, half=True)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_metadata(path)["precision"] == "fp16"
    with pytest.raises(KapaoError, match="exact mode needs an fp32 graph"):
        OnnxBackend(path, exact=True)


def test_bad_requests(model: KapaoModel, tmp_path: Path) -> None:
    with pytest.raises(KapaoError, match="not a positive multiple of the model stride 64; use 1024"):
        normalize_imgsz(1000, 64)
    with pytest.raises(KapaoError, match="one size or two"):
        normalize_imgsz([640, 640, 3], 64)
    assert normalize_imgsz([640, 1024], 64) == (640, 1024) and normalize_imgsz(256, 64) == (256, 256)
    with pytest.raises(KapaoError, match="format 'tflite' is not supported"):
        export(model, tmp_path / "m.tflite", "tflite")
    with pytest.raises(KapaoError, match="expected a KapaoModel"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "c.onnx", 64)  # type: ignore[arg-type]
    with pytest.raises(KapaoError, match="no such file"):
        read_metadata(tmp_path / "missing.onnx")
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "n.onnx"
    assert main(["export", "--cfg", "kapao-n", "--imgsz", "128", "192", "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["model"] == "kapao-n" and meta["imgsz"] == [128, 192]
    assert OnnxBackend(out).fixed_hw == (128, 192)
    assert main(["export", "--cfg", "kapao-n", "--format", "tflite", "--out", str(tmp_path / "x")]) == 1
    assert "--format 'tflite' is not supported" in capsys.readouterr().err
    assert main(["export", "--cfg", "kapao-n", "--imgsz", "100", "--out", str(tmp_path / "y.onnx")]) == 1
    assert "multiple of the model stride 64" in capsys.readouterr().err
    ts = tmp_path / "n.torchscript"
    assert main(["export", "--cfg", "kapao-n", "--format", "torchscript", "--imgsz", "128", "--out", str(ts)]) == 0
    assert read_metadata(ts)["format"] == "torchscript"


def test_cli_export_official_weights(shared: Path, tmp_path: Path) -> None:
    """--weights goes through kapao.weights.load (official fp16 checkpoint of the e2e goldens)."""
    out = tmp_path / "w.onnx"
    ckpt = shared / "golden" / "e2e" / "kapao_s_coco_seed0.pt"
    assert main(["export", "--weights", str(ckpt), "--imgsz", "128", "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["model"] == "kapao-s" and meta["schema"]["names"] == list(coco_schema().names)


def test_other_schema_roundtrip(tmp_path: Path) -> None:
    """A CrowdPose-head model: 48 columns, its schema (and flip index) comes back from the file."""
    m = KapaoModel("kapao-n", crowdpose_schema())
    apply_weight_rule(m, 0)
    path = export_onnx(m.eval(), tmp_path / "cp.onnx", imgsz=128, dynamic=True)
    backend = OnnxBackend(path)
    assert backend.schema.to_dict() == crowdpose_schema().to_dict()
    x = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(x)
    out, ref = backend(x.numpy()), ref.numpy()
    assert out.shape == ref.shape and out.shape[-1] == 48
    np.testing.assert_allclose(out[..., 4:20], ref[..., 4:20], atol=PROB_ATOL)
    np.testing.assert_allclose(out, ref, rtol=COORD_RTOL, atol=COORD_ATOL_FUSED)


def test_missing_onnx_package(model: KapaoModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import fails as if not installed
    with pytest.raises(KapaoError, match=r"needs the onnx package: pip install 'kapao\[onnx\]'"):
        export_onnx(model, tmp_path / "m.onnx", 64)
    assert not list(tmp_path.iterdir())
