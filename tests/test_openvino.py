"""OpenVINO backend: fp32 equals the eager model and the official pipeline's poses; bf16 is what
OpenVINO picks by itself on this CPU, so fp32 must be asked for; INT8 runs QDQ files and NNCF-
quantized IR in int8 (SiLU and quantization fused into the convs for the IR); predictor/val/CLI
wiring and clear errors."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kapao.engine.predictor import KAPAO
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.postprocess import postprocess
from kapao.runtime.export import export_onnx, sidecar_path
from kapao.runtime.factory import create_backend
from kapao.schema import coco_schema, crowdpose_schema
from weight_rule import seeded_kapao_s

ov = pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")  # export and INT8 quantization
from kapao.runtime.openvino_backend import OpenVinoBackend  # noqa: E402
from kapao.runtime.quantize import calibration_batches, quantize_int8  # noqa: E402


@pytest.fixture(scope="module")
def model() -> KapaoModel:
    return seeded_kapao_s()


@pytest.fixture(scope="module")
def onnx_dynamic(model: KapaoModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("ov") / "s-dyn.onnx", imgsz=256, dynamic=True)


def compiled_precisions(backend: OpenVinoBackend, shape: tuple[int, ...]) -> set[str]:
    """The runtime precisions OpenVINO chose for the convolutions of one compiled shape."""
    runtime = backend._request(shape).get_compiled_model().get_runtime_model()
    out = set()
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            out.add(info["runtimePrecision"].astype(str))
    return out


def test_fp32_equals_eager_on_any_shape(model: KapaoModel, onnx_dynamic: Path) -> None:
    b = OpenVinoBackend(onnx_dynamic, precision="fp32", threads=2)
    assert b.name == "openvino-cpu-fp32" and b.stride == 64 and b.fixed_hw is None
    assert b.schema.to_dict() == coco_schema().to_dict()
    for shape in [(1, 3, 256, 192), (2, 3, 128, 320)]:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[-1]))
        with torch.no_grad():
            ref = model(x).numpy()
        out = b(x.numpy())
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out[..., 4:23], ref[..., 4:23], atol=1e-5)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=0.0127)  # fused-BN allowance
    assert compiled_precisions(b, (1, 3, 256, 192)) == {"f32"}
    assert len(b._compiled) == 2  # one compiled graph per input shape


def test_bf16_is_asked_for_and_close(model: KapaoModel, onnx_dynamic: Path) -> None:
    """The exact mode states f32: this CPU's OpenVINO default would otherwise be bf16."""
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 units")
    assert str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")) in ("bf16", "<Type: 'bfloat16'>")
    b = OpenVinoBackend(onnx_dynamic, precision="bf16", threads=2)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x).numpy()
    out = b(x.numpy())
    assert "bf16" in compiled_precisions(b, (1, 3, 256, 256))
    assert b.name == "openvino-cpu-bf16"
    assert float(np.abs(out[..., 4:23] - ref[..., 4:23]).mean()) < 0.02
    assert float(np.abs(out - ref).max()) > 0  # really reduced precision


def test_poses_equal_official_pipeline(golden: Path, model: KapaoModel, tmp_path: Path) -> None:
    """OpenVINO fp32 output through kapao.postprocess == the official demo post-processing of the
    official forward (postprocess.npz, forward__demo_image)."""
    fwd = np.load(golden / "forward_s640.npz")
    pp = np.load(golden / "postprocess.npz")
    path = export_onnx(model, tmp_path / "s.onnx", imgsz=(448, 640))
    b = OpenVinoBackend(path)
    assert b.fixed_hw == (448, 640)
    (poses,) = postprocess(b(fwd["input"]), "demo", (448, 640), [(426, 640)], coco_schema())
    key = "forward__demo_image__"
    assert len(poses) == len(pp[key + "scores"]) == 6
    np.testing.assert_allclose(poses.scores, pp[key + "scores"], atol=1e-5)
    np.testing.assert_allclose(poses.boxes, pp[key + "bboxes"], atol=1.0)
    np.testing.assert_allclose(poses.keypoints[..., :2], pp[key + "poses"][..., :2], rtol=1e-5, atol=0.0127)
    with pytest.raises(KapaoError, match="fixed to 448x640 but got 256x256"):
        b(np.zeros((1, 3, 256, 256), np.float32))


