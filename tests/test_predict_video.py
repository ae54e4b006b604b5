"""Videos through `kapao predict` and the Python API: mp4 / GIF / JSON / CSV outputs, tracking IDs,
cropping with --start/--end, bad videos and --display without a screen.

Runs the official-format e2e checkpoint (random-rule weights: the poses are meaningless, but every
stage is the real one) on the real 1080p clip in shared/data/video, cropped to 1 s at imgsz 256.
"""

from __future__ import annotations

import csv
import json
import types
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from kapao.cli.main import main
from kapao.engine.predictor import KAPAO
from kapao.results import Poses

VIDEO = "data/video/two_people_interaction_1080p.mp4"
WEIGHTS = "golden/e2e/kapao_s_coco_seed0.pt"
START_S, END_S = 0.5, 1.5


def _video_info(path: Path) -> tuple[float, int, int, int]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    info = (cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    return info


def _read_all(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


@pytest.fixture(scope="module")
def video_run(shared, tmp_path_factory):
    """One `kapao predict VIDEO ...` run with every video output switched on."""
    out = tmp_path_factory.mktemp("video_run")
    argv = ["predict", str(shared / VIDEO), "--weights", str(shared / WEIGHTS), "--imgsz", "256", "--track", "--fps",
            "--gif", "--gif-size", "160", "--start", str(START_S), "--end", str(END_S), "--save-json", "--save-csv",
            "--project", str(out), "--quiet"]
    rc = main(argv)
    fps, count, w, h = _video_info(shared / VIDEO)
    first, last = round(START_S * fps), round(END_S * fps)
    return rc, out / "exp", (fps, count, w, h), list(range(first, last))


def test_source_video_is_what_the_readme_says(shared):
    fps, count, w, h = _video_info(shared / VIDEO)
    assert (count, w, h) == (72, 1920, 1080) and round(fps) == 28


@pytest.mark.slow  # shares the ~10-40 s `video_run` (28 frames of 1080p, CPU)
def test_video_outputs_exist(video_run):
    rc, run, _, _ = video_run
    assert rc == 0
    names = sorted(p.name for p in run.iterdir())
    stem = Path(VIDEO).stem
    assert names == sorted([f"{stem}.mp4", f"{stem}.gif", "predictions.json", "predictions.csv"])  # no temp files left


@pytest.mark.slow  # shares the ~10-40 s `video_run` (28 frames of 1080p, CPU)
def test_mp4_has_the_cropped_frames_at_full_size(video_run, shared):
    _, run, (fps, _, w, h), frames = video_run
    assert len(frames) == 28  # 1 s of a 28 fps clip
    out_fps, out_count, out_w, out_h = _video_info(run / f"{Path(VIDEO).stem}.mp4")
    decoded = _read_all(run / f"{Path(VIDEO).stem}.mp4")
    assert (out_w, out_h) == (w, h) and out_count == len(frames) and len(decoded) == len(frames)
    assert out_fps == pytest.approx(fps, abs=0.01)
    # the drawn frame is the source frame plus drawing: most pixels are unchanged (up to mp4 loss)
    src = _read_all(shared / VIDEO)[frames[0]]
    close = np.abs(decoded[0].astype(int) - src.astype(int)).max(-1) < 40
    assert close.mean() > 0.8
    # the FPS overlay: a black box with white text in the top-left corner
    corner = decoded[0][5:40, 5:120]
    assert (corner.max(-1) < 60).mean() > 0.4 and (corner.min(-1) > 180).mean() > 0.05


@pytest.mark.slow  # shares the ~10-40 s `video_run` (28 frames of 1080p, CPU)
def test_gif_frames_and_size(video_run):
    _, run, (_, _, w, h), frames = video_run
    with Image.open(run / f"{Path(VIDEO).stem}.gif") as gif:
        assert gif.n_frames == len(frames)
        assert gif.size == (160, round(160 * h / w))  # longest side = --gif-size
        assert gif.info["duration"] in (30, 40)  # 1000 / 28 ms, in the GIF's 10 ms units


def _csv_rows(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow  # shares the ~10-40 s `video_run` (28 frames of 1080p, CPU)
def test_json_and_csv_have_every_frames_poses(video_run, shared):
    _, run, _, frames = video_run
    dets = json.loads((run / "predictions.json").read_text())
    header, rows = _csv_rows(run)
    assert header[:3] == ["image", "pose", "score"] and header[-1] == "track_id" and len(header) == 7 + 17 * 3 + 1
    assert len(rows) == len(dets) > 0
    # JSON image_id and CSV image column are the frame index within the video
    json_frames = [d["image_id"] for d in dets]
    csv_frames = [int(r["image"].rsplit("#", 1)[1]) for r in rows]
    assert json_frames == csv_frames and set(json_frames) <= set(frames)
    assert all(r["image"].rsplit("#", 1)[0] == str(shared / VIDEO) for r in rows)
    assert all(d["video"] == str(shared / VIDEO) for d in dets)
    for d, r in zip(dets, rows):
        assert len(d["keypoints"]) == 51 and d["score"] == pytest.approx(float(r["score"]), rel=1e-6)
        assert d["track_id"] == int(r["track_id"]) >= 1
        kps_csv = [float(r[f"{n}_{c}"]) for n in ("nose", "right_ankle") for c in ("x", "y", "conf")]
        assert d["keypoints"][:3] + d["keypoints"][-3:] == pytest.approx(kps_csv)
    # pose numbers restart at 0 in every frame
    per_frame = defaultdict(list)
    for r in rows:
        per_frame[r["image"]].append(int(r["pose"]))
    assert all(v == list(range(len(v))) for v in per_frame.values())


@pytest.mark.slow  # shares the ~10-40 s `video_run` (28 frames of 1080p, CPU)
def test_track_ids_are_stable_where_boxes_overlap(video_run):
    """A person box that overlaps one box of the previous frame by IoU > 0.8 (mutual best match)
    keeps that box's track ID; IDs are unique within a frame."""
    _, run, _, _ = video_run
    _, rows = _csv_rows(run)
    by_frame: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in rows:
        f = int(r["image"].rsplit("#", 1)[1])
        by_frame[f][0].append([float(r[c]) for c in ("x1", "y1", "x2", "y2")])
        by_frame[f][1].append(int(r["track_id"]))
    checked = 0
    order = sorted(by_frame)
    for prev, cur in zip(order, order[1:]):
        ids_p, ids_c = by_frame[prev][1], by_frame[cur][1]
        assert len(set(ids_c)) == len(ids_c)
        if cur != prev + 1:
            continue
        iou = box_iou(torch.tensor(by_frame[cur][0]), torch.tensor(by_frame[prev][0])).numpy()
        for d in range(len(ids_c)):
            t = int(iou[d].argmax())
            if iou[d, t] > 0.8 and int(iou[:, t].argmax()) == d:
                assert ids_c[d] == ids_p[t], (cur, d, iou[d, t])
                checked += 1
    assert checked > 50  # the clip gives many overlapping pairs (about 6 per frame)


@pytest.mark.slow  # shares the ~10-40 s `video_run` (28 frames of 1080p, CPU)
def test_python_api_video_is_a_generator_of_poses(shared, video_run):
    """`KAPAO(w)("video.mp4")` yields one Poses per frame, equal to what `kapao predict` saved."""
    _, run, (fps, _, w, h), _ = video_run
    model = KAPAO(shared / WEIGHTS, device="cpu")
    gen = model(str(shared / VIDEO), imgsz=256, start_s=1.0, end_s=1.25)
    assert isinstance(gen, types.GeneratorType)
    got = list(gen)
    first, last = round(1.0 * fps), round(1.25 * fps)
    assert len(got) == last - first == 7
    assert all(isinstance(p, Poses) and p.image_hw == (h, w) and p.path == str(shared / VIDEO) for p in got)
    saved = defaultdict(list)
    for d in json.loads((run / "predictions.json").read_text()):
        saved[d["image_id"]].append(d)
    for index, poses in zip(range(first, last), got):
        ref = saved[index]
        assert len(poses) == len(ref)
        np.testing.assert_allclose(poses.keypoints.reshape(len(poses), -1), [d["keypoints"] for d in ref], atol=1e-3)
        np.testing.assert_allclose(poses.scores, [d["score"] for d in ref], rtol=1e-5)


def test_bad_video_is_reported_and_the_image_still_processed(shared, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    good = shared / "data" / "coco_mini" / "images" / "000000000785.jpg"
    rc = main(["predict", str(bad), str(good), "--weights", str(shared / WEIGHTS), "--imgsz", "256",
               "--project", str(tmp_path / "out"), "--save-json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.mp4: video cannot be opened" in captured.err and "Traceback" not in captured.err
    run = tmp_path / "out" / "exp"
    assert sorted(p.name for p in run.iterdir()) == ["000000000785.jpg", "predictions.json"]
    drawn = cv2.imread(str(run / "000000000785.jpg"))
    assert drawn.shape == cv2.imread(str(good)).shape


@pytest.mark.parametrize("cut, message", [(["--start", "-1"], "--start -1: a video start must be 0 or more"),
                                          (["--start", "1", "--end", "0.5"], "--end 0.5 is not after --start 1")])
def test_bad_video_cut_is_one_clear_line(shared, tmp_path, capsys, cut, message):
    rc = main(["predict", str(shared / VIDEO), "--weights", str(shared / WEIGHTS), *cut,
               "--project", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_display_without_a_screen_is_one_clear_line(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    rc = main(["predict", str(shared / VIDEO), "--weights", str(shared / WEIGHTS), "--imgsz", "256", "--display",
               "--end", "0.1", "--project", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("kapao predict: error: --display needs a screen") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before any work


def test_display_with_a_screen_needs_an_opencv_gui(monkeypatch):
    """With DISPLAY set, a headless OpenCV (the declared dependency) is refused with one clear
    message instead of a cv2.error traceback at the first frame; a GUI OpenCV is accepted."""
    from kapao.engine.predict_job import _check_display
    from kapao.errors import KapaoError

    monkeypatch.setenv("DISPLAY", ":0")
    headless = hasattr(cv2, "currentUIFramework") and not cv2.currentUIFramework()
    if headless:
        with pytest.raises(KapaoError, match="--display needs an OpenCV with a GUI"):
            _check_display()
    else:
        _check_display()
