"""The web demo: upload an image or a short video, get the drawn poses and the poses as JSON.

The inference functions (`predict_for_app`, `predict_video_for_app`) take and return plain arrays,
paths and dicts, so they are tested without a browser; `build_app` wraps them in a Gradio UI.
Gradio is the optional extra `kapao[app]` and is imported only when the UI is built.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from kapao.errors import KapaoError
from kapao.presets import get_preset, preset_names
from kapao.track import PoseTracker
from kapao.viz import DrawOptions, draw_fps

if TYPE_CHECKING:
    from kapao.engine.predictor import KAPAO

IMGSZ_CHOICES = (320, 480, 640, 960, 1280, 1536, 1920)
DEFAULT_IMGSZ = 1280  # the official demos' size
MAX_VIDEO_SECONDS = 10.0  # the app is for short clips; `kapao predict` handles long ones
MAX_VIDEO_SIDE = 1280  # longest side of the drawn video the browser plays (VP8 encoding is slow)


def import_gradio() -> Any:
    """The gradio module, or a KapaoError saying how to install it."""
    try:
        import gradio
    except ImportError as e:
        raise KapaoError(
            f"the web demo needs gradio, which is not installed ({e.msg}); install it with: pip install 'kapao[app]'"
        ) from None
    return gradio


def _to_bgr(image: np.ndarray) -> np.ndarray:
    """An uploaded image (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, any int/float dtype -> BGR uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and float(img.max()) <= 1.0:
            img = img * 255.0
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img[..., ::-1])
    raise KapaoError(f"uploaded image has shape {img.shape}; use an RGB, RGBA or grayscale image")


def _settings(
    preset: str, imgsz: int, conf_thres: float | None, conf_thres_kp: float | None, overwrite_tol: float | None,
    bbox: bool, pose: bool, face: bool, kp_bbox: bool, kp_obj: bool,
) -> tuple[Any, int, DrawOptions]:
    """Validated preset (with the threshold overrides), imgsz and drawing options."""
    params = get_preset(preset, conf_thres=conf_thres, conf_thres_kp=conf_thres_kp, overwrite_tol=overwrite_tol)
    imgsz = int(imgsz)
    if not 32 <= imgsz <= 4096:
        raise KapaoError(f"image size {imgsz}; use a value between 32 and 4096 (the official demos use 1280)")
    draw = DrawOptions.from_kwargs(
        bbox=bool(bbox), pose=bool(pose), face=bool(face), kp_bbox=bool(kp_bbox), kp_obj=bool(kp_obj)
    )
    return params, imgsz, draw


def predict_for_app(
    model: KAPAO,
    image: np.ndarray | None,
    preset: str = "demo",
    imgsz: int = DEFAULT_IMGSZ,
    conf_thres: float | None = None,
    conf_thres_kp: float | None = None,
    overwrite_tol: float | None = None,
    bbox: bool = False,
    pose: bool = True,
    face: bool = False,
    kp_bbox: bool = False,
    kp_obj: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """An uploaded RGB image (H, W, 3) -> (the drawn RGB image (H, W, 3) uint8, the poses as a dict).

    Thresholds left as None come from `preset`; the dict is `Poses.to_dict()` plus the preset used,
    the image size and the inference time.
    """
    if image is None:
        raise KapaoError("no image: upload an image first")
    params, imgsz, draw = _settings(
        preset, imgsz, conf_thres, conf_thres_kp, overwrite_tol, bbox, pose, face, kp_bbox, kp_obj
    )
    bgr = _to_bgr(image)
    t0 = time.perf_counter()
    poses = model.predict_images([bgr], imgsz, params)[0]
    ms = (time.perf_counter() - t0) * 1000.0
    drawn = poses.plot(bgr, options=draw)
    info = poses.to_dict()
    if not kp_obj:
        info.pop("kp_objects", None)  # up to 300 raw detections: only when they are drawn
    info.update(num_poses=len(poses), imgsz=imgsz, preset=params.to_dict(), inference_ms=round(ms, 1))
    return np.ascontiguousarray(drawn[..., ::-1]), info


def _video_writer(out_dir: Path, stem: str, fps: float, size_wh: tuple[int, int]) -> tuple[cv2.VideoWriter, Path, Path]:
    """A browser-playable WebM (VP8) writer on a temporary name, or mp4 (mp4v) where VP8 is missing."""
    for suffix, fourcc in ((".webm", "VP80"), (".mp4", "mp4v")):
        final = out_dir / f"{stem}{suffix}"
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=out_dir)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; the output is as readable as any other file
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*fourcc), float(fps), size_wh)
        if writer.isOpened():
            return writer, Path(tmp), final
        writer.release()
        Path(tmp).unlink(missing_ok=True)
    raise KapaoError(f"{out_dir}: OpenCV has no VP8 or mp4v video encoder; install opencv-python-headless from PyPI")


