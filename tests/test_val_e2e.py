"""End to end: `kapao val` with the official-format checkpoint reproduces the official val.py
results JSON detection by detection and its COCOeval stats (shared/golden/e2e/val.*)."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict

import numpy as np
import pytest
import yaml

from kapao.cli.main import main
from kapao.schema import coco_schema

from matching import match_poses

RUNS = ["s640_notta_norect", "s640_notta_rect", "s640_tta_norect", "s640_tta_rect"]


@pytest.fixture(scope="module")
def e2e(golden):
    return golden / "e2e", json.loads((golden / "e2e" / "val.json").read_text())


def _by_image(results):
    out = defaultdict(list)
    for r in results:
        out[r["image_id"]].append(r)
    return out


def _arrays(dets):
    kps = np.array([d["keypoints"] for d in dets], dtype=np.float64).reshape(len(dets), 17, 3)
    return kps, np.array([d["score"] for d in dets], dtype=np.float64)


def _data_yaml(shared, tmp_path):
    data = shared / "data" / "coco_mini"
    yaml_path = tmp_path / "mini.yaml"
    yaml_path.write_text(yaml.safe_dump({"path": str(data), "val_images": "images", "val_annotations": "person_keypoints.json",
                                         "keypoints": coco_schema().to_dict()}))
    return yaml_path


@pytest.mark.slow
@pytest.mark.parametrize(("run_name", "backend"), [(r, b) for r in RUNS for b in ("auto", "torch") if not ("_tta_" in r and b == "torch")])
def test_cli_val_matches_official(e2e, shared, tmp_path, capsys, run_name, backend):
    """`kapao val` as a user runs it, on the default (auto) backend and on torch, reproduces the
    official results JSON and COCOeval stats; with TTA, auto picks torch (printed in the summary)."""
    root, index = e2e
    run = index["runs"][run_name]
    kw = run["run_kwargs"]
    tta = kw["scales"] != [1]
    argv = ["val", "--data", str(_data_yaml(shared, tmp_path)), "--weights", str(root / "kapao_s_coco_seed0.pt"),
            "--imgsz", str(kw["imgsz"]), "--batch-size", str(kw["batch_size"]), "--pad", str(kw["pad"]),
            "--project", str(tmp_path / "runs"), "--quiet"]
    argv += ["--rect"] if kw["rect"] else []
    argv += ["--scales", *map(str, kw["scales"]), "--flips", *map(str, [-1 if f is None else f for f in kw["flips"]])] if tta else []
    argv += [] if backend == "auto" else ["--backend", backend]
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    expected_backend = "torch-cpu-fp32" if tta or backend == "torch" else "onnxruntime-cpu-fp32"
    assert f"(backend {expected_backend})" in out
    result_dir = tmp_path / "runs" / "exp"
    results = json.loads((result_dir / "results_val.json").read_text())
    metrics = json.loads((result_dir / "metrics.json").read_text())
    assert metrics["backend"] == expected_backend
    ref = json.loads(gzip.open(root / run["file"]).read())
    ours_by, ref_by = _by_image(results), _by_image(ref)
    assert {str(k): len(v) for k, v in ours_by.items()} == run["dets_per_image"]
    matched = 0
    for image_id, ref_dets in ref_by.items():
        m = match_poses(*_arrays(ours_by[image_id]), *_arrays(ref_dets))
        matched += m.matched
    assert matched >= 0.995 * run["n_dets"], (matched, run["n_dets"])
    for name, value in run["stats"].items():
        assert metrics["stats"][name] == pytest.approx(value, abs=1e-9), name
    assert metrics["num_images"] == 30


def test_cli_val_writes_results_and_metrics(e2e, shared, tmp_path, capsys):
    root, _ = e2e
    data = shared / "data" / "coco_mini"
    rc = main(["val", "--data", str(_data_yaml(shared, tmp_path)), "--weights", str(root / "kapao_s_coco_seed0.pt"), "--imgsz", "256",
               "--batch-size", "4", "--project", str(tmp_path / "runs"), "--count-fused", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    run = tmp_path / "runs" / "exp"
    results = json.loads((run / "results_val.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(results) > 0 and "AP" in json.dumps(metrics)
    gt_ids = {im["id"] for im in json.loads((data / "person_keypoints.json").read_text())["images"]}
    assert {r["image_id"] for r in results} <= gt_ids  # ids from the annotation file
    assert "Speed ms/image" in out and "fused keypoint objects: nose" in out


def test_cli_val_wrong_keypoint_count(e2e, tmp_path, capsys):
    root, _ = e2e
    rc = main(["val", "--data", "crowdpose", "--weights", str(root / "kapao_s_coco_seed0.pt")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
