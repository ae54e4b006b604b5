"""The Python API: `KAPAO(weights)(source)` -> Poses, with the official demo pre/post-processing.

    from kapao import KAPAO
    model = KAPAO("kapao_s_coco.pt")      # auto: exported once to a cached ONNX, run by ONNX Runtime
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

from kapao.data.letterbox import prepare_input, to_input_batch
from kapao.errors import KapaoError
from kapao.io.sources import Frame, SourceError, SourceItem, iter_frames, read_image, resolve_source
from kapao.postprocess import postprocess
from kapao.presets import Preset, get_preset
from kapao.results import Poses
from kapao.runtime.base import Backend, no_tta
from kapao.runtime.factory import DEFAULT_IMGSZ, create_backend
from kapao.schema import KeypointSchema


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


class KAPAO:
    """A loaded KAPAO model with the official pre- and post-processing around it."""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "cpu",
        half: bool = False,
        backend: str = "auto",
        data: str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        calib: str | Path | Sequence[str | Path] | None = None,
        tta: bool = False,
        quiet: bool = False,
    ):
        """weights: a file (official .pt, kapao .safetensors, exported .onnx / OpenVINO .xml), a
        registry name, or None for the shipped model. backend: "auto" (the fastest runtime here,
        see `kapao.runtime.factory`), "torch", "onnxruntime" or "openvino". precision: "fp32",
        "bf16" or "int8" (INT8 calibrated on `calib` images, else on the shipped scenes). tta:
        test-time augmentation will be used (auto then picks torch, the backend that runs it)."""
        self._factory_args = dict(weights=weights, device=device, half=half, data=data, threads=threads, quiet=quiet)
        self._auto = backend == "auto"
        self.backend: Backend = create_backend(backend=backend, precision=precision, calib=calib, tta=tta, **self._factory_args)
        self._tta_backend: Backend | None = self.backend if self.backend.supports_tta else None
        self.schema: KeypointSchema = self.backend.schema
        self.stride: int = int(self.backend.stride)
        self.default_imgsz: int = int(self.backend.default_imgsz or DEFAULT_IMGSZ)
        self.times = StageTimes()

    def tta_backend(self) -> Backend:
        """The backend that runs test-time augmentation: this one if it can, else (auto only) the
        torch backend for the same weights, created on first use."""
        if self._tta_backend is None:
            if not self._auto:
                no_tta(self.backend)
            self._tta_backend = create_backend(backend="auto", tta=True, **self._factory_args)
        return self._tta_backend

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
        backend = self.tta_backend() if scales is not None else self.backend
        results: list[Poses | None] = [None] * len(images)
        prepared = []
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise KapaoError(f"image {i}: expected a BGR uint8 array (H, W, 3), got {getattr(img, 'shape', type(img))}")
            prepared.append(prepare_input(img, imgsz, self.stride, backend.fixed_hw)[0])
        self.times.add("pre", time.perf_counter() - t0)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, chw in enumerate(prepared):
            groups[chw.shape[1:]].append(i)
        for shape, idx in groups.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                t0 = time.perf_counter()
                x = to_input_batch([prepared[i] for i in chunk])
                pred = backend.augmented(x, scales, flips) if scales else backend(x)
                t1 = time.perf_counter()
                out = postprocess(
                    pred, params, tuple(shape), [images[i].shape[:2] for i in chunk], self.schema,
                    paths=[paths[i] for i in chunk] if paths is not None else None,
                )
                t2 = time.perf_counter()
                self.times.add("forward", t1 - t0)
                self.times.add("post", t2 - t1)
                for i, poses in zip(chunk, out):
                    poses.backend = backend.name
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