def test_int8_qdq_runs_in_int8(model: KapaoModel, onnx_dynamic: Path, shared: Path, tmp_path: Path) -> None:
    images = sorted((shared / "data" / "coco_mini" / "images").glob("*.jpg"))
    qdq = quantize_int8(onnx_dynamic, tmp_path / "qdq.onnx", images[30:], num_images=3, quant_format="qdq")
    b = OpenVinoBackend(qdq, threads=2)
    assert b.precision == "int8" and b.name == "openvino-cpu-int8"
    x = np.concatenate(calibration_batches(images[:1], None, 256, 64))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = b(x)
    precisions = compiled_precisions(b, tuple(x.shape))
    assert "u8" in precisions or "i8" in precisions  # the backbone's convs run int8
    assert "f32" in precisions  # the head's output convs stay float
    assert float(np.abs(out[..., 4:23] - ref[..., 4:23]).mean()) < 0.03
    qop = quantize_int8(onnx_dynamic, tmp_path / "qop.onnx", images[30:], num_images=1)
    with pytest.raises(KapaoError, match="OpenVINO runs INT8 OpenVINO IR or QDQ files, this one is qoperator"):
        OpenVinoBackend(qop)


def test_predictor_and_errors(onnx_dynamic: Path, model: KapaoModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kp = KAPAO(str(onnx_dynamic), backend="openvino", threads=1)
    assert kp.backend.name == "openvino-cpu-fp32"
    img = np.full((200, 300, 3), 127, np.uint8)
    (poses,) = kp.predict_images([img], imgsz=256, preset="val")
    ref = KAPAO(str(onnx_dynamic), backend="onnxruntime").predict_images([img], imgsz=256, preset="val")[0]
    assert len(poses) == len(ref)
    np.testing.assert_allclose(poses.keypoints[..., :2], ref.keypoints[..., :2], atol=0.05)
    with pytest.raises(KapaoError, match="test-time augmentation .* not openvino-cpu-fp32"):
        kp.predict_images([img], imgsz=256, scales=[1, 0.8])
    # no weights: the shipped model's ONNX, which OpenVINO runs (an error before there was one)
    assert create_backend(None, "openvino").name == "openvino-cpu-fp32"
    with pytest.raises(KapaoError, match="--precision bf16 runs on OpenVINO \\(or torch\\); for ONNX Runtime use fp32 or int8"):
        create_backend(str(onnx_dynamic), "onnxruntime", "cpu", precision="bf16")
    with pytest.raises(KapaoError, match="--backend 'tensorrt': use one of auto, torch, onnxruntime, openvino"):
        create_backend(str(onnx_dynamic), "tensorrt", "cpu")
    with pytest.raises(KapaoError, match="openvino precision 'fp16'"):
        OpenVinoBackend(onnx_dynamic, precision="fp16")
    meta = json.loads(sidecar_path(onnx_dynamic).read_text())
    bare = tmp_path / "other.onnx"
    bare.write_bytes(onnx_dynamic.read_bytes())
    import onnx

    proto = onnx.load(str(bare))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    meta["schema"] = crowdpose_schema().to_dict()
    sidecar_path(bare).write_text(json.dumps(meta))
    with pytest.raises(KapaoError, match=r"outputs 57 columns but .* \(K=14\) needs 48"):
        OpenVinoBackend(bare)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(KapaoError, match=r"pip install 'kapao\[openvino\]'"):
        OpenVinoBackend(onnx_dynamic)


def test_cli_predict_openvino_bf16(onnx_dynamic: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kapao.cli.main import main

    image = sorted((shared / "data" / "coco_mini" / "images").glob("*.jpg"))[0]
    argv = ["predict", str(image), "--weights", str(onnx_dynamic), "--backend", "openvino", "--precision", "bf16",
            "--imgsz", "256", "--save-json", "--project", str(tmp_path), "--name", "ov"]
    assert main(argv) == 0
    assert (tmp_path / "ov").is_dir() and any((tmp_path / "ov").glob("*.json"))


def test_int8_openvino_ir(model: KapaoModel, onnx_dynamic: Path, shared: Path, tmp_path: Path) -> None:
    """NNCF INT8 IR: backbone convs int8 with SiLU and the next layer's quantization fused into
    them (no separate f32 activation pass), head convs and decode float, output close to fp32,
    metadata in the IR itself, written whole."""
    from kapao.runtime.export import read_metadata
    from kapao.runtime.openvino_quantize import quantize_openvino_int8

    images = sorted((shared / "data" / "coco_mini" / "images").glob("*.jpg"))
    ir = quantize_openvino_int8(onnx_dynamic, tmp_path / "s-int8.xml", images[30:], num_images=3)
    assert ir.is_file() and ir.with_suffix(".bin").is_file() and sidecar_path(ir).is_file()
    assert not list(tmp_path.glob(".kapao-quant-*"))  # the temporary folder is gone
    sidecar_path(ir).unlink()  # the IR carries its own metadata
    meta = read_metadata(ir)
    assert meta["precision"] == "int8" and meta["quantization"]["format"] == "openvino"
    assert meta["quantization"]["calibration_images"] == 3 and meta["schema"] == coco_schema().to_dict()
    assert meta["quantization"]["bias_correction"] == "full"
    b = OpenVinoBackend(ir, threads=2)
    assert b.precision == "int8" and b.name == "openvino-cpu-int8" and b.fixed_hw is None
    x = np.concatenate(calibration_batches(images[:1], None, 256, 64))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = b(x)
    assert out.shape == ref.shape
    # measured on this image (random weights): mean |d prob| ~0.005; keypoints shift a few px
    assert float(np.abs(out[..., 4:23] - ref[..., 4:23]).mean()) < 0.03
    assert float(np.abs(out[..., 23:] - ref[..., 23:]).mean()) < 10.0
    runtime = b._request(tuple(x.shape)).get_compiled_model().get_runtime_model()
    kinds = Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                    for op in runtime.get_ordered_ops())
    # 77 backbone/neck convs in int8, the 4 head convs in f32
    assert kinds[("Convolution", "u8")] + kinds[("Convolution", "i8")] == 77 and kinds[("Convolution", "f32")] == 4, kinds
    # SiLU and the quantization run inside the int8 convs: no separate activation pass per conv
    # (the QDQ file has one per conv, a third of its forward time); what is left is the decode
    # and a few residual adds
    assert sum(n for (kind, _), n in kinds.items() if kind in ("Subgraph", "Eltwise", "FakeQuantize")) <= 12, kinds
    with pytest.raises(KapaoError, match="name the output .xml"):
        quantize_openvino_int8(onnx_dynamic, tmp_path / "x.onnx", images[30:], num_images=1)
    with pytest.raises(KapaoError, match="starts from an fp32 export"):
        quantize_openvino_int8(ir, tmp_path / "again.xml", images[30:], num_images=1)
    with pytest.raises(KapaoError, match="bias correction 'none': use one of full, fast"):
        quantize_openvino_int8(onnx_dynamic, tmp_path / "y.xml", images[30:], num_images=1, bias_correction="none")


def test_int8_openvino_ir_from_cli_and_predict(shared: Path, tmp_path: Path) -> None:
    """`kapao export --int8 IMAGES --int8-format openvino` writes NAME-int8.xml; `kapao predict`
    runs it on OpenVINO by its suffix; onnxruntime refuses it with a clear message."""
    from kapao.cli.main import main

    images = shared / "data" / "coco_mini" / "images"
    out = tmp_path / "n.onnx"
    assert main(["export", "--cfg", "kapao-n", "--imgsz", "256", "--dynamic", "--out", str(out),
                 "--int8", str(images), "--calib-n", "2", "--int8-format", "openvino"]) == 0
    ir = tmp_path / "n-int8.xml"
    assert ir.is_file() and ir.with_suffix(".bin").is_file()
    kp = KAPAO(str(ir), threads=1)
    assert kp.backend.name == "openvino-cpu-int8"
    image = sorted(images.glob("*.jpg"))[0]
    assert main(["predict", str(image), "--weights", str(ir), "--imgsz", "256", "--save-json",
                 "--project", str(tmp_path), "--name", "p"]) == 0
    assert any((tmp_path / "p").glob("*.json"))
    with pytest.raises(KapaoError, match="OpenVINO IR runs on --backend openvino"):
        create_backend(str(ir), "onnxruntime", "cpu")
    assert main(["export", "--cfg", "kapao-n", "--imgsz", "256", "--out", str(tmp_path / "m.onnx"),
                 "--int8", str(images), "--int8-format", "openvino", "--int8-float-layers", "1"]) != 0


def test_auto_int8_and_bf16_of_torch_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """auto with torch weights (the shipped safetensors): --precision int8 is an OpenVINO INT8 IR
    (NNCF), quantized once into $KAPAO_HOME and reused by the next call; bf16 is OpenVINO bf16."""
    from kapao.weights.shipped import default_weights

    pytest.importorskip("nncf")
    home = tmp_path / "home"
    monkeypatch.setenv("KAPAO_HOME", str(home))
    weights = default_weights()
    first = create_backend(weights, precision="int8")
    assert first.name == "openvino-cpu-int8" and first.precision == "int8"
    assert "exporting" in capsys.readouterr().err
    irs = sorted((home / "exports").glob("openvino-int8-*/model-int8.xml"))
    assert len(irs) == 1 and irs[0].with_suffix(".bin").is_file()
    built = irs[0].stat().st_mtime_ns
    second = create_backend(weights, precision="int8")
    assert second.name == "openvino-cpu-int8"
    assert "exporting" not in capsys.readouterr().err  # the cached IR, not quantized again
    assert sorted((home / "exports").glob("openvino-int8-*/model-int8.xml")) == irs
    assert irs[0].stat().st_mtime_ns == built
    x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    assert np.array_equal(first(x), second(x))
    bf16 = create_backend(weights, precision="bf16")
    assert bf16.name == "openvino-cpu-bf16" and bf16.precision == "bf16"
    assert "exporting" not in capsys.readouterr().err  # the same cached fp32 ONNX under it
