"""Runtime benchmark: per-stage time and pose agreement of each backend/precision on real images.

Stages per image: read (cv2.imread), pre (letterbox + to tensor), forward (backend), post (NMS +
keypoint-object fusion, `kapao.postprocess`). Agreement: mean OKS between each backend's poses and
the reference (first) backend's poses on the same images. Next to the results, the measured
throughput bound of one large 3x3 convolution on this CPU in fp32, bf16 and int8.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kapao.data.letterbox import prepare_input, read_image, to_input_batch
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.postprocess import postprocess
from kapao.results import Poses
from kapao.runtime.base import Backend
from kapao.schema import KeypointSchema

# torch-eager: unfused, NCHW; torch-fused: BN folded; torch-cl: fused + channels-last;
# torch-bf16: torch-cl with a bf16 backbone; ort-*: ONNX Runtime and ov-*: OpenVINO on a
# dynamic-shape export (ort-int8: QOperator ONNX; ov-int8: NNCF-quantized OpenVINO IR)
BACKENDS = ("torch-eager", "torch-fused", "torch-cl", "torch-bf16", "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8")
# the arithmetic each backend's convolutions run in: the conv bound its row is compared with
BACKEND_PRECISION = {
    "torch-eager": "fp32", "torch-fused": "fp32", "torch-cl": "fp32", "ort-fp32": "fp32", "ov-fp32": "fp32",
    "torch-bf16": "bf16", "ov-bf16": "bf16", "ort-int8": "int8", "ov-int8": "int8",
}
STAGES = ("read", "pre", "forward", "post")
RECALL_OKS = 0.5  # a pose counts as found again when its best partner has at least this OKS
BUSY_WAIT_S = 0.05  # idle time after an untimed torch step before timing resumes


@dataclass
class BenchRow:
    """One (backend, imgsz) measurement: mean ms per stage per image, and agreement."""

    backend: str
    imgsz: int
    threads: int
    ms: dict[str, float]
    images: int
    poses: int
    mean_oks: float | None = None  # vs the reference backend's poses (unmatched = 0); None for the reference
    matched_oks: float | None = None  # mean OKS of the matched pairs only
    # share of the reference's poses that this backend also finds (a partner with OKS >= 0.5)
    recall: float | None = None
    # the forward-time bound of these images at this row's precision, from conv-bound runs
    # interleaved with the row's timed passes (the machine's speed drifts; a ratio needs both
    # sides measured in the same minutes); None when not measured
    bound_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())

    @property
    def bound_ratio(self) -> float | None:
        """End-to-end ms per image over the forward bound: what the issue's targets are stated in."""
        return self.total_ms / self.bound_ms if self.bound_ms else None

    @property
    def images_per_s(self) -> float:
        return 1000.0 / self.total_ms if self.total_ms > 0 else float("inf")


def pose_oks(ref: Poses, other: Poses, sigmas: Sequence[float]) -> np.ndarray:
    """OKS (n_ref, n_other) between two pose sets of one image, every keypoint counted, with the
    reference pose's box area as the object scale (COCO's OKS with k = 2 sigma)."""
    a = ref.keypoints[:, None, :, :2].astype(np.float64)
    b = other.keypoints[None, :, :, :2].astype(np.float64)
    d2 = ((a - b) ** 2).sum(-1)  # (n_ref, n_other, K)
    wh = (ref.boxes[:, 2:4] - ref.boxes[:, 0:2]).astype(np.float64)
    area = np.maximum(wh[:, 0] * wh[:, 1], 1.0)[:, None, None]
    var = (2.0 * np.asarray(sigmas, np.float64)) ** 2
    return np.exp(-d2 / (2.0 * area * var)).mean(-1)


