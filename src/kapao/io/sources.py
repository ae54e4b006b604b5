"""Turn a user's SOURCE (image, folder, glob, video, webcam index) into a stream of BGR frames.

Bad items never stop the stream: each is reported once as a one-line `SourceError` through the
`errors` list, and the remaining items are still read.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kapao.errors import KapaoError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".gif"}


@dataclass(frozen=True)
class SourceItem:
    kind: str  # "image" | "video" | "webcam"
    path: str  # file path, or the webcam index as a string


@dataclass
class Frame:
    image: np.ndarray  # (H, W, 3) BGR uint8
    item: SourceItem
    index: int  # frame index in a video/webcam, 0 for an image
    fps: float | None = None  # source frame rate (videos, webcams)
    num_frames: int | None = None  # frames in the video when known

    @property
    def path(self) -> str:
        return self.item.path


@dataclass(frozen=True)
class SourceError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _classify(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def resolve_source(source: str | int | Sequence[str | int], errors: list[SourceError]) -> list[SourceItem]:
    """Expand SOURCE into items. Missing paths and empty folders go to `errors`."""
    if isinstance(source, (list, tuple)):
        items: list[SourceItem] = []
        for s in source:
            items.extend(resolve_source(s, errors))
        return items
    text = str(source)
    if text.isdigit() and not Path(text).exists():
        return [SourceItem("webcam", text)]
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _classify(p))
        if not files:
            errors.append(SourceError(text, "folder has no images or videos (looked for " + ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES)) + ")"))
        return [SourceItem(_classify(p), str(p)) for p in files]  # type: ignore[arg-type]
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
        matched = [p for p in files if _classify(p)]
        if not matched:
            errors.append(SourceError(text, "pattern matches no images or videos"))
        return [SourceItem(_classify(p), str(p)) for p in matched]  # type: ignore[arg-type]
    if not path.exists():
        errors.append(SourceError(text, "does not exist; give an image, video, folder, glob or webcam index"))
        return []
    kind = _classify(path)
    if kind is None:
        # unknown suffix: try it as an image, then as a video
        kind = "image" if cv2.haveImageReader(str(path)) else "video"
    return [SourceItem(kind, str(path))]


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 image, or a KapaoError saying why it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise KapaoError(f"{p}: does not exist")
    if p.stat().st_size == 0:
        raise KapaoError(f"{p}: file is empty (0 bytes); re-copy or remove it")
    data = np.fromfile(str(p), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise KapaoError(f"{p}: cannot be decoded as an image (corrupt or not an image file)")
    return img


def iter_frames(
    items: Sequence[SourceItem],
    errors: list[SourceError],
    start_s: float | None = None,
    end_s: float | None = None,
) -> Iterator[Frame]:
    """Frames of every item in order. `start_s`/`end_s` cut videos (seconds)."""
    for item in items:
        if item.kind == "image":
            try:
                yield Frame(read_image(item.path), item, 0)
            except KapaoError as e:
                errors.append(SourceError(item.path, str(e).split(": ", 1)[-1]))
            continue
        yield from _iter_video(item, errors, start_s, end_s)


def _iter_video(item: SourceItem, errors: list[SourceError], start_s: float | None, end_s: float | None) -> Iterator[Frame]:
    if item.kind == "webcam":
        cap = cv2.VideoCapture(int(item.path))
    else:
        if Path(item.path).stat().st_size == 0:
            errors.append(SourceError(item.path, "file is empty (0 bytes)"))
            return
        cap = cv2.VideoCapture(item.path)
    if not cap.isOpened():
        what = "webcam cannot be opened (no camera with that index?)" if item.kind == "webcam" else "video cannot be opened (corrupt or unsupported codec)"
        errors.append(SourceError(item.path if item.kind != "webcam" else f"webcam {item.path}", what))
        return
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        first = int(round(start_s * fps)) if (start_s and fps) else 0
        last = int(round(end_s * fps)) if (end_s is not None and fps) else None
        if first:
            cap.set(cv2.CAP_PROP_POS_FRAMES, first)
        index, got = first, 0
        while last is None or index < last:
            ok, img = cap.read()
            if not ok:
                break
            got += 1
            yield Frame(img, item, index, fps, count)
            index += 1
        if got == 0:
            errors.append(SourceError(item.path, "no frames could be read"))
    finally:
        cap.release()
