"""Runtime backends: ONNX Runtime (fp32, INT8), bf16 torch; poses after post-processing equal the
official pipeline's; clear errors; the benchmark's agreement metric and bound measurement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.postprocess import postprocess
from kapao.results import Poses
from kapao.runtime.bench import conv_bound, conv_gflops, mean_pose_oks, pose_oks, run_benchmark
from kapao.runtime.export import export_onnx, sidecar_path
from kapao.runtime.quantize import calibration_batches, float_tail_nodes, leading_layer_nodes, quantize_int8
from kapao.runtime.torch_cpu import CpuTorchBackend, ExactFp32Backend, exact_fp32
from kapao.schema import coco_schema, crowdpose_schema
from weight_rule import apply_weight_rule, seeded_kapao_s

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from kapao.runtime.onnx_backend import OnnxBackend, session_options  # noqa: E402


@pytest.fixture(scope="module")
def model() -> KapaoModel:
    return seeded_kapao_s()


@pytest.fixture(scope="module")
def onnx_256(model: KapaoModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("rt") / "s256.onnx", imgsz=256)


@pytest.fixture(scope="module")
def coco_images(shared: Path) -> list[Path]:
    files = sorted((shared / "data" / "coco_mini" / "images").glob("*.jpg"))
    assert len(files) >= 40
    return files


def test_backend_interface(onnx_256: Path) -> None:
    b = OnnxBackend(onnx_256, threads=1, optimization="extended")
    assert b.schema.to_dict() == coco_schema().to_dict() and b.stride == 64 and b.fixed_hw == (256, 256)
    assert b.name == "onnxruntime-cpu-fp32" and b.precision == "fp32"
    x = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(1)).numpy()
    out = b(x)  # a fixed batch-1 graph runs a batch image by image
    assert isinstance(out, np.ndarray)
    assert out.shape == (3, 3 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4), 57)  # 3 anchors x cells of 4 levels
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[1:2], b(x[1:2]))


def test_optimization_levels_agree(onnx_256: Path) -> None:
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)).numpy()
    ref = OnnxBackend(onnx_256, optimization="disable", exact=True)(x)
    for level in ("basic", "all"):
        out = OnnxBackend(onnx_256, optimization=level)(x)
        np.testing.assert_allclose(out[..., 4:23], ref[..., 4:23], atol=1e-5)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=0.0127)


def test_poses_equal_official_pipeline(golden: Path, model: KapaoModel, tmp_path: Path) -> None:
    """ORT output through kapao.postprocess == the official demo post-processing of the official
    forward on the same input (postprocess.npz, forward__demo_image)."""
    fwd = np.load(golden / "forward_s640.npz")
    pp = np.load(golden / "postprocess.npz")
    path = export_onnx(model, tmp_path / "s.onnx", imgsz=(448, 640))
    pred = OnnxBackend(path)(fwd["input"])
    (poses,) = postprocess(pred, "demo", (448, 640), [(426, 640)], coco_schema())
    key = "forward__demo_image__"
    assert len(poses) == len(pp[key + "scores"]) == 6
    np.testing.assert_allclose(poses.scores, pp[key + "scores"], atol=1e-5)
    # boxes are rounded to whole pixels: a 0.0127 px (fused BN) shift may cross a .5 boundary
    np.testing.assert_allclose(poses.boxes, pp[key + "bboxes"], atol=1.0)
    np.testing.assert_allclose(poses.keypoints[..., :2], pp[key + "poses"][..., :2], rtol=1e-5, atol=0.0127)
    np.testing.assert_allclose(poses.keypoints[..., 2], pp[key + "poses"][..., 2], atol=1e-5)


def test_sidecar_of_another_schema(model: KapaoModel, onnx_256: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(onnx_256))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(KapaoError, match="no kapao metadata inside the file and no sidecar bare.onnx.json"):
        OnnxBackend(bare)
    meta = json.loads(sidecar_path(onnx_256).read_text())
    meta["schema"] = crowdpose_schema().to_dict()
    sidecar_path(bare).write_text(json.dumps(meta))
    with pytest.raises(KapaoError, match=r"outputs 57 columns but .* \(K=14\) needs 48"):
        OnnxBackend(bare)
    sidecar_path(bare).write_text("{not json")
    with pytest.raises(KapaoError, match="not valid JSON"):
        OnnxBackend(bare)


def test_bad_calls(onnx_256: Path, tmp_path: Path) -> None:
    b = OnnxBackend(onnx_256)
    with pytest.raises(KapaoError, match="fixed to 256x256 but got 256x320; letterbox to 256x256 or export with --dynamic"):
        b(np.zeros((1, 3, 256, 320), np.float32))
    with pytest.raises(KapaoError, match=r"input must be \(B, 3, H, W\)"):
        b(np.zeros((3, 256, 256), np.float32))
    with pytest.raises(KapaoError, match="optimization 'max'"):
        OnnxBackend(onnx_256, optimization="max")
    with pytest.raises(KapaoError, match="use 'cpu' or 'cuda'"):
        OnnxBackend(onnx_256, providers="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(KapaoError, match="install onnxruntime-gpu"):
            OnnxBackend(onnx_256, providers="cuda")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    sidecar_path(junk).write_text(sidecar_path(onnx_256).read_text())
    with pytest.raises(KapaoError, match="not a valid ONNX file|ONNX Runtime cannot load it"):
        OnnxBackend(junk)


def test_missing_onnxruntime(onnx_256: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(KapaoError, match=r"needs ONNX Runtime: pip install onnxruntime"):
        OnnxBackend(onnx_256)


def test_session_options() -> None:
    so = session_options(threads=3, optimization="basic", exact=True)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.get_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16") == "0"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # no spinning against post


def test_float_tail_is_head_and_decode(onnx_256: Path) -> None:
    proto = onnx.load(str(onnx_256))
    tail = set(float_tail_nodes(proto))
    by_name = {n.name: n for n in proto.graph.node}
    head_convs = [by_name[n] for n in tail if by_name[n].op_type == "Conv"]
    assert len(head_convs) == 4  # the 1x1 output convs, 3 anchors x 57 channels each
    inits = {i.name: i for i in proto.graph.initializer}
    assert all(inits[c.input[1]].dims[0] == 171 and inits[c.input[1]].dims[2:] == [1, 1] for c in head_convs)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) - len(head_convs) == 77


def test_leading_layer_nodes(onnx_256: Path) -> None:
    proto = onnx.load(str(onnx_256))
    assert leading_layer_nodes(proto, 0) == []
    first = leading_layer_nodes(proto, 1)  # the Focus stem, exported as one strided conv
    assert [n for n in first if "Conv" in n] == ["/layers.0/conv/Conv"]
    two = leading_layer_nodes(proto, 2)
    assert set(first) < set(two) and not any("/layers.2/" in n for n in two)


def test_int8_quantization(onnx_256: Path, coco_images: list[Path], tmp_path: Path) -> None:
    q = quantize_int8(onnx_256, tmp_path / "s256-int8.onnx", coco_images[30:], num_images=4)
    meta = json.loads(sidecar_path(q).read_text())
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_images"] == 4
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "QLinearConv" in ops and "Conv" in ops  # backbone int8, head convs float
    b32, b8 = OnnxBackend(onnx_256), OnnxBackend(q)
    assert b8.precision == "int8" and b8.name == "onnxruntime-cpu-int8"
    with pytest.raises(KapaoError, match="exact mode needs an fp32 graph but this file is int8"):
        OnnxBackend(q, exact=True)
    x = np.concatenate(calibration_batches(coco_images[:3], (256, 256)))
    ref, out = b32(x), b8(x)
    # measured on these images: mean |d prob| ~0.01, mean keypoint shift a few px (random weights)
    prob_err = float(np.abs(out[..., 4:23] - ref[..., 4:23]).mean())
    kp_err = float(np.abs(out[..., 23:] - ref[..., 23:]).mean())
    assert prob_err < 0.03, prob_err
    assert kp_err < 10.0, kp_err
    mixed = quantize_int8(onnx_256, tmp_path / "mixed.onnx", coco_images[30:], num_images=2, float_layers=2)
    assert json.loads(sidecar_path(mixed).read_text())["quantization"]["float_layers"] == 2
    by_name = {n.name: n.op_type for n in onnx.load(str(mixed)).graph.node}
    assert by_name.get("/layers.0/conv/Conv") == "Conv"  # kept float
    conv_only = quantize_int8(onnx_256, tmp_path / "conv.onnx", coco_images[30:], num_images=1, op_types=["Conv"])
    qlinear = {n.op_type for n in onnx.load(str(conv_only)).graph.node if n.op_type.startswith("QLinear")}
    assert qlinear == {"QLinearConv"}
    with pytest.raises(KapaoError, match="starts from an fp32 export"):
        quantize_int8(q, tmp_path / "again.onnx", coco_images[30:], num_images=1)
    with pytest.raises(KapaoError, match="no calibration images"):
        quantize_int8(onnx_256, tmp_path / "none.onnx", tmp_path)


def test_cpu_torch_backends(model: KapaoModel) -> None:
    import copy

    xt = torch.rand(1, 3, 256, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(xt).numpy()
    x = xt.numpy()
    cl = CpuTorchBackend(copy.deepcopy(model), "fp32")
    assert cl.name == "torch-cl-fp32" and cl.stride == 64 and cl.fixed_hw is None and cl.schema == model.schema
    out = cl(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out[..., 4:23], ref[..., 4:23], atol=1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=0.0127)  # fused-BN allowance
    bf = CpuTorchBackend(copy.deepcopy(model), "bf16")
    out = bf(x)
    assert bf.name == "torch-cl-bf16" and out.dtype == np.float32 and out.shape == ref.shape
    assert float(np.abs(out[..., 4:23] - ref[..., 4:23]).mean()) < 0.02
    with pytest.raises(KapaoError, match="use one of fp32, bf16"):
        CpuTorchBackend(model, "fp16")
    exact = ExactFp32Backend(cl)
    assert exact.name == "torch-cl-fp32-exact" and np.array_equal(exact(x), cl(x))


def test_exact_fp32_restores_settings() -> None:
    conv = torch.backends.mkldnn.conv
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("torch < 2.9 has no per-backend fp32 precision")
    before = conv.fp32_precision
    conv.fp32_precision = "bf16"  # what a user (or a library) may have switched on
    try:
        with exact_fp32():
            assert conv.fp32_precision == "ieee" and torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert conv.fp32_precision == "bf16"
    finally:
        conv.fp32_precision = before


def _poses(kps: np.ndarray, boxes: np.ndarray) -> Poses:
    n = len(kps)
    k3 = np.concatenate((kps, np.zeros((n, 17, 1))), 2)
    return Poses(boxes.astype(np.float32), np.linspace(0.9, 0.5, n).astype(np.float32), k3, coco_schema(), (480, 640))


def test_pose_oks_known_values() -> None:
    rng = np.random.default_rng(0)
    kps = rng.uniform(0, 100, (2, 17, 2))
    boxes = np.array([[0, 0, 100, 100], [200, 200, 250, 300]], np.float64)
    a = _poses(kps, boxes)
    sig = np.asarray(coco_schema().oks_sigmas)
    np.testing.assert_allclose(np.diag(pose_oks(a, a, sig)), [1.0, 1.0])
    shifted = _poses(kps + np.array([3.0, 4.0]), boxes)  # every keypoint 5 px away
    expect = np.exp(-25.0 / (2 * np.array([[10000.0], [5000.0]]) * (2 * sig) ** 2)).mean(-1)
    np.testing.assert_allclose(np.diag(pose_oks(a, shifted, sig)), expect)
    # matching is one-to-one whatever the order; a missing pose counts 0
    swapped = _poses(kps[::-1].copy(), boxes[::-1].copy())
    assert mean_pose_oks([a], [swapped], sig) == pytest.approx(1.0)
    assert mean_pose_oks([a], [a[[0]]], sig) == pytest.approx(0.5)
    empty = Poses.empty(coco_schema(), (480, 640))
    assert mean_pose_oks([empty], [empty], sig) == 1.0


def test_conv_gflops_against_official_count(golden: Path) -> None:
    """Conv work of KAPAO-S at 640x640 vs the official thop count (architecture.json), which
    also counts BatchNorm and the other elementwise layers: ours is the convs alone, ~1 % less."""
    arch = json.loads((golden / "architecture.json").read_text())
    for key, schema in (("kapao_s_coco", coco_schema()), ("kapao_s_crowdpose", crowdpose_schema())):
        official = arch[key]["gflops_thop_full_640x640_input"]
        ours = conv_gflops(KapaoModel("kapao-s", schema), (640, 640))
        assert 0.98 * official < ours < official, (key, ours, official)


def test_conv_bound_measures() -> None:
    for p in ("fp32", "int8"):
        assert conv_bound(p, threads=1, channels=32, size=16, repeats=1) > 0.1
    with pytest.raises(KapaoError, match="use fp32, bf16 or int8"):
        conv_bound("fp8", 1)


def test_benchmark_small(coco_images: list[Path], tmp_path: Path) -> None:
    m = KapaoModel("kapao-n", coco_schema())
    apply_weight_rule(m, 0)
    rows = run_benchmark(m.eval(), coco_images[:2], [256], ["torch-fused", "torch-cl", "ort-fp32", "ort-int8"], threads=1,
                         workdir=tmp_path, calib_images=coco_images[40:42])
    assert [r.backend for r in rows] == ["torch-fused", "torch-cl", "ort-fp32", "ort-int8"]
    assert all(r.images == 2 and r.total_ms > 0 and set(r.ms) == {"read", "pre", "forward", "post"} for r in rows)
    assert rows[0].mean_oks is None and rows[1].mean_oks > 0.99 and rows[2].mean_oks > 0.99
    assert 0.0 <= rows[3].mean_oks <= 1.0
    assert all(r.bound_ms is None and r.bound_ratio is None for r in rows)  # no bounds asked for


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def test_benchmark_rows_carry_their_own_bound(coco_images: list[Path], tmp_path: Path) -> None:
    """With bounds, each row's forward bound is measured during the row, at the row's precision
    (int8 rows against the int8 conv, fp32 rows against fp32), and no forward beats it."""
    from kapao.runtime.bench import ImageWork

    m = KapaoModel("kapao-n", coco_schema())
    apply_weight_rule(m, 0)
    bounds = {"fp32": 1.0, "bf16": 0.0, "int8": 1.0}  # which precisions to measure; bf16 0: skipped
    rows = run_benchmark(m.eval(), coco_images[:2], [256], ["torch-fused", "torch-bf16", "ort-int8"], threads=1,
                         workdir=tmp_path, calib_images=coco_images[40:42], bounds=bounds, rounds=2)
    fp32, bf16, int8 = rows
    gflops = ImageWork.measure(m, coco_images[:2], 256).mean_gflops
    assert 0.1 < gflops < 2.0  # kapao-n at 256
    for r in (fp32, int8):
        assert 0 < r.bound_ms <= r.ms["forward"]
        assert r.bound_ratio == pytest.approx(r.total_ms / r.bound_ms)
    # with VNNI (AVX-512 VNNI or AVX-VNNI) int8 convs run ~4x the fp32 GFLOP/s: the int8 bound is
    # the smaller one; without it (AVX2 only) int8 and fp32 convs run at about the same speed
    if cpu_has_vnni():
        assert int8.bound_ms < fp32.bound_ms
    assert bf16.bound_ms is None and bf16.bound_ratio is None


def test_time_backend_rounds(coco_images: list[Path]) -> None:
    """Several timed rounds: the same poses as one round, one median per stage."""
    from kapao.runtime.bench import time_backend
    from kapao.runtime.torch_backend import TorchBackend

    m = KapaoModel("kapao-n", coco_schema())
    apply_weight_rule(m, 0)
    backend = TorchBackend(m.eval(), fuse=True)
    one, poses1 = time_backend(backend, coco_images[:2], 128, m.schema, "val", rounds=1)
    three, poses3 = time_backend(backend, coco_images[:2], 128, m.schema, "val", rounds=3)
    assert set(three) == set(one) == {"read", "pre", "forward", "post"} and all(v > 0 for v in three.values())
    assert len(poses3) == len(poses1) == 2
    for a, b in zip(poses1, poses3):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)


def test_cli_benchmark_and_int8_export(coco_images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from kapao.cli.main import main
    from kapao.runtime.export import read_metadata

    images = tmp_path / "images"
    images.mkdir()
    for f in coco_images[:3]:
        shutil.copy(f, images / f.name)
    argv = ["benchmark", "--cfg", "kapao-n", "--images", str(images), "--n", "2", "--imgsz", "128",
            "--backends", "torch-fused", "ort-fp32", "--threads", "1", "--workdir", str(tmp_path / "w"), "--rounds", "2"]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the benchmark's thread count does not leak into the caller
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "1 threads" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("torch-fused", "ort-fp32"))]
    # columns: backend imgsz thr read pre forward post total img/s poses | OKS vs ref, matched, x bound
    assert [r[0] for r in rows] == ["torch-fused", "ort-fp32"] and rows[0][10] == "ref"
    assert 0.0 <= float(rows[1][10]) <= 1.0
    assert all(len(r) in (12, 13) and float(r[-1]) >= 1.0 for r in rows)  # x bound: no image beats the bound
    assert main(["benchmark", "--cfg", "kapao-n", "--images", str(tmp_path / "nothing")]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert main(["benchmark", "--cfg", "kapao-n", "--images", str(images), "--calib", str(tmp_path / "nothing")]) == 1
    assert "--calib" in capsys.readouterr().err
    assert main(["benchmark", "--cfg", "kapao-n", "--images", str(images), "--rounds", "0", "--no-bound"]) == 1
    assert "--rounds 0" in capsys.readouterr().err
    onnx_out = tmp_path / "n.onnx"
    assert main(["export", "--cfg", "kapao-n", "--imgsz", "128", "--int8", str(images), "--calib-n", "2",
                 "--out", str(onnx_out)]) == 0
    meta = read_metadata(tmp_path / "n-int8.onnx")
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_images"] == 2
    assert main(["export", "--cfg", "kapao-n", "--format", "torchscript", "--int8", str(images)]) == 1
    assert "--int8 quantizes an ONNX export" in capsys.readouterr().err