def predict_video_for_app(
    model: KAPAO,
    video: str | Path | None,
    out_dir: str | Path | None = None,
    preset: str = "demo_video",
    imgsz: int = DEFAULT_IMGSZ,
    conf_thres: float | None = None,
    conf_thres_kp: float | None = None,
    overwrite_tol: float | None = None,
    bbox: bool = False,
    pose: bool = True,
    face: bool = False,
    kp_bbox: bool = False,
    kp_obj: bool = False,
    track: bool = True,
    fps_overlay: bool = True,
    max_seconds: float = MAX_VIDEO_SECONDS,
    max_side: int = MAX_VIDEO_SIDE,
) -> tuple[Path, dict[str, Any]]:
    """A video file -> (the drawn video (WebM, or mp4 without VP8) under `out_dir`, per-frame poses).

    Only the first `max_seconds` are processed; the drawn video is shrunk to `max_side` pixels at
    most (poses stay in original-video pixels). The dict holds the frame rate, the number of frames
    and, per frame, `Poses.to_dict()` (with track IDs when `track`).
    """
    from kapao.io.sources import SourceError, SourceItem

    if video is None:
        raise KapaoError("no video: upload a video first")
    path = Path(video)
    if not path.is_file():
        raise KapaoError(f"{path}: video does not exist")
    params, imgsz, draw = _settings(
        preset, imgsz, conf_thres, conf_thres_kp, overwrite_tol, bbox, pose, face, kp_bbox, kp_obj
    )
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="kapao_app_"))
    out.mkdir(parents=True, exist_ok=True)
    errors: list[SourceError] = []
    tracker = PoseTracker() if track else None
    writer, tmp, final = None, None, None
    frames: list[dict[str, Any]] = []
    fps = 0.0
    t_start = time.perf_counter()
    try:
        stream = model.stream([SourceItem("video", str(path))], imgsz, params, errors=errors, end_s=max_seconds)
        for n, (frame, poses) in enumerate(stream, 1):
            if tracker is not None:
                poses.track_ids = tracker.update(poses.boxes, poses.keypoints)
            drawn = poses.plot(frame.image, options=draw)
            h, w = drawn.shape[:2]
            if max(h, w) > max_side:
                r = max_side / max(h, w)
                drawn = cv2.resize(drawn, (max(round(w * r), 1), max(round(h * r), 1)), interpolation=cv2.INTER_AREA)
            if fps_overlay:
                draw_fps(drawn, n / max(time.perf_counter() - t_start, 1e-9))
            if writer is None:
                fps = frame.fps or 30.0
                writer, tmp, final = _video_writer(out, path.stem + "_kapao", fps, (drawn.shape[1], drawn.shape[0]))
            writer.write(drawn)
            info = poses.to_dict()
            if not kp_obj:
                info.pop("kp_objects", None)
            frames.append({"frame": frame.index, **{k: v for k, v in info.items() if k != "path"}})
        if errors:
            raise KapaoError(str(errors[0]))
        if writer is None or tmp is None or final is None:
            raise KapaoError(f"{path}: no frames could be read")
        writer.release()
        writer = None
        os.replace(tmp, final)
    finally:
        if writer is not None:
            writer.release()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    summary = {
        "video": path.name,
        "fps": fps,
        "num_frames": len(frames),
        "max_seconds": max_seconds,
        "imgsz": imgsz,
        "preset": params.to_dict(),
        "seconds": round(time.perf_counter() - t_start, 2),
        "frames": frames,
    }
    return final, summary


