"""The Dataset against the official val dataloader goldens (letterbox.json, loss.npz) and the
training mode's invariants (shapes, label ranges, determinism, unreadable images)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data.distributed import DistributedSampler

from kapao.data.coco import load_keypoint_annotations
from kapao.data.dataset import KeypointDataset, collate, create_dataloader, split_source
from kapao.errors import KapaoError
from kapao.schema import coco_schema


def _write_coco(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    cat = {"id": 1, "name": "person", "keypoints": list(coco_schema().names), "skeleton": []}
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [cat]}))
    return path


# ------------------------------------------------------------------------------ val goldens


@pytest.fixture(scope="module")
def blank_set(tmp_path_factory, golden):
    """The 12 blank images of letterbox.json -> dataloader_pipeline, listed by name."""
    cases = json.loads((golden / "letterbox.json").read_text())["dataloader_pipeline"]
    root = tmp_path_factory.mktemp("blank")
    files = sorted(it["file"] for it in cases[0]["order_after_rect_sort"])
    images = []
    for i, f in enumerate(files):
        h, w = (int(v) for v in f.split("_")[1].split(".")[0].split("x"))
        cv2.imwrite(str(root / f), np.zeros((h, w, 3), np.uint8))
        images.append({"id": i + 1, "file_name": f, "height": h, "width": w})
    return cases, _write_coco(root / "blank.json", images, []), root


@pytest.mark.parametrize("case_i", range(6))
def test_val_pipeline_matches_official_dataloader(blank_set, case_i):
    cases, js, root = blank_set
    case = cases[case_i]
    ds = KeypointDataset(js, coco_schema(), case["imgsz"], images_dir=root, rect=case["rect"],
                         batch_size=case["batch_size"], stride=case["stride"], pad=case["pad"])
    ref = {it["file"]: it for it in case["order_after_rect_sort"]}
    assert len(ds) == len(ref) == 12
    if case["rect"]:
        assert ds.batch_shapes.tolist() == case["batch_shapes"]
        # sorted by h/w as the official (its sort is not stable: equal ratios may swap)
        ratios = [h / w for h, w in ds.shapes0.tolist()]
        ref_ratios = [int(f.split("_")[1].split("x")[0]) / int(f.split("x")[1].split(".")[0])
                      for f in (it["file"] for it in case["order_after_rect_sort"])]
        assert ratios == ref_ratios
    else:
        assert ds.batch_shapes is None
    for i in range(len(ds)):
        img, lab, path, shapes = ds[i]
        want = ref[Path(path).name]
        assert list(img.shape) == want["tensor_chw"] and img.dtype == torch.uint8
        assert json.loads(json.dumps(shapes)) == want["shapes"]
        if case["rect"]:
            assert int(ds.batch_index[i]) == want["batch"]
        assert lab.shape == (0, 6 + 3 * 17)


def test_val_real_image_matches_official_checksum(golden, tmp_path):
    lb = json.loads((golden / "letterbox.json").read_text())["real_image"]
    a = np.load(golden / "inputs.npz")["A_bgr"]
    cv2.imwrite(str(tmp_path / "a.png"), a)
    js = _write_coco(tmp_path / "a.json", [{"id": 1, "file_name": "a.png", "height": 426, "width": 640}], [])
    for size in (640, 1280):
        ds = KeypointDataset(js, coco_schema(), size, images_dir=tmp_path)
        img, _, _, shapes = ds[0]
        ref = lb[f"val_dataloader_{size}"]
        assert list(img.shape) == ref["chw_rgb"]["shape"]
        assert hashlib.md5(img.numpy().tobytes()).hexdigest() == ref["chw_rgb"]["md5"]
        assert json.loads(json.dumps(shapes)) == ref["shapes"]


@pytest.fixture(scope="module")
def loss_batch_dir(tmp_path_factory, golden):
    """Images A and B (PNG) with their COCO annotations from labels.json (image C left out)."""
    root = tmp_path_factory.mktemp("lossbatch")
    inputs = np.load(golden / "inputs.npz")
    cv2.imwrite(str(root / "100024.png"), inputs["A_bgr"])
    cv2.imwrite(str(root / "100025.png"), inputs["B_bgr"])
    coco = json.loads((golden / "labels.json").read_text())["coco_input_json"]
    keep = {100024, 100025}
    coco["images"] = [dict(im, file_name=f"{im['id']}.png") for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (root / "coco.json").write_text(json.dumps(coco))
    return root


def test_loss_batch_matches_official_targets_and_images(loss_batch_dir, golden):
    """val2017 semantics (crowd kept), rect, batch 2 at 640: order [A, B], shape 512x640."""
    ref = np.load(golden / "loss.npz")
    meta = json.loads((golden / "loss.json").read_text())
    ds = KeypointDataset(loss_batch_dir / "coco.json", coco_schema(), 640, images_dir=loss_batch_dir,
                         rect=True, batch_size=2)
    assert ds.batch_shapes.tolist() == meta["batch_shapes"]
    imgs, targets, paths, shapes = next(iter(create_dataloader(ds, 2)))
    with pytest.raises(KapaoError, match="batch size 2"):
        create_dataloader(ds, 4)
    assert [Path(p).name for p in paths] == meta["image_files_in_batch_order"]
    assert json.loads(json.dumps(shapes)) == meta["shapes"]
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 3, 512, 640)
    np.testing.assert_array_equal(imgs.numpy(), ref["imgs_uint8"])
    t = targets.numpy()
    assert t.dtype == np.float32 and t.shape == ref["targets"].shape == (235, 57)
    np.testing.assert_array_equal(t, ref["targets"])  # bit for bit
    # quirk 7: keypoint-object triplets and v=0 keypoints become (padw/W, padh/H, 0)
    kp_rows = t[t[:, 1] > 0]
    np.testing.assert_allclose(kp_rows[kp_rows[:, 0] == 1][:, 7], 16 / 512)


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def synth_yaml(tmp_path_factory) -> Path:
    from kapao.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), 6, val_images=3, imgsz=256, people=(1, 3), seed=0,
                      aspect=(0.6, 1.4))


def test_train_items_shapes_and_label_ranges(synth_yaml):
    ds = KeypointDataset.from_data_yaml(synth_yaml, "train", imgsz=256, seed=1)
    assert ds.augment and len(ds) == 6
    k = 17
    fi = np.asarray(coco_schema().flip_index)
    total_vis = 0
    for i in range(len(ds)):
        img, lab, path, shapes = ds[i]
        assert img.shape == (3, 256, 256) and img.dtype == torch.uint8 and shapes is None
        assert lab.shape[1] == 6 + 3 * k and torch.isfinite(lab).all()
        lab = lab.numpy()
        cls = lab[:, 1]
        assert np.all((cls >= 0) & (cls <= k) & (cls == np.round(cls)))
        assert np.all(lab[:, 2:6] >= 0) and np.all(lab[:, 2:6] <= 1)
        kp = lab[:, 6:].reshape(len(lab), k, 3)
        vis = kp[..., 2] > 0
        assert np.all(kp[vis][:, :2] >= 0) and np.all(kp[vis][:, :2] <= 1)
        assert np.all(kp[~vis][:, :2] == 0)
        total_vis += int(vis.sum())
        # visible keypoints lie in their pose box
        for row, v in zip(lab[cls == 0], vis[cls == 0]):
            x1, x2 = row[2] - row[4] / 2, row[2] + row[4] / 2
            y1, y2 = row[3] - row[5] / 2, row[3] + row[5] / 2
            p = row[6:].reshape(k, 3)[v]
            assert np.all(p[:, 0] >= x1 - 2e-3) and np.all(p[:, 0] <= x2 + 2e-3)
            assert np.all(p[:, 1] >= y1 - 2e-3) and np.all(p[:, 1] <= y2 + 2e-3)
    assert total_vis > 20
    assert sorted(fi.tolist()) == list(range(k))


def test_train_items_are_deterministic_per_seed_and_epoch(synth_yaml):
    a = KeypointDataset.from_data_yaml(synth_yaml, "train", imgsz=256, seed=3)
    b = KeypointDataset.from_data_yaml(synth_yaml, "train", imgsz=256, seed=3, cache="ram")
    for i in (0, 4):
        ia, la, _, _ = a[i]
        ib, lb, _, _ = b[i]
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    x0 = a[2][0]
    a.set_epoch(1)
    assert not torch.equal(a[2][0], x0)
    # worker processes give the same batches as the main process
    ref = [batch for batch in create_dataloader(a, 3, workers=0)]
    got = [batch for batch in create_dataloader(a, 3, workers=2)]
    for (i1, l1, p1, _), (i2, l2, p2, _) in zip(ref, got):
        assert torch.equal(i1, i2) and torch.equal(l1, l2) and p1 == p2


def test_collate_and_distributed_sampler(synth_yaml):
    ds = KeypointDataset.from_data_yaml(synth_yaml, "val", imgsz=256)
    assert not ds.augment and len(ds) == 3
    batch = collate([ds[0], ds[1]])
    imgs, lab, paths, shapes = batch
    assert imgs.shape == (2, 3, 256, 256)
    assert set(lab[:, 0].tolist()) <= {0.0, 1.0} and len(paths) == 2 and len(shapes) == 2
    n0 = len(ds[0][1])
    assert torch.all(lab[:n0, 0] == 0) and torch.all(lab[n0:, 0] == 1)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    seen = [p for _, _, paths, _ in create_dataloader(ds, 1, sampler=sampler) for p in paths]
    assert seen == [str(ds.paths[1]), str(ds.paths[0])]  # 3 items padded to 4: rank 1 gets [1, 0]


def test_unreadable_image_is_skipped_with_a_warning(synth_yaml, tmp_path, capsys):
    src = split_source(synth_yaml, "train")
    ann = load_keypoint_annotations(src.annotations, src.images, 17, cache=False)
    ds = KeypointDataset(ann, src.schema, 256, augment=True, hyp={"mosaic": 0.0})
    bad = ds.paths[2]
    data = bad.read_bytes()
    try:
        bad.write_bytes(data[:200])  # header intact, body cut: cv2 cannot decode it
        img, lab, path, _ = ds[2]
        assert img.shape == (3, 256, 256) and path == str(bad)
        assert ds.skipped == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "skipped unreadable image" in err and bad.name in err
        ds[2]  # the same image again: no second warning, count unchanged
        assert ds.skipped == 1 and capsys.readouterr().err == ""
        val = KeypointDataset(ann, src.schema, 256, augment=False)
        img, lab, _, shapes = val[2]
        assert img.shape == (3, 256, 256) and len(lab) == 0 and val.skipped == 1
    finally:
        bad.write_bytes(data)


def test_split_source_and_errors(synth_yaml, tmp_path):
    src = split_source(synth_yaml, "val")
    assert src.images.is_dir() and src.annotations.is_file() and src.schema.num_keypoints == 17
    # relative `path` is taken from the YAML's folder
    data = yaml.safe_load(Path(synth_yaml).read_text())
    data["path"] = str(Path(data["path"]).relative_to(Path(synth_yaml).parent.parent))
    rel = Path(synth_yaml).parent.parent / "rel.yaml"
    rel.write_text(yaml.safe_dump(data))
    assert split_source(rel, "train").annotations == split_source(synth_yaml, "train").annotations
    with pytest.raises(KapaoError, match="test_images"):
        split_source(synth_yaml, "test")
    with pytest.raises(KapaoError, match="multiple of the stride"):
        KeypointDataset.from_data_yaml(synth_yaml, "val", imgsz=100)
    with pytest.raises(KapaoError, match="cache"):
        KeypointDataset.from_data_yaml(synth_yaml, "val", imgsz=256, cache="disk")


# ------------------------------------------------------------------------------ kapao data show


def test_draw_labels_known_answer():
    from kapao.viz import POSE_COLOR, draw_labels

    schema = coco_schema()
    img = np.zeros((100, 200, 3), np.uint8)
    row = np.zeros(5 + 3 * 17)
    row[1:5] = (0.5, 0.5, 0.5, 0.6)  # pose box x 50..150, y 20..80
    row[5 + 3 * 5: 8 + 3 * 5] = (0.4, 0.3, 2)  # left shoulder at (80, 30)
    row[5 + 3 * 6: 8 + 3 * 6] = (0.6, 0.3, 2)  # right shoulder at (120, 30)
    kp = np.zeros(5 + 3 * 17)
    kp[:5] = (1 + 9, 0.25, 0.5, 0.05, 0.1)  # left wrist keypoint object: box 45..55 x 45..55
    out = draw_labels(img, np.stack([row, kp]), schema)
    assert tuple(out[20, 100]) == POSE_COLOR and tuple(out[80, 100]) == POSE_COLOR
    assert tuple(out[50, 45]) == schema.colors[9]  # keypoint-object box edge in its keypoint's colour
    assert tuple(out[30, 100]) != (0, 0, 0)  # the shoulder limb
    assert tuple(out[30, 80]) == schema.colors[5]  # filled keypoint dot (v = 2)
    assert out[90:, :40].max() == 0 and img.max() == 0  # nothing else drawn, input untouched


def test_kapao_data_show_writes_a_grid(synth_yaml, tmp_path, capsys):
    from kapao.cli.main import main

    out = tmp_path / "grid.png"
    assert main(["data", "show", str(synth_yaml), "--n", "8", "--imgsz", "256", "--seed", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    grid = cv2.imread(str(out))
    assert grid.shape == (3 * 256, 3 * 256, 3)
    tiles = [grid[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] for r in range(3) for c in range(3)][:8]
    # 8 samples from 6 images: all different (repeats get another epoch's augmentation)
    assert len({t.tobytes() for t in tiles}) == 8
    assert (grid == (255, 0, 255)).all(-1).sum() > 100  # pose-object boxes drawn
    # val split, and a one-line error for a bad size
    assert main(["data", "show", str(synth_yaml), "--split", "val", "--n", "2", "--imgsz", "256",
                 "--out", str(tmp_path / "val.png")]) == 0
    capsys.readouterr()
    assert main(["data", "show", str(synth_yaml), "--imgsz", "100", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multiple of the stride" in err
