"""Sources and writers: every bad item is reported once and the rest still flows; writes are atomic."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from kapao.errors import KapaoError
from kapao.io.sources import SourceError, iter_frames, read_image, resolve_source
from kapao.io.writers import GifSink, VideoSink, next_run_dir, write_image, write_json


@pytest.fixture()
def folder(tmp_path):
    img = np.full((40, 60, 3), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), img)
    cv2.imwrite(str(tmp_path / "b.png"), img)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_folder_with_bad_files(folder):
    errors: list[SourceError] = []
    items = resolve_source(str(folder), errors)
    assert [i.kind for i in items] == ["image"] * 4
    frames = list(iter_frames(items, errors))
    assert [f.path.rsplit("/", 1)[-1] for f in frames] == ["a.jpg", "b.png"]
    assert frames[0].image.shape == (40, 60, 3)
    msgs = {e.path.rsplit("/", 1)[-1]: e.message for e in errors}
    assert "0 bytes" in msgs["empty.jpg"]
    assert "cannot be decoded" in msgs["text.png"]


def test_missing_empty_glob_and_webcam(tmp_path):
    errors: list[SourceError] = []
    assert resolve_source(str(tmp_path / "nope.jpg"), errors) == []
    assert resolve_source(str(tmp_path), errors) == []
    assert resolve_source(str(tmp_path / "*.jpg"), errors) == []
    assert [e.message.split(";")[0] for e in errors] == [
        "does not exist",
        errors[1].message.split(";")[0],
        "pattern matches no images or videos",
    ]
    assert "no images or videos" in errors[1].message
    cam = resolve_source("0", errors)
    assert cam[0].kind == "webcam"


def test_unopenable_video(tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 100)
    errors: list[SourceError] = []
    assert list(iter_frames(resolve_source(str(bad), errors), errors)) == []
    assert len(errors) == 1 and "video" in errors[0].message


def test_video_round_trip_and_cut(tmp_path):
    path = tmp_path / "out.mp4"
    sink = VideoSink(path, fps=10, size_wh=(64, 48))
    for i in range(20):
        sink.write(np.full((48, 64, 3), i * 10, np.uint8))
    assert not path.exists()  # only the temporary file exists until close
    sink.close()
    errors: list[SourceError] = []
    frames = list(iter_frames(resolve_source(str(path), errors), errors))
    assert len(frames) == 20 and frames[0].fps == pytest.approx(10)
    cut = list(iter_frames(resolve_source(str(path), errors), errors, start_s=0.5, end_s=1.0))
    assert [f.index for f in cut] == [5, 6, 7, 8, 9]
    assert errors == []


def test_read_image_errors(tmp_path):
    with pytest.raises(KapaoError, match="does not exist"):
        read_image(tmp_path / "x.jpg")


def test_atomic_writers(tmp_path):
    write_json(tmp_path / "r.json", [{"a": 1}])
    assert json.loads((tmp_path / "r.json").read_text()) == [{"a": 1}]
    write_image(tmp_path / "i.png", np.zeros((4, 4, 3), np.uint8))
    assert cv2.imread(str(tmp_path / "i.png")).shape == (4, 4, 3)
    with pytest.raises(KapaoError, match="cannot encode"):
        write_image(tmp_path / "i.nope", np.zeros((4, 4, 3), np.uint8))
    gif = GifSink(tmp_path / "a.gif", fps=5, size=32)
    for i in range(3):
        gif.write(np.full((40, 80, 3), 80 * i, np.uint8))
    gif.close()
    from PIL import Image

    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 3 and max(im.size) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "i.png", "r.json"]  # no temp files left


def test_next_run_dir(tmp_path):
    assert next_run_dir(tmp_path).name == "exp"
    assert next_run_dir(tmp_path).name == "exp2"
    assert next_run_dir(tmp_path).name == "exp3"
    assert next_run_dir(tmp_path, exist_ok=True).name == "exp"
