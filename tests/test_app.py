"""The web demo: `predict_for_app` / `predict_video_for_app` (no browser needed) give the official
demo poses and honour the UI's options; the Gradio app builds, serves and answers over HTTP.

Gradio is the optional extra `kapao[app]`: only the tests that build the UI skip without it.
"""

from __future__ import annotations

import json
import socket
import sys

import cv2
import numpy as np
import pytest

from kapao.app import predict_for_app, predict_video_for_app
from kapao.cli.main import main
from kapao.data.letterbox import read_image
from kapao.engine.predictor import KAPAO
from kapao.errors import KapaoError

from matching import match_poses

IMAGE = "data/coco_mini/images/000000000785.jpg"
VIDEO = "data/video/two_people_interaction_1080p.mp4"
WEIGHTS = "golden/e2e/kapao_s_coco_seed0.pt"


@pytest.fixture(scope="module")
def model(shared) -> KAPAO:
    return KAPAO(shared / WEIGHTS, device="cpu")


@pytest.fixture(scope="module")
def golden_predict(golden):
    root = golden / "e2e"
    return json.loads((root / "predict.json").read_text())["runs"], dict(np.load(root / "predict.npz"))


@pytest.fixture(scope="module")
def rgb(shared) -> np.ndarray:
    return np.ascontiguousarray(read_image(shared / IMAGE)[..., ::-1])


def _kps(info: dict) -> tuple[np.ndarray, np.ndarray]:
    poses = info["poses"]
    k = len(info["keypoint_names"])
    kps = np.array([p["keypoints"] for p in poses], float).reshape(len(poses), k, 3)
    return kps, np.array([p["score"] for p in poses])


@pytest.mark.parametrize("preset", ["demo", "val"])
def test_image_poses_are_the_official_demo_and_val_poses(model, rgb, golden_predict, preset):
    runs, z = golden_predict
    key = f"000000000785__640__{preset}"
    drawn, info = predict_for_app(model, rgb, preset=preset, imgsz=640)
    kps, scores = _kps(info)
    assert info["num_poses"] == len(kps) == runs[key]["n_poses"]
    m = match_poses(kps, scores, z[f"{key}__poses"], z[f"{key}__scores"])
    assert m.matched == runs[key]["n_poses"], m
    np.testing.assert_allclose([p["box"] for p in info["poses"]], z[f"{key}__bboxes"], atol=1.0)
    assert info["imgsz"] == 640 and info["preset"]["name"] == preset and info["image_hw"] == [425, 640]
    assert "kp_objects" not in info and info["inference_ms"] > 0
    json.dumps(info)  # what gr.JSON shows must be plain JSON
    assert drawn.shape == rgb.shape and drawn.dtype == np.uint8


def test_drawn_image_is_rgb_and_follows_the_drawing_options(model, rgb, shared):
    bgr = read_image(shared / IMAGE)
    poses = model.predict_images([bgr], 320, "demo")[0]
    drawn, _ = predict_for_app(model, rgb, imgsz=320)
    np.testing.assert_array_equal(drawn, poses.plot(bgr)[..., ::-1])  # RGB in, RGB out
    changed = (drawn != rgb).any(-1).sum()
    assert changed > 1000
    with_bbox, _ = predict_for_app(model, rgb, imgsz=320, bbox=True)
    np.testing.assert_array_equal(with_bbox, poses.plot(bgr, bbox=True)[..., ::-1])
    assert (with_bbox != rgb).any(-1).sum() > changed
    nothing, _ = predict_for_app(model, rgb, imgsz=320, pose=False)
    np.testing.assert_array_equal(nothing, rgb)
    kp_only, info = predict_for_app(model, rgb, imgsz=320, kp_obj=True)
    assert len(info["kp_objects"]) == len(poses.kp_objects) > 0
    np.testing.assert_array_equal(kp_only, poses.plot(bgr, kp_obj=True)[..., ::-1])
    for opt in ("face", "kp_bbox"):
        out, _ = predict_for_app(model, rgb, imgsz=320, **{opt: True})
        np.testing.assert_array_equal(out, poses.plot(bgr, **{opt: True})[..., ::-1])


def test_thresholds_override_the_preset(model, rgb):
    _, demo = predict_for_app(model, rgb, imgsz=640)
    _, strict = predict_for_app(model, rgb, imgsz=640, conf_thres=0.99)
    assert strict["num_poses"] == 0 < demo["num_poses"] and strict["preset"]["conf_thres"] == 0.99
    drawn, _ = predict_for_app(model, rgb, imgsz=640, conf_thres=0.99)
    np.testing.assert_array_equal(drawn, rgb)
    _, loose = predict_for_app(model, rgb, imgsz=640, conf_thres=0.6)
    assert loose["num_poses"] > demo["num_poses"]
    # no keypoint object is confident enough: no keypoint is fused
    _, nofuse = predict_for_app(model, rgb, imgsz=640, conf_thres_kp=0.999)
    assert nofuse["num_poses"] == demo["num_poses"]
    assert all(c == 0 for p in nofuse["poses"] for (_, _, c) in p["keypoints"])
    fused = sum(c > 0 for p in demo["poses"] for (_, _, c) in p["keypoints"])
    assert fused == 12  # README 2.3: 000000000785 at 640, demo
    _, tight = predict_for_app(model, rgb, imgsz=640, overwrite_tol=1)
    assert sum(c > 0 for p in tight["poses"] for (_, _, c) in p["keypoints"]) < fused