def match_poses(refs: Sequence[Poses], others: Sequence[Poses], sigmas: Sequence[float]) -> tuple[list[float], int]:
    """Greedy one-to-one matching per image, highest OKS first -> (OKS of every matched pair,
    number of poses left without a partner on either side)."""
    matched: list[float] = []
    unmatched = 0
    for r, o in zip(refs, others):
        n, m = len(r), len(o)
        pairs = 0
        if n and m:
            oks = pose_oks(r, o, sigmas)
            for _ in range(min(n, m)):
                i, j = np.unravel_index(int(np.argmax(oks)), oks.shape)
                matched.append(float(oks[i, j]))
                oks[i, :], oks[:, j] = -1.0, -1.0
                pairs += 1
        unmatched += max(n, m) - pairs
    return matched, unmatched


def mean_pose_oks(refs: Sequence[Poses], others: Sequence[Poses], sigmas: Sequence[float]) -> float:
    """Mean OKS over greedily matched pose pairs, a pose without a partner on either side
    counting as 0 (so both missing/extra detections and keypoint shifts lower it); 1.0 when no
    image has any pose."""
    matched, unmatched = match_poses(refs, others, sigmas)
    n = len(matched) + unmatched
    return float(sum(matched) / n) if n else 1.0


def preprocess(img_bgr: np.ndarray, imgsz: int, backend: Backend) -> np.ndarray:
    """The predictor's input for this backend's shape policy -> (1, 3, H, W) float32 in [0, 1]."""
    return to_input_batch([prepare_input(img_bgr, imgsz, backend.stride, backend.fixed_hw)[0]])


def time_backend(
    backend: Backend,
    files: Sequence[Path],
    imgsz: int,
    schema: KeypointSchema,
    preset: str = "demo",
    warmup: int | None = None,
    rounds: int = 1,
    before_round: Callable[[], Any] | None = None,
) -> tuple[dict[str, float], list[Poses]]:
    """Run the whole pipeline image by image; mean ms per stage and the poses of every image.
    First `warmup` images (None: all) run untimed, so every input shape is seen once: runtimes
    prepare kernels per shape (oneDNN primitives, OpenVINO compiles a graph per shape), a one-off
    cost that a video at a fixed size pays once. With `rounds` > 1 every image is timed that many
    times and each stage reports the median of the rounds' means (shared machines drift by
    +-10 % over seconds); the poses are the first round's. `before_round` runs (untimed) before
    each timed round, e.g. to measure the conv bound in the same minutes."""
    for f in list(files)[:warmup]:
        x = preprocess(read_image(f), imgsz, backend)
        backend(x)
    per_round: list[dict[str, float]] = []
    poses: list[Poses] = []
    for r in range(max(rounds, 1)):
        if before_round is not None:
            before_round()
            # a torch op leaves its OpenMP workers busy-waiting for ~5-10 ms (libgomp's spin),
            # which slowed the next ONNX Runtime forward by ~10 ms here: let them go idle first
            time.sleep(BUSY_WAIT_S)
        acc = dict.fromkeys(STAGES, 0.0)
        for f in files:
            t0 = time.perf_counter()
            img = read_image(f)
            t1 = time.perf_counter()
            x = preprocess(img, imgsz, backend)
            t2 = time.perf_counter()
            pred = backend(x)
            t3 = time.perf_counter()
            out = postprocess(pred, preset, tuple(x.shape[2:]), [img.shape[:2]], schema, [str(f)])
            t4 = time.perf_counter()
            if r == 0:
                poses += out
            for k, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                acc[k] += dt * 1000.0
        per_round.append({k: v / max(len(files), 1) for k, v in acc.items()})
    return {k: float(np.median([m[k] for m in per_round])) for k in STAGES}, poses


# benchmark row -> (create_backend backend, precision) for the rows that run an exported graph
GRAPH_ROWS = {
    "ort-fp32": ("onnxruntime", "fp32"), "ov-fp32": ("openvino", "fp32"), "ov-bf16": ("openvino", "bf16"),
    "ort-int8": ("onnxruntime", "int8"), "ov-int8": ("openvino", "int8"),
}


