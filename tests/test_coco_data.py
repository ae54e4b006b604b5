"""Reading COCO / CrowdPose keypoint JSON: official semantics, validation of bad input, cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from kapao.data.coco import image_size_from_header, load_keypoint_annotations
from kapao.errors import KapaoError


@pytest.fixture(scope="module")
def labels_golden(golden):
    return json.loads((golden / "labels.json").read_text())


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _dataset(tmp_path: Path, k: int = 3, images=((10, 40, 30),), anns=None) -> tuple[Path, Path]:
    """A small COCO-format dataset: PNG images of the given (id, h, w) and annotations."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    entries = []
    for iid, h, w in images:
        name = f"{iid}.png"
        cv2.imwrite(str(img_dir / name), np.zeros((h, w, 3), np.uint8))
        entries.append({"id": iid, "file_name": name, "height": h, "width": w})
    if anns is None:
        anns = [_ann(1, images[0][0], k)]
    cats = [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(k)], "skeleton": []}]
    js = _write(tmp_path / "ann.json", {"images": entries, "annotations": anns, "categories": cats})
    return js, img_dir


def _ann(aid: int, iid: int, k: int = 3, **kw) -> dict:
    kps = []
    for j in range(k):
        kps += [5.0 + j, 6.0 + j, 2]
    a = {"id": aid, "image_id": iid, "category_id": 1, "iscrowd": 0, "bbox": [2.0, 3.0, 10.0, 20.0],
         "keypoints": kps, "num_keypoints": k}
    a.update(kw)
    return a


# ------------------------------------------------------------------------------------------------
# The official inputs of labels.json


def test_golden_coco_json_train_and_val_semantics(labels_golden, tmp_path):
    js = _write(tmp_path / "coco.json", labels_golden["coco_input_json"])
    train = load_keypoint_annotations(js, None, 17, keep_crowd=False, cache=False)
    val = load_keypoint_annotations(js, None, 17, keep_crowd=True, cache=False)
    assert len(train) == len(val) == 3
    assert [int(i) for i in train.image_ids] == [100024, 100025, 100026]
    assert [len(im) for im in train] == [9, 7, 6]  # the crowd region of 100024 is dropped
    assert [len(im) for im in val] == [10, 7, 6]
    assert train.summary.crowd_skipped == 1 and val.summary.crowd_skipped == 0
    assert train.summary.num_skipped == 0
    a = val[0]
    assert (a.height, a.width) == (426, 640)
    assert a.iscrowd.tolist() == [False] * 8 + [True, False]
    assert a.ann_ids.tolist() == list(range(1, 11))
    assert a.keypoints.shape == (10, 17, 3)
    np.testing.assert_array_equal(a.boxes[0], [72.0, 92.0, 66.0, 156.0])
    np.testing.assert_array_equal(a.keypoints[0, 0], [105.0, 103.56, 2])
    assert (a.keypoints[9] == 0).all()  # the num_keypoints=0 person is kept, all zeros
    assert train.keypoint_names[0] == "nose" and len(train.keypoint_names) == 17


def test_golden_crowdpose_keypoints_are_clipped(labels_golden, tmp_path):
    js = _write(tmp_path / "cp.json", labels_golden["crowdpose_input_json"]["trainval"])
    raw = load_keypoint_annotations(js, None, 14, cache=False)
    clipped = load_keypoint_annotations(js, None, 14, clip_keypoints=True, cache=False)
    assert raw[0].keypoints[0, 4, 0] == -3.5 and clipped[0].keypoints[0, 4, 0] == 0.0
    assert raw[0].keypoints[7, 12, 1] == -4.0 and clipped[0].keypoints[7, 12, 1] == 0.0
    assert (clipped.keypoints[..., 0] <= 640).all() and (clipped.keypoints[..., 1] >= 0).all()
    changed = (raw.keypoints != clipped.keypoints).any(-1).sum()
    assert changed == 3  # x=-3.5, y=-4 and the neck at y=-1.35


def test_file_of_another_keypoint_count_is_one_clear_error(labels_golden, tmp_path):
    js = _write(tmp_path / "cp.json", labels_golden["crowdpose_input_json"]["test"])
    with pytest.raises(KapaoError, match=r"cp\.json: its categories have 14 keypoints but the keypoint schema has 17"):
        load_keypoint_annotations(js, None, 17, cache=False)


# ------------------------------------------------------------------------------------------------
# Real data


def test_real_coco_mini_with_header_checks(shared):
    root = shared / "data" / "coco_mini"
    val = load_keypoint_annotations(root / "person_keypoints.json", root / "images", 17, keep_crowd=True, cache=False)
    assert len(val) == 30 and val.summary.num_skipped == 0
    assert val.summary.persons_kept == 79 and val.summary.visible_keypoints == 466
    assert sum((im.keypoints[..., 2] > 0).any(1).sum() > 0 for im in val) == 20
    train = load_keypoint_annotations(root / "person_keypoints_train2017.json", root / "images", 17, cache=False)
    assert train.summary.crowd_skipped == 5 and train.summary.persons_kept == 167
    assert train.summary.visible_keypoints == 800
    im = train[0]
    assert im.file.is_file() and cv2.imread(str(im.file)).shape[:2] == (im.height, im.width)


