"""The training / val torch Dataset: COCO-format keypoint JSON + images -> network batches.

One item is (image (3, H, W) uint8 RGB, labels (n, 6 + 3K) float32, path, shapes) where the labels
use the official collate layout

    [img_idx, cls, xc, yc, w, h, x_1, y_1, v_1, ..., x_K, y_K, v_K]

normalised to the returned (letterboxed or augmented) image; `collate` fills img_idx.

* train (`augment=True`): mosaic + random perspective + HSV + flips at imgsz (`kapao.data.augment`),
  crowd regions left out; `shapes` is None.
* val (`augment=False`): the official val dataloader. `load_image_for_val` resize (longest side =
  imgsz, INTER_AREA when shrinking), letterbox (auto=False, scaleup=False) to the imgsz square or,
  with `rect`, to per-batch shapes (images sorted by h/w, stable sort); crowd regions kept;
  `shapes` = ((h0, w0), ((h / h0, w / w0), (padw, padh))). Labels go through the official
  arithmetic in float32 from labels rounded to 6 decimals (as the official label files store them),
  so keypoints of v = 0 and the zero triplets of keypoint objects become (padw/W, padh/H, 0).

An image that cannot be read in a worker does not stop training: it is skipped with a one-line
warning and counted (train: another image takes its place; val: a grey image without labels).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kapao.data.augment import AugmentConfig, augment_train, normalized_to_pixels, pixels_to_normalized
from kapao.data.coco import KeypointAnnotations, load_keypoint_annotations
from kapao.data.letterbox import letterbox, load_image_for_val, read_image, rect_batch_shapes, to_chw_rgb
from kapao.data.targets import image_labels, letterbox_labels
from kapao.errors import KapaoError
from kapao.schema import KeypointSchema, load_data_yaml

SPLITS = ("train", "val", "test")
CACHE_MODES = (None, "ram")


def round6(x: np.ndarray) -> np.ndarray:
    """Round to 6 decimals exactly as '{:.6f}' does (the official label files): np.round, with the
    near-ties (where scaling by 1e6 is inexact) redone by Python's correctly rounded formatting."""
    x = np.asarray(x, np.float64)
    y = np.round(x, 6)
    t = x * 1e6
    tie = np.abs(t - np.floor(t) - 0.5) < 1e-4
    if tie.any():
        y[tie] = [float(f"{v:.6f}") for v in x[tie].tolist()]
    return y


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a data YAML lives, and its keypoint schema."""

    images: Path
    annotations: Path
    schema: KeypointSchema
    data_yaml: str


def split_source(data_yaml: str | Path, split: str = "train") -> SplitSource:
    """Resolve `<split>_images` / `<split>_annotations` of a data YAML (path or shipped name).

    Relative paths are taken from `path`; a relative `path` is resolved against the YAML's own
    folder (for the shipped YAMLs, against the working directory)."""
    if split not in SPLITS:
        raise KapaoError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    data, source = load_data_yaml(data_yaml)
    schema = KeypointSchema.from_yaml(data_yaml)
    missing = [k for k in (f"{split}_images", f"{split}_annotations") if not data.get(k)]
    if missing:
        raise KapaoError(f"{source}: no {' / '.join(missing)} entry; add the {split} split's image folder and "
                         f"annotation JSON (see configs/data/coco-kp.yaml)")
    is_shipped = not Path(data_yaml).is_file()  # load_data_yaml fell back to a shipped name
    base = Path.cwd() if is_shipped else Path(source).resolve().parent
    root = Path(str(data.get("path") or "."))
    root = root if root.is_absolute() else base / root

    def under(v: Any) -> Path:
        p = Path(str(v))
        return p if p.is_absolute() else root / p

    return SplitSource(under(data[f"{split}_images"]), under(data[f"{split}_annotations"]), schema, source)


class KeypointDataset(Dataset):
    """KAPAO training or val items from one COCO-format split (module docstring for the layout).

    annotations: a `KeypointAnnotations` (crowd kept only when reading it for val) or a JSON path
    with `images_dir`. `hyp`: a `kapao.hyp.Hyp`, a dict or an `AugmentConfig` (train only).
    `seed` and `set_epoch` fix the augmentation: item i of epoch e always gets the same sample,
    whatever the number of workers.
    """

    def __init__(
        self,
        annotations: KeypointAnnotations | str | Path,
        schema: KeypointSchema,
        imgsz: int = 640,
        *,
        images_dir: str | Path | None = None,
        augment: bool = False,
        hyp: Any = None,
        rect: bool = False,
        batch_size: int = 16,
        stride: int = 64,
        pad: float = 0.0,
        cache: str | None = None,
        seed: int = 0,
    ) -> None:
        if cache not in CACHE_MODES:
            raise KapaoError(f"cache={cache!r}; use None or 'ram'")
        if imgsz < 1 or imgsz % stride:
            raise KapaoError(f"image size {imgsz} is not a positive multiple of the stride {stride}; use e.g. 640")
        if rect and augment:
            raise KapaoError("rect batches are for val only (the official training ignores them with mosaic)")
        k = schema.num_keypoints
        if not isinstance(annotations, KeypointAnnotations):
            annotations = load_keypoint_annotations(annotations, images_dir, k, keep_crowd=not augment,
                                                    clip_keypoints=schema.evaluator == "crowdpose")
        if annotations.num_keypoints != k:
            raise KapaoError(f"{annotations.json_path}: annotations have {annotations.num_keypoints} keypoints, "
                             f"the schema {k}; use the data YAML that matches the file")
        self.ann = annotations
        self.schema = schema
        self.imgsz = int(imgsz)
        self.augment = bool(augment)
        self.aug = (hyp if isinstance(hyp, AugmentConfig) else
                    AugmentConfig.from_hyp(hyp) if hyp is not None else AugmentConfig()) if augment else None
        self.rect = bool(rect)
        self.batch_size = int(batch_size)
        self.stride = int(stride)
        self.seed = int(seed)
        self.epoch = 0
        self.skipped = 0  # unreadable images met by this process

        hws = np.stack([annotations.heights, annotations.widths], 1) if len(annotations) else np.zeros((0, 2), int)
        if rect:
            order, self.batch_shapes = rect_batch_shapes(hws, imgsz, batch_size, stride, pad)
            self.batch_index = np.arange(len(order)) // batch_size
        else:
            order, self.batch_shapes, self.batch_index = np.arange(len(annotations)), None, None
        self.order = np.asarray(order, dtype=np.int64)
        self.shapes0 = hws[self.order]  # (n, 2) original (h, w) in dataset order
        # Normalised labels per item, float32 rounded to 6 decimals as the official label files.
        # As the official: labels use the schema's kp_bbox, the augmentation the hyp's.
        self.labels = [
            round6(image_labels(a.boxes, a.keypoints, a.height, a.width, schema.kp_bbox)).astype(np.float32)
            for a in (annotations[int(i)] for i in self.order)
        ]
        self.paths = [annotations.path(int(i)) for i in self.order]
        self._bad: set[int] = set()
        self._ram: list[tuple[np.ndarray, tuple[int, int], tuple[int, int]] | None] = [None] * len(self.order)
        if cache == "ram":
            self._fill_ram_cache()

    @classmethod
    def from_data_yaml(cls, data_yaml: str | Path, split: str = "train", **kwargs: Any) -> "KeypointDataset":
        """The dataset of one split; `augment` defaults to True for 'train'."""
        src = split_source(data_yaml, split)
        kwargs.setdefault("augment", split == "train")
        return cls(src.annotations, src.schema, images_dir=src.images, **kwargs)

    # ------------------------------------------------------------------ loading

    def _fill_ram_cache(self) -> None:
        def one(i: int) -> None:
            try:
                self._ram[i] = self._read(i)
            except KapaoError as e:
                self._skip(i, e)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(one, range(len(self))))

    def _read(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        return load_image_for_val(read_image(self.paths[i]), self.imgsz, augment=self.augment)

    def _skip(self, i: int, err: Exception) -> None:
        if i not in self._bad:
            self._bad.add(i)
            self.skipped += 1
            print(f"kapao data: WARNING skipped unreadable image ({self.skipped} so far): {err}", file=sys.stderr)

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Item i resized so its longest side is imgsz: (img BGR, (h0, w0), (h, w)); raises KapaoError."""
        cached = self._ram[i]
        if cached is not None:
            return cached
        if i in self._bad:
            raise KapaoError(f"{self.paths[i]}: unreadable image (skipped before)")
        try:
            return self._read(i)
        except KapaoError as e:
            self._skip(i, e)
            raise

    def _load_train(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(resized image, pixel labels) of item i, or of the next readable item."""
        n = len(self)
        for step in range(n):
            j = (i + step) % n
            try:
                img, _, (h, w) = self.load_image(j)
            except KapaoError:
                continue
            return img, normalized_to_pixels(self.labels[j], w, h)
        raise KapaoError(f"{self.ann.json_path}: none of the {n} images could be read; check the image folder")

    # ------------------------------------------------------------------ items

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations depend on (seed, epoch, index); call once per epoch (as DistributedSampler)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, Any]:
        if self.augment:
            return self._train_item(index)
        return self._val_item(index)

    def _train_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, None]:
        assert self.aug is not None
        img, lab = augment_train(self._load_train, index, len(self), self.imgsz, self.schema.flip_index,
                                 self.aug, self.rng(index))
        h, w = img.shape[:2]
        norm = pixels_to_normalized(lab, w, h, clip_eps=1e-3).astype(np.float32)
        return self._pack(img, norm, str(self.paths[index]), None)

    def target_shape(self, index: int) -> tuple[int, int]:
        """The (H, W) a val item is letterboxed to."""
        if self.batch_shapes is not None:
            bs = self.batch_shapes[self.batch_index[index]]
            return int(bs[0]), int(bs[1])
        return self.imgsz, self.imgsz

    def _val_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, Any]:
        target = self.target_shape(index)
        h0, w0 = (int(v) for v in self.shapes0[index])
        try:
            img, (h0, w0), (h, w) = self.load_image(index)
        except KapaoError:
            blank = np.full((*target, 3), 114, np.uint8)
            shapes = ((h0, w0), ((1.0, 1.0), (0.0, 0.0)))
            return self._pack(blank, self.labels[index][:0], str(self.paths[index]), shapes)
        out, ratio, pad = letterbox(img, target, auto=False, scaleup=False)
        shapes = ((h0, w0), ((h / h0, w / w0), pad))
        lab = letterbox_labels(self.labels[index], (ratio[0] * w, ratio[1] * h), pad, out.shape[:2])
        return self._pack(out, lab, str(self.paths[index]), shapes)

    @staticmethod
    def _pack(img: np.ndarray, labels: np.ndarray, path: str, shapes: Any) -> tuple[torch.Tensor, torch.Tensor, str, Any]:
        out = torch.zeros((len(labels), labels.shape[1] + 1), dtype=torch.float32)
        if len(labels):
            out[:, 1:] = torch.from_numpy(np.asarray(labels, np.float32))
        return torch.from_numpy(to_chw_rgb(img)), out, path, shapes


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, str, Any]]) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """Items -> (images (B, 3, H, W) uint8, labels (N, 6 + 3K) with column 0 = index in batch,
    paths, shapes)."""
    imgs, labels, paths, shapes = zip(*batch)
    for i, lab in enumerate(labels):
        lab[:, 0] = i
    return torch.stack(imgs, 0), torch.cat(labels, 0), paths, shapes


def create_dataloader(
    dataset: KeypointDataset,
    batch_size: int,
    workers: int = 0,
    shuffle: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader with `collate`. Pass a `DistributedSampler` as `sampler` for DDP (shuffle is
    then the sampler's; call both `sampler.set_epoch(e)` and `dataset.set_epoch(e)` each epoch).
    Rect val datasets keep their order (their batches are precomputed for their batch size).
    Workers are not persistent, so each epoch's workers see the current `set_epoch`."""
    if getattr(dataset, "rect", False):
        if batch_size != dataset.batch_size:
            raise KapaoError(f"rect dataset was built for batch size {dataset.batch_size}, the loader asks for "
                             f"{batch_size}; build both with the same batch size")
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