def build_backend(
    name: str,
    model: KapaoModel,
    imgsz: int,
    workdir: Path,
    threads: int,
    calib_images: str | Path | Sequence[str | Path] | None = None,
) -> Backend:
    """One named backend for `model` (copied, never modified). The graph rows go through
    `create_backend` exactly as `kapao predict --backend ... --precision ...` does (weights saved
    once into `workdir`, exported and quantized through the export cache); the torch rows are the
    torch-layer variants the benchmark compares them with (eager as the official demo, fused,
    channels-last, bf16 backbone)."""
    from kapao.runtime.torch_backend import TorchBackend
    from kapao.runtime.torch_cpu import CpuTorchBackend, ExactFp32Backend

    m = copy.deepcopy(model).float().eval()
    if name == "torch-eager":
        return ExactFp32Backend(TorchBackend(m, fuse=False))
    if name == "torch-fused":
        return ExactFp32Backend(TorchBackend(m, fuse=True))
    if name == "torch-cl":
        return CpuTorchBackend(m, "fp32")
    if name == "torch-bf16":
        return CpuTorchBackend(m, "bf16")
    if name in GRAPH_ROWS:
        from kapao.runtime.factory import create_backend
        from kapao.weights.checkpoint import save

        if GRAPH_ROWS[name][1] == "int8" and calib_images is None:
            raise KapaoError(f"{name} needs calibration images (a folder of real photos)")
        weights = workdir / f"{model.cfg.name}-{model_digest(model)}-{imgsz}.safetensors"
        if not weights.is_file():
            save(m, weights, info={"recipe": {"imgsz": imgsz}}, half=False)
        runtime, precision = GRAPH_ROWS[name]
        return create_backend(weights, runtime, precision=precision, threads=threads, calib=calib_images, quiet=True)
    raise KapaoError(f"benchmark backend {name!r}: choose from {', '.join(BACKENDS)}")