def build_app(model: KAPAO, title: str = "KAPAO pose estimation") -> Any:
    """The Gradio Blocks UI around `model` (not launched). API names: /predict_image, /predict_video."""
    gr = import_gradio()
    names = preset_names()

    def preset_values(name: str) -> tuple[float, float, float]:
        p = get_preset(name)
        return p.conf_thres, p.conf_thres_kp, p.overwrite_tol

    def run_image(image, preset, imgsz, conf, conf_kp, tol, bbox, pose, face, kp_bbox, kp_obj):
        try:
            return predict_for_app(model, image, preset, imgsz, conf, conf_kp, tol, bbox, pose, face, kp_bbox, kp_obj)
        except KapaoError as e:
            raise gr.Error(str(e)) from None

    work = Path(tempfile.mkdtemp(prefix="kapao_app_"))  # drawn videos; gradio copies each into its cache

    def run_video(video, preset, imgsz, conf, conf_kp, tol, bbox, pose, face, kp_bbox, kp_obj):
        for old in work.iterdir():  # earlier requests' videos were served already: keep the folder small
            shutil.rmtree(old, ignore_errors=True)
        out_dir = Path(tempfile.mkdtemp(dir=work))
        try:
            out, info = predict_video_for_app(
                model, video, out_dir, preset, imgsz, conf, conf_kp, tol, bbox, pose, face, kp_bbox, kp_obj
            )
        except KapaoError as e:
            raise gr.Error(str(e)) from None
        return str(out), info

    c0, k0, t0 = preset_values("demo")
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nKeypoints and Poses as Objects ({model.schema.num_keypoints} keypoints). "
            "Upload an image or a short video (the first "
            f"{MAX_VIDEO_SECONDS:g} s are used); thresholds start at the chosen preset's values."
        )
        with gr.Row():
            with gr.Column():
                preset = gr.Radio(
                    names, value="demo",
                    label="preset (demo: official image demo, demo_video: video demo, val: evaluation)",
                )
                imgsz = gr.Dropdown(list(IMGSZ_CHOICES), value=DEFAULT_IMGSZ, label="image size (longest side)")
                conf = gr.Slider(0.0, 1.0, value=c0, step=0.001, label="person confidence (conf_thres)")
                conf_kp = gr.Slider(0.0, 1.0, value=k0, step=0.001, label="keypoint-object confidence (conf_thres_kp)")
                tol = gr.Slider(1, 200, value=t0, step=1, label="overwrite tolerance (pixels)")
                with gr.Row():
                    bbox = gr.Checkbox(False, label="bbox")
                    pose = gr.Checkbox(True, label="pose")
                    face = gr.Checkbox(False, label="face")
                    kp_bbox = gr.Checkbox(False, label="kp-bbox")
                    kp_obj = gr.Checkbox(False, label="kp-obj only")
            with gr.Column():
                with gr.Tab("Image"):
                    image_in = gr.Image(type="numpy", image_mode="RGB", label="image", sources=["upload", "clipboard"])
                    image_btn = gr.Button("Estimate poses", variant="primary")
                    image_out = gr.Image(type="numpy", label="poses")
                    image_json = gr.JSON(label="poses (JSON)")
                with gr.Tab("Video"):
                    video_in = gr.Video(label=f"video (first {MAX_VIDEO_SECONDS:g} s)", sources=["upload"])
                    video_btn = gr.Button("Estimate poses", variant="primary")
                    video_out = gr.Video(label="poses")
                    video_json = gr.JSON(label="poses per frame (JSON)")
        controls = [preset, imgsz, conf, conf_kp, tol, bbox, pose, face, kp_bbox, kp_obj]
        preset.change(preset_values, inputs=preset, outputs=[conf, conf_kp, tol], api_name=False)
        image_btn.click(
            run_image, inputs=[image_in, *controls], outputs=[image_out, image_json], api_name="predict_image"
        )
        video_btn.click(
            run_video, inputs=[video_in, *controls], outputs=[video_out, video_json], api_name="predict_video"
        )
    return demo


def launch_app(
    model: KAPAO, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, block: bool = True,
) -> Any:
    """Build and launch the UI; returns the Blocks (call `.close()` when `block` is False)."""
    demo = build_app(model)
    try:
        demo.queue().launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block
        )
    except OSError as e:
        raise KapaoError(f"cannot serve the app on {host}:{port} ({e}); choose another --port or --host") from None
    return demo
