"""create_backend and the export cache: auto picks ONNX Runtime for torch weights on the CPU,
exports once, reuses the entry, and survives corrupt, half-written, unwritable and concurrent caches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kapao.cli.main import main
from kapao.data.letterbox import prepare_input, read_image, to_input_batch
from kapao.engine.predictor import KAPAO
from kapao.errors import KapaoError
from kapao.runtime.cache import exports_root
from kapao.runtime.factory import create_backend
from kapao.weights.shipped import default_weights, demo_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An empty KAPAO_HOME for one test."""
    monkeypatch.setenv("KAPAO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A copy of the shipped kapao-n weights under a plain name (a user's .safetensors file)."""
    path = tmp_path_factory.mktemp("w") / "my_model.safetensors"
    shutil.copy(default_weights(), path)
    return path


def _entries() -> list[Path]:
    return sorted(p for p in exports_root().iterdir() if p.is_dir() and not p.name.startswith("."))


def _scene_batch(stride: int = 64) -> np.ndarray:
    return to_input_batch([prepare_input(read_image(demo_images()[0]), 256, stride)[0]])


def test_auto_exports_once_then_reuses(home, weights, capsys):
    first = create_backend(weights)
    err = capsys.readouterr().err
    assert first.name == "onnxruntime-cpu-fp32"
    assert err.count("exporting my_model.safetensors as ONNX once") == 1, err
    (entry,) = _entries()
    model_file = entry / "model.onnx"
    key = json.loads((entry / "key.json").read_text())
    assert key["shape_policy"] == "dynamic" and key["artifact"] == "onnx-fp32" and len(key["weights_sha256"]) == 64
    assert first.default_imgsz == 256  # the shipped recipe's size travels in the export's metadata
    stamp = model_file.stat().st_mtime_ns
    second = create_backend(weights)
    assert "exporting" not in capsys.readouterr().err
    assert model_file.stat().st_mtime_ns == stamp and len(_entries()) == 1
    # a copy under another name has the same content: the same entry
    other = weights.with_name("renamed.safetensors")
    shutil.copy(weights, other)
    create_backend(other)
    assert "exporting" not in capsys.readouterr().err and len(_entries()) == 1
    # and the exported graph computes what the torch backend does (fused-BN allowance)
    torch_backend = create_backend(weights, backend="torch")
    x = _scene_batch()
    ref, out = torch_backend(x), second(x)
    np.testing.assert_allclose(out[..., 4:23], ref[..., 4:23], atol=1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=0.0127)


def test_changed_weights_get_a_new_entry(home, weights, tmp_path):
    create_backend(weights)
    changed = tmp_path / "changed.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    changed.write_bytes(bytes(data))
    create_backend(changed)
    assert len(_entries()) == 2


def test_corrupt_entry_is_rebuilt(home, weights, capsys):
    create_backend(weights)
    (entry,) = _entries()
    (entry / "model.onnx").write_bytes(b"not an onnx file")
    capsys.readouterr()
    backend = create_backend(weights)
    err = capsys.readouterr().err
    assert "does not load" in err and "rebuilding" in err and "exporting" in err
    assert backend(_scene_batch()).shape[-1] == 57


def test_killed_export_leaves_nothing_used(home, weights, capsys):
    """A build killed halfway leaves only a dot-folder; the next run ignores it, builds, tidies."""
    create_backend(weights)
    (entry,) = _entries()
    stale = entry.with_name(f".{entry.name}.killed")
    shutil.move(entry, stale)
    (stale / "model.onnx").write_bytes(b"\x08\x07half")  # truncated mid-write
    capsys.readouterr()
    create_backend(weights)
    assert "exporting" in capsys.readouterr().err
    assert not stale.exists() and [e.name for e in _entries()] == [entry.name]


def test_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch, weights, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("KAPAO_HOME must be a folder")
    monkeypatch.setenv("KAPAO_HOME", str(blocker / "home"))  # cannot be created: its parent is a file
    backend = create_backend(weights)
    err = capsys.readouterr().err
    assert "is not writable" in err and "KAPAO_HOME" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 2  # that line and the export line
    assert backend.name == "onnxruntime-cpu-fp32"


def test_two_processes_export_the_same_entry_once(home, weights):
    code = (
        "import sys; from kapao.runtime.factory import create_backend; "
        "b = create_backend(sys.argv[1]); print(b.name)"
    )
    env = {**os.environ, "KAPAO_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(weights)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert [o[0].strip() for o in outs] == ["onnxruntime-cpu-fp32"] * 2
    assert sum(o[1].count("exporting") for o in outs) == 1, outs  # the second found the first's entry
    assert len(_entries()) == 1


def test_tta_on_auto_runs_on_torch(home, weights):
    model = KAPAO(weights)
    assert model.backend.name == "onnxruntime-cpu-fp32"
    image = read_image(demo_images()[0])
    plain = model(image)
    augmented = model(image, scales=[1, 0.83], flips=[-1, 3])
    assert plain.backend == "onnxruntime-cpu-fp32" and augmented.backend == "torch-cpu-fp32"
    forced = KAPAO(weights, backend="onnxruntime")
    with pytest.raises(KapaoError, match="test-time augmentation"):
        forced(image, scales=[1, 0.83])


def test_bad_requests_are_one_line_errors(home, weights):
    for kwargs, match in (
        ({"backend": "tensorrt"}, "--backend 'tensorrt'"),
        ({"precision": "fp16"}, "--precision 'fp16'"),
        ({"device": "tpu9"}, "--device 'tpu9'"),
        ({"half": True}, "--half is fp16 on CUDA"),
        ({"tta": True, "precision": "int8"}, "test-time augmentation"),
    ):
        with pytest.raises(KapaoError, match=match):
            create_backend(weights, **kwargs)
    with pytest.raises(KapaoError, match="give a file path"):
        create_backend(123)  # type: ignore[arg-type]


def _foreign_onnx(path: Path) -> Path:
    """A valid ONNX graph that is not a kapao export: (1, 3, 8, 8) -> (1, 3, 8, 8)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["output"])], "foreign",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_foreign_onnx_is_refused_in_one_line(home, tmp_path, capsys):
    foreign = _foreign_onnx(tmp_path / "foreign.onnx")
    image = str(demo_images()[0])
    rc = main(["predict", image, "--weights", str(foreign), "--project", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "not a kapao export" in err and len(err.strip().splitlines()) == 1
    # beside a copied kapao sidecar: the graph's shapes give it away
    from kapao.weights.shipped import shipped_onnx

    sidecar = json.dumps(create_backend(shipped_onnx()).meta)
    foreign.with_name(foreign.name + ".json").write_text(sidecar)
    rc = main(["predict", image, "--weights", str(foreign), "--project", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "kapao export has one (B, 3, H, W) input and one (B, N, C) output" in err


def test_cli_predict_auto_prints_the_backend(home, weights, tmp_path, capsys):
    rc = main(["predict", str(demo_images()[0]), "--weights", str(weights), "--project", str(tmp_path / "runs"),
               "--save-json", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "on onnxruntime-cpu-fp32" in out
    (data,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "exp").glob("*.json") if p.name != "predictions.json"] or [None]
    assert data is None or data.get("backend") in (None, "onnxruntime-cpu-fp32")


def test_int8_on_onnxruntime_is_quantized_once(home, weights, capsys):
    """--precision int8 without a manual export: quantized from the cached fp32 ONNX on the shipped
    scenes (ONNX Runtime here; auto prefers OpenVINO when installed, tested in test_openvino.py)."""
    b8 = create_backend(weights, backend="onnxruntime", precision="int8")
    err = capsys.readouterr().err
    assert b8.name == "onnxruntime-cpu-int8" and b8.precision == "int8"
    assert "as an INT8 ONNX file once" in err
    again = create_backend(weights, backend="onnxruntime", precision="int8", quiet=True)
    assert "exporting" not in capsys.readouterr().err
    x = _scene_batch()
    fp32 = create_backend(weights)(x)
    out = again(x)
    assert out.shape == fp32.shape
    # the person objectness of the confident rows survives quantization
    top = np.argsort(-fp32[0, :, 4])[:20]
    assert np.abs(out[0, top, 4] - fp32[0, top, 4]).max() < 0.15


def test_shipped_model_runs_its_shipped_onnx(home, capsys):
    """No weights, or the shipped model's name: its shipped ONNX on ONNX Runtime, nothing exported;
    the torch backend and TTA take the shipped safetensors instead."""
    from kapao.weights.shipped import shipped_onnx

    for weights in (None, "kapao_n_synth", "kapao_n_synth.safetensors"):
        backend = create_backend(weights)
        assert backend.name == "onnxruntime-cpu-fp32" and backend.path == shipped_onnx() and backend.default_imgsz == 256
    assert "exporting" not in capsys.readouterr().err and not exports_root().exists()
    assert create_backend("kapao_n_synth", backend="torch").name == "torch-cpu-fp32"
    assert create_backend(None, tta=True).supports_tta