def model_digest(model: KapaoModel) -> str:
    """A short digest of a model's weights (its saved copy in the workdir is named by it; the
    export cache keys by the saved file's own content hash)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def conv_gflops(model: KapaoModel, hw: tuple[int, int]) -> float:
    """Convolution GFLOPs (2 x multiply-adds) of one forward at input (H, W): the work the conv
    bound divides. Counted with forward hooks on every nn.Conv2d of a float32 copy."""
    total = 0.0

    def hook(m: torch.nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += 2.0 * (m.in_channels // m.groups) * kh * kw * out.numel()

    m = copy.deepcopy(model).float().eval()
    handles = [c.register_forward_hook(hook) for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    with torch.inference_mode():
        m.forward_raw(torch.zeros(1, 3, *hw))
    for h in handles:
        h.remove()
    return total / 1e9


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set for a block and restored after it: callers in the same
    process (tests, notebooks) keep theirs, and the fp32 forward's rounding depends on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def conv_bound(precision: str, threads: int, channels: int = 256, size: int = 64, repeats: int = 5) -> float:
    """Measured GFLOP/s (GOP/s for int8) of one 3x3 conv, channels -> channels on size x size:
    fp32 and bf16 with torch (oneDNN, channels-last), int8 with ONNX Runtime's QLinearConv
    (u8 activations, s8 weights, as the INT8 path). The best of `repeats` runs."""
    flops = 2.0 * channels * channels * 9 * size * size
    if precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype).eval()
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(1, channels, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch_threads(threads):
            run: Callable[[], Any] = lambda: conv(x)  # noqa: E731
            return flops / _best_time(run, repeats) / 1e9
    if precision == "int8":
        sess, feed = _int8_conv_session(channels, size, threads)
        return flops / _best_time(lambda: sess.run(None, feed), repeats) / 1e9
    raise KapaoError(f"conv bound precision {precision!r}: use fp32, bf16 or int8")


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _int8_conv_session(channels: int, size: int, threads: int) -> tuple[Any, dict[str, np.ndarray]]:
    from onnx import TensorProto, helper, numpy_helper

    from kapao.runtime.onnx_backend import import_onnxruntime, session_options

    ort = import_onnxruntime()
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(channels, channels, 3, 3), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(channels, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "conv_bound",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, channels, size, size])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    x = rng.integers(0, 256, size=(1, channels, size, size), dtype=np.uint8)
    return sess, {"x": x}


def run_benchmark(
    model: KapaoModel,
    images: Sequence[str | Path],
    imgsz_list: Sequence[int] = (640, 1024, 1280),
    backends: Sequence[str] = BACKENDS,
    threads: int | None = None,
    preset: str = "demo",
    workdir: str | Path = ".kapao-bench",
    calib_images: str | Path | Sequence[str | Path] | None = None,
    log: Callable[[str], None] | None = None,
    bounds: dict[str, float] | None = None,
    rounds: int = 1,
) -> list[BenchRow]:
    """Every backend at every imgsz on `images`; the first backend is the OKS reference. With
    `log`, each row is logged as it is measured, and with `bounds` (GFLOP/s per precision, from
    `measure_bounds`) the forward-time bound of the typical input shape after each imgsz; each row
    then also re-measures the conv bound of its precision before every timed round (where `bounds`
    has it) and carries the median as `bound_ms` (its `x bound` column).
    rounds: timed passes over the images per row, stages reported as medians (`time_backend`)."""
    files = [Path(p) for p in images]
    if not files:
        raise KapaoError("benchmark: no images given; pass a folder of real photos")
    threads = int(threads or torch.get_num_threads())
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads):
        return _run_benchmark(model, files, imgsz_list, backends, threads, preset, workdir, calib_images, log, bounds, rounds)


def _run_benchmark(
    model: KapaoModel,
    files: list[Path],
    imgsz_list: Sequence[int],
    backends: Sequence[str],
    threads: int,
    preset: str,
    workdir: Path,
    calib_images: str | Path | Sequence[str | Path] | None,
    log: Callable[[str], None] | None,
    bounds: dict[str, float] | None,
    rounds: int,
) -> list[BenchRow]:
    rows: list[BenchRow] = []
    for imgsz in imgsz_list:
        ref_poses: list[Poses] | None = None
        work = ImageWork.measure(model, files, imgsz) if bounds else None
        for name in backends:
            backend = build_backend(name, model, imgsz, workdir, threads, calib_images)
            precision = BACKEND_PRECISION[name]
            samples: list[float] = []
            measure = (lambda: samples.append(conv_bound(precision, threads))) if bounds and bounds.get(precision) else None
            ms, poses = time_backend(backend, files, imgsz, model.schema, preset, rounds=rounds, before_round=measure)
            row = BenchRow(name, imgsz, threads, ms, len(files), sum(len(p) for p in poses))
            if samples and work is not None:
                row.bound_ms = work.mean_gflops / float(np.median(samples)) * 1000.0
            if ref_poses is None:
                ref_poses = poses
            else:
                matched, unmatched = match_poses(ref_poses, poses, model.schema.oks_sigmas)
                n = len(matched) + unmatched
                row.mean_oks = float(sum(matched) / n) if n else 1.0
                row.matched_oks = float(np.mean(matched)) if matched else None
                n_ref = sum(len(p) for p in ref_poses)
                row.recall = sum(o >= RECALL_OKS for o in matched) / n_ref if n_ref else 1.0
            rows.append(row)
            if log:
                log(format_row(row))
        if log and work is not None and bounds:
            log(format_forward_bounds(work, bounds))
    return rows


def input_shapes(files: Sequence[Path], imgsz: int, stride: int) -> list[tuple[int, int]]:
    """The demo-letterbox network input (H, W) of each image at imgsz."""
    out = []
    for f in files:
        h0, w0 = read_image(f).shape[:2]
        r = imgsz / max(h0, w0)
        h, w = round(h0 * r), round(w0 * r)
        out.append((-(-h // stride) * stride, -(-w // stride) * stride))
    return out


@dataclass(frozen=True)
class ImageWork:
    """The conv work of the timed images at one imgsz: each image's input shape and the GFLOPs
    of one forward per distinct shape (counted once, used by every row and the bound line)."""

    shapes: list[tuple[int, int]]
    gflops: dict[tuple[int, int], float]

    @classmethod
    def measure(cls, model: KapaoModel, files: Sequence[Path], imgsz: int) -> ImageWork:
        shapes = input_shapes(files, imgsz, model.max_stride)
        return cls(shapes, {hw: conv_gflops(model, hw) for hw in set(shapes)})

    @property
    def mean_gflops(self) -> float:
        """Averaged over the images (what per-image mean times are compared with)."""
        return float(np.mean([self.gflops[hw] for hw in self.shapes]))

    @property
    def typical_shape(self) -> tuple[int, int]:
        return max(self.gflops, key=self.shapes.count)


def format_forward_bounds(work: ImageWork, bounds: dict[str, float]) -> str:
    """The forward-time bound per precision at the most common input shape, and averaged over the
    timed images' own shapes (what the per-image mean times of the table are to be compared with)."""
    typical, mean = work.typical_shape, work.mean_gflops
    parts = []
    for label, g in ((f"at {typical[0]}x{typical[1]} ({work.gflops[typical]:.1f} GFLOPs)", work.gflops[typical]),
                     (f"mean over these images ({mean:.1f} GFLOPs)", mean)):
        ms = ", ".join(f"{p} {g / v * 1000:.0f} ms" for p, v in bounds.items() if v > 0)
        parts.append(f"{label}: {ms}")
    return "  forward bound " + "; ".join(parts)


