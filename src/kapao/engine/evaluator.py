"""The val loop: the official val dataloader semantics, one post-processing path, OKS AP.

Used by `kapao val` and by training (each epoch), so both report the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kapao.data.dataset import KeypointDataset, create_dataloader
from kapao.data.letterbox import to_input_batch
from kapao.engine.metrics import KeypointMetrics, evaluate_keypoints
from kapao.engine.predictor import StageTimes, normalize_flips
from kapao.errors import KapaoError
from kapao.postprocess import postprocess_dets, run_nms
from kapao.presets import Preset, get_preset
from kapao.runtime.base import Backend


@dataclass
class ValResult:
    results: list[dict[str, Any]]  # COCO results format, original-image pixels
    metrics: KeypointMetrics | None  # None for task="test" (results only)
    times: StageTimes
    fused_per_keypoint: np.ndarray  # (K,) keypoint objects fused into poses, per keypoint type
    num_images: int
    outputs: list[Path] = field(default_factory=list)
    backend: str = ""  # the runtime's name, as printed and stored in metrics.json

    def speed_line(self) -> str:
        per = self.times.per_image()
        return "Speed ms/image: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items())


class ModelBackend:
    """The Backend over a plain KapaoModel (e.g. the EMA model during training), unfused, run in
    eval mode and put back in its previous mode after each call; TTA as the torch backend."""

    fixed_hw: tuple[int, int] | None = None
    default_imgsz: int | None = None
    supports_tta = True

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.schema = model.schema
        self.stride = int(model.max_stride)
        self.precision = "fp32"
        self.name = "torch-model"

    @torch.no_grad()
    def _run(self, x: np.ndarray, scales: Sequence[float] | None, flips: Sequence[int | None] | None) -> np.ndarray:
        from kapao.runtime.torch_backend import as_array, as_tensor

        was_training = self.model.training
        self.model.eval()
        p = next(self.model.parameters())
        t = as_tensor(x, p.device, p.dtype)
        try:
            out = self.model(t, augment=True, scales=scales, flips=flips) if scales else self.model(t)
        finally:
            self.model.train(was_training)
        return as_array(out)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(x, None, None)

    def augmented(self, x: np.ndarray, scales: Sequence[float], flips: Sequence[int | None]) -> np.ndarray:
        return self._run(x, scales, flips)


def model_backend(model: torch.nn.Module) -> Backend:
    """A Backend over a plain KapaoModel (see ModelBackend)."""
    return ModelBackend(model)


def image_ids_in_order(dataset: KeypointDataset) -> np.ndarray:
    """COCO image id of every dataset item (dataset order: rect batches sort by aspect ratio)."""
    return dataset.ann.image_ids[dataset.order]


def run_validation(
    backend: Backend,
    dataset: KeypointDataset,
    preset: Preset | str = "val",
    batch_size: int = 8,
    scales: Sequence[float] | None = None,
    flips: Sequence[int | None] | None = None,
    workers: int = 0,
    task: str = "val",
    progress: bool = True,
    evaluator: str | None = None,
    **overrides: Any,
) -> ValResult:
    """Predict every image of `dataset` (a val-mode KeypointDataset) and score the results
    against its annotation file (task 'val'), or only collect them (task 'test')."""
    if dataset.augment:
        raise KapaoError("run_validation needs a val-mode dataset (augment=False)")
    if task not in ("val", "test"):
        raise KapaoError(f"task {task!r}; use val or test")
    preset = preset if isinstance(preset, Preset) else get_preset(preset, **overrides)
    flips = normalize_flips(flips)
    if scales and not flips:
        flips = [None] * len(scales)
    schema = dataset.schema
    k = schema.num_keypoints
    if len(dataset) == 0:
        raise KapaoError(f"{dataset.ann.json_path}: no images to validate on")
    loader = create_dataloader(dataset, dataset.batch_size if dataset.rect else batch_size, workers=workers)
    ids = image_ids_in_order(dataset)
    times = StageTimes()
    fused = np.zeros(k, dtype=np.int64)
    results: list[dict[str, Any]] = []
    seen = 0
    bar = tqdm(loader, desc=f"val {dataset.ann.json_path.name}", disable=not progress, unit="batch")
    t_read = time.perf_counter()
    for imgs, _labels, _paths, shapes in bar:
        t0 = time.perf_counter()
        times.add("read", t0 - t_read)
        x = to_input_batch(list(imgs.numpy()))
        t1 = time.perf_counter()
        pred = backend.augmented(x, scales, flips) if scales else backend(x)
        t2 = time.perf_counter()
        if pred.shape[-1] != 6 + 3 * k:
            raise KapaoError(
                f"the model predicts {(pred.shape[-1] - 6) // 3} keypoints but {dataset.ann.json_path} has {k}; "
                "use weights trained for this keypoint set"
            )
        person_dets, kp_dets = run_nms(pred, preset, k)
        t3 = time.perf_counter()
        orig_hws = [s[0] for s in shapes]
        poses_list = postprocess_dets(person_dets, kp_dets, preset, tuple(x.shape[2:]), orig_hws, schema)
        t4 = time.perf_counter()
        for poses in poses_list:
            fused += (poses.keypoints[..., 2] > 0).sum(0)
            results.extend(poses.to_coco(int(ids[seen])))
            seen += 1
        times.add("pre", t1 - t0)
        times.add("forward", t2 - t1)
        times.add("nms", t3 - t2)
        times.add("fusion", t4 - t3)
        t_read = time.perf_counter()
    times.images = seen
    metrics = None
    if task == "val":
        metrics = evaluate_keypoints(dataset.ann.json_path, results, schema, image_ids=[int(i) for i in ids], evaluator=evaluator)
        metrics = replace(metrics, backend=backend.name)
    return ValResult(results, metrics, times, fused, seen, backend=backend.name)