def test_real_crowdpose_mini(shared):
    root = shared / "data" / "crowdpose_mini"
    ann = load_keypoint_annotations(root / "person_keypoints.json", root / "images", 14, clip_keypoints=True,
                                    check_images="decode", cache=False)
    assert len(ann) == 3 and ann.summary.num_skipped == 0 and ann.num_keypoints == 14
    for im in ann:
        assert (im.keypoints[..., 0] <= im.width).all() and (im.keypoints[..., 1] <= im.height).all()


def test_header_size_matches_decoder(tmp_path, shared):
    cases = {
        "a.png": (cv2.IMWRITE_PNG_COMPRESSION, 3),
        "b.jpg": (cv2.IMWRITE_JPEG_QUALITY, 90),
        "c.jpg": (cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
    }
    for i, (name, params) in enumerate(cases.items()):
        img = np.full((37 + i, 53 + 2 * i, 3), 100, np.uint8)
        cv2.imwrite(str(tmp_path / name), img, list(params))
        assert image_size_from_header(tmp_path / name) == img.shape[:2]
    (tmp_path / "d.bmp").write_bytes(cv2.imencode(".bmp", np.zeros((4, 5, 3), np.uint8))[1].tobytes())
    assert image_size_from_header(tmp_path / "d.bmp") is None  # unknown format: not checked
    for p in sorted((shared / "data" / "coco_mini" / "images").glob("*.jpg"))[:10]:
        assert image_size_from_header(p) == cv2.imread(str(p)).shape[:2]


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_annotations_are_skipped_and_counted(tmp_path):
    k = 3
    anns = [
        _ann(1, 10, k),  # good
        _ann(2, 10, k, keypoints=[1.0] * 12),  # another keypoint count
        _ann(3, 10, k, keypoints=[1.0, 1.0, 3] * 3),  # visibility 3
        _ann(4, 10, k, bbox=[1.0, 1.0, -5.0, 4.0]),  # negative width
        _ann(5, 10, k, bbox=[1.0, 1.0, 5.0, 0.0]),  # zero height
        _ann(6, 10, k, bbox=[1.0, 1.0, 5.0]),  # not 4 numbers
        _ann(7, 10, k, keypoints=[1.0, None, 2] * 3),  # non-numeric
        _ann(8, 99, k),  # unknown image
        _ann(9, 10, k, bbox=[float("nan"), 1.0, 5.0, 5.0]),  # non-finite
        {"id": 10, "image_id": 10, "bbox": [1.0, 1.0, 2.0, 2.0]},  # no keypoints
        _ann(11, 10, k, keypoints=[4.0, 4.0, 0, 5.0, 5.0, 1, 0.0, 0.0, 0]),  # v=0 with x, y set
    ]
    js, img_dir = _dataset(tmp_path, k, anns=anns)
    ann = load_keypoint_annotations(js, img_dir, k, cache=False)
    s = ann.summary
    assert ann[0].ann_ids.tolist() == [1, 11]
    assert s.skipped == {
        "wrong_keypoint_count": 1, "bad_visibility": 1, "empty_box": 2, "bad_box": 2,
        "bad_keypoints": 2, "unknown_image_id": 1,
    }
    assert s.persons_kept == 2 and s.annotations_listed == 11
    np.testing.assert_array_equal(ann[0].keypoints[1], [[0, 0, 0], [5, 5, 1], [0, 0, 0]])  # v=0 -> (0, 0, 0)
    text = str(s)
    assert "skipped 2 annotations with a zero or negative box width or height" in text
    assert "annotation 2 (image 10): 12 keypoint values, expected 9 (3 x 3)" in s.examples["wrong_keypoint_count"][0]


def test_bad_images_are_skipped_and_counted(tmp_path):
    k = 2
    images = ((1, 20, 30), (2, 20, 30), (3, 20, 30))
    anns = [_ann(1, 1, k), _ann(2, 2, k), _ann(3, 3, k), _ann(4, 4, k)]
    js, img_dir = _dataset(tmp_path, k, images=images, anns=anns)
    data = json.loads(js.read_text())
    (img_dir / "2.png").unlink()  # missing file
    data["images"][2]["height"] = 21  # size mismatch
    data["images"].append({"id": 4, "file_name": "4.png", "width": 30})  # no height
    data["images"].append({"id": 1, "file_name": "1b.png", "height": 20, "width": 30})  # duplicate id
    _write(js, data)
    ann = load_keypoint_annotations(js, img_dir, k, cache=False)
    s = ann.summary
    assert [int(i) for i in ann.image_ids] == [1]
    assert s.skipped == {"missing_image": 1, "size_mismatch": 1, "bad_image_entry": 1, "duplicate_image_id": 1,
                         "on_skipped_image": 3}
    assert "3.png is 30x20 but the JSON says 30x21" in s.examples["size_mismatch"][0]
    # decode mode finds the same; 'exists' does not look at sizes; 'none' checks nothing
    assert load_keypoint_annotations(js, img_dir, k, check_images="decode", cache=False).summary.skipped == s.skipped
    assert [int(i) for i in load_keypoint_annotations(js, img_dir, k, check_images="exists", cache=False).image_ids] == [1, 3]
    assert [int(i) for i in load_keypoint_annotations(js, img_dir, k, check_images="none", cache=False).image_ids] == [1, 2, 3]


def test_unusable_files_raise_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [')
    with pytest.raises(KapaoError, match=r"bad\.json: not valid JSON") as e:
        load_keypoint_annotations(bad, None, 17, cache=False)
    assert "\n" not in str(e.value)
    _write(bad, {"images": []})
    with pytest.raises(KapaoError, match="'annotations' is missing or not a list"):
        load_keypoint_annotations(bad, None, 17, cache=False)
    _write(bad, [1, 2])
    with pytest.raises(KapaoError, match="expected a COCO-format object"):
        load_keypoint_annotations(bad, None, 17, cache=False)
    with pytest.raises(KapaoError, match="annotation file not found"):
        load_keypoint_annotations(tmp_path / "nope.json", None, 17)
    with pytest.raises(KapaoError, match="image folder not found"):
        load_keypoint_annotations(bad, tmp_path / "no_images", 17)
    with pytest.raises(KapaoError, match="check_images="):
        load_keypoint_annotations(bad, None, 17, check_images="full")


# ------------------------------------------------------------------------------------------------
# Cache


def test_cache_round_trip_and_invalidation(tmp_path, labels_golden):
    js, img_dir = _dataset(tmp_path, 17, images=((100024, 426, 640),),
                           anns=[a for a in labels_golden["coco_input_json"]["annotations"] if a["image_id"] == 100024])
    cache_dir = tmp_path / "cache"
    first = load_keypoint_annotations(js, img_dir, 17, cache_dir=cache_dir)
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz" and not first.summary.from_cache
    # the same cache serves train (no crowd) and val (crowd kept)
    second = load_keypoint_annotations(js, img_dir, 17, cache_dir=cache_dir, keep_crowd=True)
    assert second.summary.from_cache and len(second[0]) == 10 and len(first[0]) == 9
    third = load_keypoint_annotations(js, img_dir, 17, cache_dir=cache_dir)
    assert third.summary.from_cache
    for name in ("boxes", "keypoints", "iscrowd", "ann_ids", "offsets", "image_ids", "heights", "widths"):
        np.testing.assert_array_equal(getattr(first, name), getattr(third, name))
    assert third.summary.lines()[0].endswith("[cache]") and third[0].file == first[0].file
    # a changed image file or JSON invalidates the cache
    os.utime(img_dir / "100024.png", ns=(1, 1))
    assert not load_keypoint_annotations(js, img_dir, 17, cache_dir=cache_dir).summary.from_cache
    data = json.loads(js.read_text())
    data["annotations"] = data["annotations"][:3]
    _write(js, data)
    changed = load_keypoint_annotations(js, img_dir, 17, cache_dir=cache_dir)
    assert not changed.summary.from_cache and len(changed[0]) == 3
    assert load_keypoint_annotations(js, img_dir, 17, cache_dir=cache_dir).summary.from_cache
    assert not list(cache_dir.glob("*.tmp"))  # written atomically, no leftovers
    # a corrupt cache is rebuilt, not trusted
    for f in cache_dir.iterdir():
        f.write_bytes(b"garbage")
    rebuilt = load_keypoint_annotations(js, img_dir, 17, cache_dir=cache_dir)
    assert not rebuilt.summary.from_cache and len(rebuilt[0]) == 3


def test_default_cache_goes_to_the_user_cache_not_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPAO_CACHE", str(tmp_path / "home"))
    js, img_dir = _dataset(tmp_path, 3)
    load_keypoint_annotations(js, img_dir, 3)
    assert not list(tmp_path.glob("ann.*.kapao-cache.npz"))  # dataset folders stay untouched
    assert len(list((tmp_path / "home" / "annotations").glob("ann.*.kapao-cache.npz"))) == 1
    assert load_keypoint_annotations(js, img_dir, 3).summary.from_cache


def test_many_images_checked_in_parallel_keep_json_order(tmp_path):
    k = 1
    images = [(i, 4 + i % 3, 5) for i in range(300)]
    anns = [_ann(i, i, k, bbox=[0.0, 0.0, 2.0, 2.0]) for i in range(300)]
    js, img_dir = _dataset(tmp_path, k, images=images, anns=anns)
    data = json.loads(js.read_text())
    data["images"] = data["images"][::-1]  # JSON order is kept, whatever it is
    for i in (7, 150, 299):
        (img_dir / f"{i}.png").unlink()
    data["images"][10]["width"] = 6  # image 289
    _write(js, data)
    ann = load_keypoint_annotations(js, img_dir, k, cache=False)
    expected = [i for i in range(299, -1, -1) if i not in (7, 150, 299, 289)]
    assert ann.image_ids.tolist() == expected
    assert [int(im.ann_ids[0]) for im in ann] == expected
    assert ann.summary.skipped == {"missing_image": 3, "size_mismatch": 1, "on_skipped_image": 4}