def format_header() -> str:
    cols = "".join(f"{s + ' ms':>11}" for s in STAGES)
    return (
        f"{'backend':<14}{'imgsz':>6}{'thr':>4}{cols}{'total ms':>10}{'img/s':>8}{'poses':>7}"
        f"{'OKS vs ref':>11}{'matched':>9}{'recall':>8}{'x bound':>9}"
    )


def format_row(r: BenchRow) -> str:
    cols = "".join(f"{r.ms[s]:>11.1f}" for s in STAGES)
    oks = "ref" if r.mean_oks is None else f"{r.mean_oks:.4f}"
    matched = "" if r.matched_oks is None else f"{r.matched_oks:.4f}"
    recall = "" if r.recall is None else f"{r.recall:.3f}"
    ratio = "" if r.bound_ratio is None else f"{r.bound_ratio:.2f}"
    return (
        f"{r.backend:<14}{r.imgsz:>6}{r.threads:>4}{cols}{r.total_ms:>10.1f}{r.images_per_s:>8.2f}{r.poses:>7}"
        f"{oks:>11}{matched:>9}{recall:>8}{ratio:>9}"
    )


def measure_bounds(threads: int) -> dict[str, float]:
    """The 3x3-conv GFLOP/s (GOP/s for int8) per precision on this CPU; 0 where it cannot run."""
    out = {}
    for p in ("fp32", "bf16", "int8"):
        try:
            out[p] = conv_bound(p, threads)
        except Exception:  # a precision this CPU/runtime lacks: 0, shown as n/a
            out[p] = 0.0
    return out


def format_bounds(bounds: dict[str, float], threads: int) -> str:
    """One line: the measured 3x3-conv bound per precision."""
    parts = ", ".join(f"{p} {v:.0f}" if v > 0 else f"{p} n/a" for p, v in bounds.items())
    return f"3x3 conv 256->256 @64x64, {threads} threads, GFLOP/s (GOP/s int8): {parts}"
