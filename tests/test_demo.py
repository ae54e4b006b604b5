"""`kapao demo` (what `make demo` runs): the shipped model on the shipped scenes, end to end."""

from __future__ import annotations

import json
import re

from kapao.cli.main import main
from kapao.weights import default_weights, demo_images, load


def test_shipped_model_and_scenes_are_installed():
    model, meta = load(default_weights())
    assert meta.config.name == "kapao-n" and meta.schema.num_keypoints == 17
    assert meta.info["recipe"]["hyp"] == "hyp.synth"
    assert meta.stored_dtype.startswith("float16")  # small: fp16 weights (anchors stay float32)
    assert len(demo_images()) == 4


def test_demo_runs_end_to_end_and_finds_the_people(tmp_path, capsys):
    rc = main(["demo", "--project", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    run = tmp_path / "exp"
    assert sorted(p.name for p in run.glob("*.jpg")) == [p.name for p in demo_images()]
    predictions = json.loads((run / "predictions.json").read_text())
    assert len(predictions) >= 6  # 11 people in the four scenes
    ap = float(re.search(r"OKS AP on these scenes \(val preset\): AP ([0-9.]+)", out).group(1))
    assert ap > 0.25, out  # held-out scenes: an untrained model scores 0; the shipped one 0.410


def test_default_inference_size_follows_the_weights(golden):
    from kapao import KAPAO

    assert KAPAO().default_imgsz == 256  # the shipped model's training size
    assert KAPAO(golden / "e2e" / "kapao_s_coco_seed0.pt").default_imgsz == 1280  # official: 1280
