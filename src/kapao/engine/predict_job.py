"""A whole prediction job: SOURCE -> drawn images / mp4 / GIF / COCO JSON / CSV under a run folder.

This is what `kapao predict` does; the CLI only parses arguments into `PredictJob`.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kapao.engine.predictor import KAPAO
from kapao.errors import KapaoError
from kapao.io.sources import SourceError, resolve_source
from kapao.io.writers import GifSink, VideoSink, atomic_write_bytes, next_run_dir, write_image, write_json
from kapao.results import Poses
from kapao.track import PoseTracker
from kapao.viz import DrawOptions, draw_fps


@dataclass
class PredictJob:
    source: Any
    imgsz: int | None = None  # None: the size the weights were trained at
    preset: str | None = None  # None: "demo" for images, "demo_video" for videos/webcams
    overrides: dict[str, Any] = field(default_factory=dict)
    scales: list[float] | None = None
    flips: list[int | None] | None = None
    batch_size: int = 1
    draw: DrawOptions = field(default_factory=DrawOptions)
    project: str = "runs/predict"
    name: str = "exp"
    exist_ok: bool = False
    save_images: bool = True
    gif: bool = False
    gif_size: int = 480
    start_s: float | None = None
    end_s: float | None = None
    save_json: bool = False
    save_csv: bool = False
    display: bool = False
    track: bool = False
    fps_overlay: bool = False
    progress: bool = True


@dataclass
class PredictSummary:
    run_dir: Path
    images: int = 0
    frames: int = 0
    persons: int = 0
    outputs: list[Path] = field(default_factory=list)
    errors: list[SourceError] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = ""

    def report(self) -> str:
        on = f" on {self.backend}" if self.backend else ""
        lines = [
            f"{self.images} image(s), {self.frames} video frame(s), {self.persons} person(s) in {self.seconds:.1f} s{on}",
            *(f"saved {p}" for p in self.outputs),
            *(f"error: {e}" for e in self.errors),
        ]
        return "\n".join(lines)


def _image_id(path: str | None, fallback: int) -> int:
    """COCO image id from a numeric file stem (as the official val does), else a running index."""
    stem = Path(path).stem if path else ""
    return int(stem) if stem.isdigit() else fallback


def _check_display() -> None:
    """Fail before any work when results cannot be shown (no screen, or an OpenCV without a GUI)."""
    if os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise KapaoError("--display needs a screen, and this session has none (DISPLAY is not set); save outputs instead")
    import cv2

    if hasattr(cv2, "currentUIFramework") and not cv2.currentUIFramework():
        raise KapaoError(
            "--display needs an OpenCV with a GUI, and this one has none (opencv-python-headless); "
            "install opencv-python or save outputs instead"
        )


def _csv_label(frame: Any) -> str:
    """CSV `image` column: the file for images, `VIDEO#FRAME` for video and webcam frames."""
    return frame.path if frame.item.kind == "image" else f"{frame.path}#{frame.index}"


def run_predict_job(model: KAPAO, job: PredictJob) -> PredictSummary:
    """Run the job; every bad input is reported and skipped, outputs are written atomically."""
    if job.display:
        _check_display()
    if job.start_s is not None and job.start_s < 0:
        raise KapaoError(f"--start {job.start_s:g}: a video start must be 0 or more seconds")
    if job.end_s is not None and job.end_s <= (job.start_s or 0.0):
        raise KapaoError(f"--end {job.end_s:g} is not after --start {job.start_s or 0:g}; give an end later than the start")
    t_start = time.perf_counter()
    errors: list[SourceError] = []
    items = resolve_source(job.source, errors)
    run_dir = next_run_dir(job.project, job.name, job.exist_ok)
    summary = PredictSummary(run_dir, errors=errors, backend=model.backend.name)
    all_poses: list[Poses] = []
    csv_rows: list[list[Any]] = []
    coco: list[dict[str, Any]] = []
    sinks: dict[str, Any] = {}
    trackers: dict[str, PoseTracker] = {}
    image_preset = job.preset or "demo"
    video_preset = job.preset or "demo_video"
    bar = tqdm(total=None, unit="img", disable=not job.progress, desc="predict")
    last = time.perf_counter()
    fps_smooth: float | None = None
    try:
        for kind_items, preset in (
            ([i for i in items if i.kind == "image"], image_preset),
            ([i for i in items if i.kind != "image"], video_preset),
        ):
            if not kind_items:
                continue
            stream = model.stream(
                kind_items, job.imgsz, preset, errors=errors, batch_size=job.batch_size,
                start_s=job.start_s, end_s=job.end_s, scales=job.scales, flips=job.flips, **job.overrides,
            )
            for frame, poses in stream:
                now = time.perf_counter()
                fps = 1.0 / max(now - last, 1e-9)
                fps_smooth = fps if fps_smooth is None else 0.9 * fps_smooth + 0.1 * fps
                last = now
                is_video = frame.item.kind != "image"
                key = frame.item.path
                if job.track and is_video:
                    poses.track_ids = trackers.setdefault(key, PoseTracker()).update(poses.boxes, poses.keypoints)
                summary.persons += len(poses)
                if is_video:
                    summary.frames += 1
                else:
                    summary.images += 1
                all_poses.append(poses)
                image_id = _image_id(frame.path, len(all_poses)) if not is_video else frame.index
                if job.save_json:
                    dets = poses.to_coco(image_id)
                    if is_video:  # image_id is the frame index: name the video, as a job may hold several
                        for det in dets:
                            det["video"] = frame.path
                    if poses.track_ids is not None:
                        for det, tid in zip(dets, poses.track_ids.tolist()):
                            det["track_id"] = tid
                    coco.extend(dets)
                if job.save_csv:
                    rows = poses.csv_rows(image=_csv_label(frame))
                    if job.track:
                        tids = poses.track_ids.tolist() if poses.track_ids is not None else [""] * len(rows)
                        rows = [row + [tid] for row, tid in zip(rows, tids)]
                    csv_rows.extend(rows)
                needs_drawing = job.save_images or job.gif or job.display
                if needs_drawing:
                    drawn = poses.plot(frame.image, options=job.draw)
                    if job.fps_overlay and is_video:
                        draw_fps(drawn, fps_smooth or 0.0)
                    _emit(job, summary, sinks, frame, drawn)
                bar.update(1)
                bar.set_postfix(fps=f"{fps_smooth:.1f}", persons=len(poses))
        for key, sink in sinks.items():
            summary.outputs.append(sink.close())
        sinks.clear()
        if job.save_json:
            summary.outputs.append(write_json(run_dir / "predictions.json", coco))
        if job.save_csv and all_poses:
            header = all_poses[0].csv_header() + (["track_id"] if job.track else [])
            summary.outputs.append(_write_csv(run_dir / "predictions.csv", header, csv_rows))
    finally:
        for sink in sinks.values():
            sink.abort()
        bar.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode())


def _emit(job: PredictJob, summary: PredictSummary, sinks: dict[str, Any], frame: Any, drawn: np.ndarray) -> None:
    path = Path(frame.path)
    if frame.item.kind == "image":
        if job.save_images:
            summary.outputs.append(write_image(summary.run_dir / path.name, drawn))
    else:
        stem = path.stem if frame.item.kind == "video" else f"webcam{frame.path}"
        fps = frame.fps or 30.0
        if job.save_images:
            key = f"mp4:{frame.path}"
            if key not in sinks:
                sinks[key] = VideoSink(summary.run_dir / f"{stem}.mp4", fps, (drawn.shape[1], drawn.shape[0]))
            sinks[key].write(drawn)
        if job.gif:
            key = f"gif:{frame.path}"
            if key not in sinks:
                sinks[key] = GifSink(summary.run_dir / f"{stem}.gif", fps, job.gif_size)
            sinks[key].write(drawn)
    if job.display:
        import cv2

        cv2.imshow("kapao", drawn)
        if cv2.waitKey(1) & 0xFF == ord("q"):
            raise KeyboardInterrupt