def test_other_image_layouts(model, rgb):
    _, ref = predict_for_app(model, rgb, imgsz=320)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    _, info = predict_for_app(model, rgba, imgsz=320)
    assert info["poses"] == ref["poses"]
    _, info = predict_for_app(model, rgb.astype(np.float32) / 255.0, imgsz=320)
    assert info["poses"] == ref["poses"]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    drawn, info = predict_for_app(model, gray, imgsz=320)
    assert drawn.shape == (*gray.shape, 3) and info["image_hw"] == list(gray.shape)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": None}, "upload an image first"),
        ({"preset": "fast"}, "unknown preset 'fast'"),
        ({"conf_thres": 1.5}, "conf_thres is 1.5"),
        ({"overwrite_tol": 0}, "overwrite_tol is 0"),
        ({"imgsz": 8}, "image size 8"),
        ({"image": np.zeros((4, 4, 2), np.uint8)}, "uploaded image has shape (4, 4, 2)"),
    ],
)
def test_bad_requests_are_one_line_errors(model, rgb, kwargs, message):
    kwargs = {"image": rgb, **kwargs}
    with pytest.raises(KapaoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict_for_app(model, **kwargs)


def test_video_is_drawn_tracked_and_shrunk(model, shared, tmp_path):
    out, info = predict_video_for_app(model, shared / VIDEO, tmp_path, imgsz=256, max_seconds=0.25)
    assert out.parent == tmp_path and out.suffix in (".webm", ".mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary files left
    cap = cv2.VideoCapture(str(out))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    assert info["num_frames"] == len(frames) == round(0.25 * info["fps"]) == 7
    assert all(f.shape == (720, 1280, 3) for f in frames)  # 1080p shrunk to the 1280-px preview
    assert [f["frame"] for f in info["frames"]] == list(range(7))
    first = info["frames"][0]
    assert first["image_hw"] == [1080, 1920] and len(first["poses"]) > 0
    assert all("track_id" in p for f in info["frames"] for p in f["poses"])
    ids = [p["track_id"] for p in first["poses"]]
    assert sorted(ids) == list(range(1, len(ids) + 1))
    json.dumps(info)
    # the same poses as the Python API gives for these frames (demo_video preset)
    api = list(model(str(shared / VIDEO), imgsz=256, end_s=0.25))
    for f, poses in zip(info["frames"], api):
        kps = np.array([p["keypoints"] for p in f["poses"]]).reshape(poses.keypoints.shape)
        np.testing.assert_allclose(kps, poses.keypoints)


def test_bad_video_is_a_one_line_error(model, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    with pytest.raises(KapaoError, match="broken.mp4: video cannot be opened"):
        predict_video_for_app(model, bad, tmp_path / "out", imgsz=256)
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(KapaoError, match="upload a video first"):
        predict_video_for_app(model, None)


def test_missing_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail as if not installed
    rc = main(["app", "--weights", "does-not-matter.pt"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "the web demo needs gradio" in err and "pip install 'kapao[app]'" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_builds_serves_and_answers(model, shared, rgb, golden_predict, tmp_path):
    gr = pytest.importorskip("gradio", reason="gradio is the optional extra kapao[app]; pip install 'kapao[app]'")
    client_mod = pytest.importorskip("gradio_client", reason="gradio_client comes with gradio (kapao[app])")
    from kapao.app import launch_app

    port = _free_port()
    demo = launch_app(model, host="127.0.0.1", port=port, block=False)
    try:
        assert isinstance(demo, gr.Blocks)
        client = client_mod.Client(f"http://127.0.0.1:{port}/", verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/predict_image", "/predict_video"} <= set(endpoints)
        drawn_path, info = client.predict(
            client_mod.handle_file(str(shared / IMAGE)), "demo", 640, 0.7, 0.5, 25, False, True, False, False, False,
            api_name="/predict_image",
        )
        runs, z = golden_predict
        kps, scores = _kps(info)
        # the browser path decodes the JPEG with PIL, not OpenCV: allow its few-level pixel differences
        assert abs(len(kps) - runs["000000000785__640__demo"]["n_poses"]) <= 1
        drawn = cv2.imread(str(drawn_path))
        assert drawn is not None and drawn.shape == rgb.shape
        # a short upload: 8 frames of the real clip at 640x360
        clip = tmp_path / "clip.mp4"
        cap = cv2.VideoCapture(str(shared / VIDEO))
        writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 28, (640, 360))
        for _ in range(8):
            writer.write(cv2.resize(cap.read()[1], (640, 360)))
        writer.release()
        cap.release()
        video_path, vinfo = client.predict(client_mod.handle_file(str(clip)), "demo_video", 320, 0.5, 0.5, 50,
                                           False, True, False, False, False, api_name="/predict_video")
        served, shapes = cv2.VideoCapture(str(video_path)), []
        while (got := served.read())[0]:
            shapes.append(got[1].shape)
        served.release()
        assert shapes == [(360, 640, 3)] * 8 and vinfo["num_frames"] == 8
        # a KapaoError reaches the browser as its one-line message
        with pytest.raises(client_mod.exceptions.AppError, match="upload an image first"):
            client.predict(None, "demo", 640, 0.7, 0.5, 25, False, True, False, False, False, api_name="/predict_image")
    finally:
        demo.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # the server is gone
