"""The shipped default model as ONNX (`assets/kapao_n_synth.onnx`): installed, small, lossless,
equal to the torch path, and re-created exactly by `export_shipped_onnx` from the safetensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kapao.data.letterbox import prepare_input, read_image, to_input_batch
from kapao.runtime.metadata import read_metadata
from kapao.runtime.onnx_compact import FP16_SUFFIX, compact_fp16_initializers, is_fp16_exact
from kapao.weights import default_weights, shipped_onnx
from kapao.weights.download import sha256_of

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# tests/test_export.py: probabilities atol 1e-5; coordinates rtol 1e-5 with the fused-BN allowance
PROB_ATOL, COORD_RTOL, COORD_ATOL_FUSED = 1e-5, 1e-5, 0.0127
PROB = slice(4, 23)  # obj + 18 class columns (COCO-17)
SIZE_LIMIT = 10_000_000  # files over 10 MB are flagged by the repository hooks


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def assert_export_tolerance(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape
    np.testing.assert_allclose(out[..., PROB], ref[..., PROB], rtol=0, atol=PROB_ATOL)
    for cols in (slice(0, 4), slice(23, None)):
        np.testing.assert_allclose(out[..., cols], ref[..., cols], rtol=COORD_RTOL, atol=COORD_ATOL_FUSED)


@pytest.fixture(scope="module")
def batches(shared: Path) -> list[np.ndarray]:
    """Real photos as the dynamic-shape backends get them: three sizes, one batch of two."""
    files = sorted((shared / "data" / "coco_mini" / "images").glob("*.jpg"))[:3]
    assert len(files) == 3
    chws = [prepare_input(read_image(f), s, 64)[0] for f, s in zip(files, (256, 320, 640))]
    same = [prepare_input(read_image(files[0]), 256, 64)[0]] * 2
    return [to_input_batch([c]) for c in chws] + [to_input_batch(same)]


def test_shipped_onnx_is_installed_small_dynamic_and_current():
    path = shipped_onnx()
    assert path is not None and path.name == "kapao_n_synth.onnx"
    assert shipped_onnx("kapao_n_synth.safetensors") == path and shipped_onnx("nope") is None
    assert path.stat().st_size < SIZE_LIMIT
    meta = read_metadata(path)
    assert meta["model"] == "kapao-n" and meta["dynamic"] is True and meta["precision"] == "fp32"
    assert meta["default_imgsz"] == 256 and meta["weights_info"]["recipe"]["imgsz"] == 256
    # the ONNX was made from the safetensors that ship beside it (re-create: `make shipped-onnx`)
    assert meta["weights_sha256"] == sha256_of(default_weights()), "stale shipped ONNX: run `make shipped-onnx`"
    (inp,) = session(path).get_inputs()
    assert inp.name == "images" and inp.shape == ["batch", 3, "height", "width"]


def test_shipped_onnx_is_lossless_fp16_storage():
    """BatchNorm kept as nodes, every weight but the fp32 decode coefficients stored as fp16."""
    proto = onnx.load(str(shipped_onnx()))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BatchNormalization") > 0
    fp32 = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert fp32 == ["coefficients"]  # the decode's, computed in fp32
    halves = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    casts = [n for n in proto.graph.node if n.op_type == "Cast" and n.input[0] in halves]
    assert len(casts) == len(halves) > 100 and all(n.name in {c.name for c in casts} for n in proto.graph.node[: len(casts)])


def test_shipped_onnx_equals_the_torch_path(batches):
    """ONNX Runtime on the shipped file vs the safetensors model on the torch backend."""
    from kapao.runtime.torch_backend import TorchBackend
    from kapao.weights import load

    model, _ = load(default_weights())
    torch_path = TorchBackend(model)
    sess = session(shipped_onnx())
    for x in batches:
        assert_export_tolerance(sess.run(None, {"images": x})[0], np.asarray(torch_path(x)))


def test_export_shipped_onnx_recreates_the_shipped_file(tmp_path, batches):
    from kapao.weights.shipped import export_shipped_onnx

    out = export_shipped_onnx(tmp_path / "kapao_n_synth.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kapao_n_synth.onnx"]  # no sidecar, no temp left
    assert read_metadata(out) == read_metadata(shipped_onnx())
    new, shipped = session(out), session(shipped_onnx())
    for x in batches:
        a, b = new.run(None, {"images": x})[0], shipped.run(None, {"images": x})[0]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # byte-identical with the pinned torch


def test_kapao_export_compact_writes_the_same_graph(tmp_path, batches):
    """`kapao export --compact` is the CLI way to the shipped file's graph (its metadata lacks the
    shipped extras); --compact refuses options it cannot keep lossless."""
    from kapao.cli.main import main

    out = tmp_path / "n.onnx"
    argv = ["export", "--weights", "kapao_n_synth", "--dynamic", "--imgsz", "256", "--compact", "--out", str(out)]
    assert main(argv) == 0
    assert out.stat().st_size < SIZE_LIMIT
    new, shipped = session(out), session(shipped_onnx())
    for x in batches[:2]:
        np.testing.assert_allclose(new.run(None, {"images": x})[0], shipped.run(None, {"images": x})[0], rtol=0, atol=1e-6)
    assert main([*argv, "--half"]) == 1 and main([*argv, "--simplify"]) == 1


def tiny_graph() -> onnx.ModelProto:
    """y = x * w + b + z, with w exact in fp16, b not, and z an initializer that is also an input."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([0.5, -2.0, 1024.0, 2.0**-16], np.float32), "w")
    b = numpy_helper.from_array(np.array([0.1, 0.2, 0.3, 0.4], np.float32), "b")
    z = numpy_helper.from_array(np.array([1.0, 1.0, 1.0, 1.0], np.float32), "z")
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["xwb"]),
             helper.make_node("Add", ["xwb", "z"], ["y"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "z", "y")]
    graph = helper.make_graph(nodes, "tiny", [vi[0], vi[1]], [vi[2]], [w, b, z])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_compact_fp16_initializers_is_lossless_and_idempotent():
    assert is_fp16_exact(np.array([0.5, 2.0**-16, -0.0], np.float32)) is True
    assert is_fp16_exact(np.array([0.1], np.float32)) is False
    assert is_fp16_exact(np.array([1e6], np.float32)) is False  # overflows fp16
    assert is_fp16_exact(np.array([np.nan], np.float32)) is False
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    plain = tiny_graph()
    ref = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    small = tiny_graph()
    stats = compact_fp16_initializers(small)
    assert (stats.compacted, stats.kept_fp32, stats.bytes_before, stats.bytes_after) == (1, 1, 32, 24)
    inits = {t.name: t.data_type for t in small.graph.initializer}
    assert inits == {"w" + FP16_SUFFIX: onnx.TensorProto.FLOAT16, "b": onnx.TensorProto.FLOAT, "z": onnx.TensorProto.FLOAT}
    assert small.graph.node[0].op_type == "Cast" and small.graph.node[0].output[0] == "w"
    onnx.checker.check_model(small)
    out = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, ref)
    again = compact_fp16_initializers(small)
    assert again.compacted == 0 and len(small.graph.node) == 4
