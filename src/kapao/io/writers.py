"""Output writers. Everything is written to a temporary name beside the target and renamed when
complete, so an interrupted run never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kapao.errors import KapaoError


def _temp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are as readable as any other file
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path)
    except OSError as e:
        raise KapaoError(f"{path}: cannot write here ({e.strerror}); choose a writable folder") from None
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


def write_image(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix or ".jpg", image)
    except cv2.error:
        ok = False
    if not ok:
        raise KapaoError(f"{path}: OpenCV cannot encode an image with this extension; use .jpg or .png")
    return atomic_write_bytes(path, buf.tobytes())


class VideoSink:
    """mp4 writer: frames go to a temporary file that becomes `path` on `close()`."""

    def __init__(self, path: str | Path, fps: float, size_wh: tuple[int, int]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temp_beside(self.path)
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps or 30.0), size_wh)
        if not self.writer.isOpened():
            self.tmp.unlink(missing_ok=True)
            raise KapaoError(f"{self.path}: OpenCV cannot open an mp4 writer here (no mp4v encoder?)")
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        self.writer.write(frame)
        self.frames += 1

    def close(self) -> Path:
        self.writer.release()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.writer.release()
        self.tmp.unlink(missing_ok=True)


class GifSink:
    """Animated GIF of the drawn frames, resized so the longest side is `size` pixels."""

    def __init__(self, path: str | Path, fps: float, size: int = 480):
        self.path = Path(path)
        self.duration_ms = int(round(1000 / (fps or 10.0)))
        self.size = size
        self.frames: list[Any] = []

    def write(self, frame: np.ndarray) -> None:
        from PIL import Image

        h, w = frame.shape[:2]
        r = self.size / max(h, w)
        small = cv2.resize(frame, (max(int(w * r), 1), max(int(h * r), 1)), interpolation=cv2.INTER_AREA)
        self.frames.append(Image.fromarray(cv2.cvtColor(small, cv2.COLOR_BGR2RGB)))

    def close(self) -> Path:
        if not self.frames:
            raise KapaoError(f"{self.path}: no frames to write into the GIF")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(self.path)
        try:
            self.frames[0].save(tmp, format="GIF", save_all=True, append_images=self.frames[1:], duration=self.duration_ms, loop=0)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self.frames.clear()


def next_run_dir(project: str | Path, name: str = "exp", exist_ok: bool = False) -> Path:
    """`project/name`, or `project/name2`, `name3`, ... when it exists (unless exist_ok)."""
    project = Path(project)
    first = project / name
    if exist_ok or not first.exists():
        first.mkdir(parents=True, exist_ok=True)
        return first
    taken = [int(m.group(1)) for p in project.glob(f"{name}*") if (m := re.fullmatch(re.escape(name) + r"(\d+)", p.name))]
    n = max(taken + [1]) + 1
    run = project / f"{name}{n}"
    run.mkdir(parents=True, exist_ok=False)
    return run
