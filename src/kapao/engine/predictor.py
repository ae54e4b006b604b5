"""The Python API: `KAPAO(weights)(source)` -> Poses, with the official demo pre/post-processing.

    from kapao import KAPAO
    model = KAPAO("kapao_s_coco.pt", device="cpu")
    poses = model("img.jpg", imgsz=1280, preset="demo")        # one image -> Poses
    many = model(["a.jpg", "b.jpg"])                            # list -> list[Poses]
    for poses in model("video.mp4"): ...                        # video -> generator of Poses
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kapao.data.letterbox import preprocess_demo, to_input_batch
from kapao.errors import KapaoError
from kapao.io.sources import Frame, SourceError, SourceItem, iter_frames, read_image, resolve_source
from kapao.postprocess import postprocess
from kapao.presets import Preset, get_preset
from kapao.results import Poses
from kapao.runtime.torch_backend import TorchBackend
from kapao.schema import KeypointSchema

DEFAULT_IMGSZ = 1280  # the official models' input size


@dataclass
class StageTimes:
    """Accumulated wall time per stage (ms) and the number of images, for speed reports."""

    ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    images: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.ms[stage] += seconds * 1000.0

    def per_image(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {k: v / n for k, v in self.ms.items()}

    def table(self) -> str:
        per = self.per_image()
        cols = " ".join(f"{k} {v:.1f}" for k, v in per.items())
        return f"{self.images} images, ms/image: {cols}, total {sum(per.values()):.1f}"


def normalize_flips(flips: Sequence[int | None] | None) -> list[int | None] | None:
    """CLI flips use -1 for 'no flip' (as the official scripts); the model wants None."""
    if flips is None:
        return None
    return [None if (f is None or int(f) == -1) else int(f) for f in flips]


BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")


def make_backend(
    weights: str | Path | None,
    device: str,
    half: bool,
    backend: str,
    data: str | None,
    precision: str = "fp32",
    threads: int | None = None,
):
    """The inference backend for a weights file/name (torch) or an exported .onnx (onnxruntime,
    openvino). precision "bf16": torch (CPU) runs a bf16 backbone, openvino its bf16 mode; "fp32"
    asks every runtime for IEEE fp32 where it would otherwise pick bf16 by itself."""
    schema = KeypointSchema.from_yaml(data) if data else None
    if backend not in BACKENDS:
        raise KapaoError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise KapaoError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    on_cuda = str(device).startswith("cuda")
    suffix = Path(str(weights)).suffix if weights is not None else ""
    if backend == "torch" and suffix in (".onnx", ".xml"):
        backend = "onnxruntime" if suffix == ".onnx" else "openvino"  # an exported file needs a graph runtime
    if backend in ("onnxruntime", "openvino"):
        if suffix == ".xml" and backend == "onnxruntime":
            raise KapaoError(f"{weights}: an OpenVINO IR runs on --backend openvino, not onnxruntime")
        if suffix not in (".onnx", ".xml"):
            raise KapaoError(f"--backend {backend} needs --weights MODEL.onnx (make one with `kapao export`)")
        if backend == "openvino":
            from kapao.runtime.openvino_backend import OpenVinoBackend

            return OpenVinoBackend(str(weights), precision=precision, device="gpu" if on_cuda else "cpu", threads=threads)
        if precision != "fp32":
            raise KapaoError("--precision bf16 is for the torch and openvino backends; for onnxruntime export an --int8 file")
        from kapao.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(str(weights), providers="cuda" if on_cuda else "cpu", threads=threads)
    from kapao import weights as weights_lib

    model, meta = weights_lib.load(weights if weights is not None else weights_lib.default_weights(), device="cpu", schema=schema)
    if precision == "bf16":
        if on_cuda:
            raise KapaoError("--precision bf16 is the CPU path; on CUDA use --half")
        from kapao.runtime.torch_cpu import CpuTorchBackend

        runner = CpuTorchBackend(model, "bf16")
    else:
        runner = TorchBackend(model, device=device, half=half)
    # the size the weights were trained for: the shipped model's recipe, or the registry's (1280)
    trained = (meta.info or {}).get("recipe", {}).get("imgsz") or (meta.registry.input_size if meta.registry else None)
    runner.default_imgsz = int(trained) if trained else DEFAULT_IMGSZ
    return runner


class KAPAO:
    """A loaded KAPAO model with the official pre- and post-processing around it."""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "cpu",
        half: bool = False,
        backend: str = "torch",
        data: str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
    ):
        self.backend = make_backend(weights, device, half, backend, data, precision, threads)
        self.schema: KeypointSchema = self.backend.schema
        self.stride: int = int(self.backend.stride)
        self.default_imgsz: int = int(getattr(self.backend, "default_imgsz", DEFAULT_IMGSZ))
        self.times = StageTimes()

    # -- core: arrays in, Poses out --------------------------------------------------------------

    def predict_images(
        self,
        images: Sequence[np.ndarray],
        imgsz: int | None = None,
        preset: str | Preset = "demo",
        scales: Sequence[float] | None = None,
        flips: Sequence[int | None] | None = None,
        batch_size: int = 8,
        paths: Sequence[str | None] | None = None,
        **overrides: Any,
    ) -> list[Poses]:
        """BGR uint8 images -> one Poses each. Images whose letterboxed shapes agree run as one batch.
        imgsz None: the size the weights were trained at (1280 for the official weights)."""
        imgsz = imgsz or self.default_imgsz
        params = preset if isinstance(preset, Preset) else get_preset(preset, **overrides)
        flips = normalize_flips(flips)
        if scales is not None and flips is None:
            flips = [None] * len(scales)
        if flips is not None and scales is None:
            scales = [1.0] * len(flips)
        if scales is not None and not isinstance(self.backend, TorchBackend):
            raise KapaoError(f"test-time augmentation (scales/flips) runs on the fp32 torch backend, not {self.backend.name}")
        results: list[Poses | None] = [None] * len(images)
        prepared = []
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise KapaoError(f"image {i}: expected a BGR uint8 array (H, W, 3), got {getattr(img, 'shape', type(img))}")
            if self.backend.fixed_hw is not None:
                from kapao.data.letterbox import letterbox, to_chw_rgb

                lb, _, _ = letterbox(img, self.backend.fixed_hw, auto=False, scaleup=True, stride=self.stride)
                chw = to_chw_rgb(lb)
            else:
                chw, _, _ = preprocess_demo(img, imgsz, self.stride)
            prepared.append(chw)
        self.times.add("pre", time.perf_counter() - t0)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, chw in enumerate(prepared):
            groups[chw.shape[1:]].append(i)
        for shape, idx in groups.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                t0 = time.perf_counter()
                x = to_input_batch([prepared[i] for i in chunk])
                pred = self.backend(x, scales=scales, flips=flips) if scales else self.backend(x)
                t1 = time.perf_counter()
                out = postprocess(
                    pred, params, tuple(shape), [images[i].shape[:2] for i in chunk], self.schema,
                    paths=[paths[i] for i in chunk] if paths is not None else None,
                )
                t2 = time.perf_counter()
                self.times.add("forward", t1 - t0)
                self.times.add("post", t2 - t1)
                for i, poses in zip(chunk, out):
                    results[i] = poses
        self.times.images += len(images)
        return results  # type: ignore[return-value]

    # -- convenience: paths, lists and videos ------------------------------------------------------

    def __call__(self, source: Any, imgsz: int | None = None, preset: str | None = None, **kwargs: Any) -> Any:
        """np.ndarray or image path -> Poses; list -> list[Poses]; video path / webcam index -> generator."""
        if isinstance(source, np.ndarray):
            return self.predict_images([source], imgsz, preset or "demo", **kwargs)[0]
        if isinstance(source, (list, tuple)):
            images = [s if isinstance(s, np.ndarray) else read_image(s) for s in source]
            paths = [None if isinstance(s, np.ndarray) else str(s) for s in source]
            return self.predict_images(images, imgsz, preset or "demo", paths=paths, **kwargs)
        errors: list[SourceError] = []
        items = resolve_source(source, errors)
        if errors:
            raise KapaoError(str(errors[0]))
        if len(items) == 1 and items[0].kind == "image":
            return self.predict_images([read_image(items[0].path)], imgsz, preset or "demo", paths=[items[0].path], **kwargs)[0]
        if all(i.kind == "image" for i in items):
            return self(list(i.path for i in items), imgsz, preset, **kwargs)
        return (poses for _, poses in self.stream(items, imgsz, preset or "demo_video", **kwargs))

    def stream(
        self,
        items: Sequence[SourceItem],
        imgsz: int | None = None,
        preset: str = "demo_video",
        errors: list[SourceError] | None = None,
        batch_size: int = 1,
        start_s: float | None = None,
        end_s: float | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[Frame, Poses]]:
        """(frame, poses) for every frame of every item; unreadable items are appended to `errors`."""
        errors = errors if errors is not None else []
        t_read = time.perf_counter()
        batch: list[Frame] = []
        for frame in iter_frames(items, errors, start_s, end_s):
            self.times.add("read", time.perf_counter() - t_read)
            batch.append(frame)
            if len(batch) >= batch_size:
                yield from self._flush(batch, imgsz, preset, kwargs)
                batch = []
            t_read = time.perf_counter()
        if batch:
            yield from self._flush(batch, imgsz, preset, kwargs)

    def _flush(self, batch: list[Frame], imgsz: int | None, preset: str, kwargs: dict[str, Any]) -> Iterable[tuple[Frame, Poses]]:
        poses = self.predict_images([f.image for f in batch], imgsz, preset, paths=[f.path for f in batch], **kwargs)
        return zip(batch, poses)
