"""Synthetic keypoint scenes: valid COCO files, deterministic, labels that match what is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from kapao.cli.main import main as cli_main
from kapao.data.synthetic import (
    JOINTS,
    PersonSpec,
    build_human,
    generate_dataset,
    keypoint_mapping,
    render_scene,
    sample_person,
    synthesize,
)
from kapao.errors import KapaoError
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema

COCO_NAMES = coco_schema().names


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> Path:
    """40 train + 4 val scenes of 1-6 persons at 320 px (shared by the label checks)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 40, 4, imgsz=320, people=(1, 6), seed=7)
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _kps(d: dict) -> np.ndarray:
    k = len(d["categories"][0]["keypoints"])
    return np.array([a["keypoints"] for a in d["annotations"]], float).reshape(-1, k, 3)


def test_coco_format_and_data_yaml(coco_set: Path):
    ann = coco_set / "annotations" / "person_keypoints_train.json"
    coco = COCO(str(ann))
    cat = coco.loadCats([1])[0]
    assert cat["name"] == "person" and cat["keypoints"] == list(COCO_NAMES)
    assert cat["skeleton"] == [[a + 1, b + 1] for a, b in coco_schema().skeleton]
    assert len(coco.getImgIds()) == 40 and len(coco.getAnnIds()) > 40
    for img in coco.loadImgs(coco.getImgIds()):
        assert (coco_set / "images" / "train" / img["file_name"]).is_file()
        assert (img["width"], img["height"]) == (320, 320)
    for a in coco.loadAnns(coco.getAnnIds()):
        assert a["category_id"] == 1 and a["iscrowd"] == 0 and len(a["keypoints"]) == 17 * 3
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.02)
        assert a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3])
        assert set(a["keypoints"][2::3]) <= {0, 1, 2}
    val = COCO(str(coco_set / "annotations" / "person_keypoints_val.json"))
    assert len(val.getImgIds()) == 4

    schema = KeypointSchema.from_yaml(coco_set / "data.yaml")
    assert schema.to_dict() == coco_schema().to_dict()
    import yaml

    data = yaml.safe_load((coco_set / "data.yaml").read_text())
    assert Path(data["path"]) == coco_set.resolve()
    for key in ("train_images", "val_images", "train_annotations", "val_annotations"):
        assert (coco_set / data[key]).exists(), key


def test_labels_match_the_image(coco_set: Path):
    d = _load(coco_set / "annotations" / "person_keypoints_train.json")
    k = _kps(d)
    boxes = np.array([a["bbox"] for a in d["annotations"]])
    v = k[..., 2]
    lab = v > 0
    # labelled keypoints lie inside the image and inside their person's box; unlabelled ones are 0, 0
    assert np.all(k[..., 0][lab] >= 0) and np.all(k[..., 0][lab] <= 319)
    assert np.all(k[..., 1][lab] >= 0) and np.all(k[..., 1][lab] <= 319)
    x0, y0 = boxes[:, None, 0], boxes[:, None, 1]
    x1, y1 = x0 + boxes[:, None, 2], y0 + boxes[:, None, 3]
    assert np.all(((k[..., 0] >= x0) & (k[..., 0] <= x1) & (k[..., 1] >= y0) & (k[..., 1] <= y1))[lab])
    assert np.all(k[..., :2][~lab] == 0)
    assert np.all(boxes[:, 2:] >= 2) and np.all(boxes[:, :2] >= 0) and np.all(boxes[:, :2] + boxes[:, 2:] <= 320)
    # the dataset has truncated persons, occluded (v=1) and visible keypoints, and a spread of sizes
    truncated = (
        (boxes[:, 0] <= 0)
        | (boxes[:, 1] <= 0)
        | (boxes[:, 0] + boxes[:, 2] >= 320)
        | (boxes[:, 1] + boxes[:, 3] >= 320)
    )
    assert truncated.sum() >= 3
    outside = (v == 0).any(1) & truncated
    assert outside.sum() >= 2, "truncated persons should lose keypoints outside the image"
    assert 0.05 < (v == 1).mean() < 0.5 and (v == 2).mean() > 0.45
    size = boxes[:, 2:].max(1)
    assert size.min() < 50 and size.max() > 200


def test_deterministic_per_seed(tmp_path: Path):
    a = generate_dataset(tmp_path / "a", 6, 256, (2, 4), seed=3)
    b = generate_dataset(tmp_path / "b", 6, 256, (2, 4), seed=3, workers=2)
    c = generate_dataset(tmp_path / "c", 6, 256, (2, 4), seed=4)
    assert a.annotations.read_bytes() == b.annotations.read_bytes()
    assert a.annotations.read_bytes() != c.annotations.read_bytes()
    for img in sorted(a.images.glob("*.jpg")):
        assert img.read_bytes() == (b.images / img.name).read_bytes()
    assert len(list(a.images.glob("*.jpg"))) == 6
    assert not list(tmp_path.rglob("*.tmp*")), "temporary files must be renamed away"


def _figure_kps(spec: PersonSpec, schema: KeypointSchema | None = None) -> np.ndarray:
    schema = schema or coco_schema()
    rng = np.random.default_rng(0)
    scene = render_scene(rng, 400, 400, schema, persons=[spec], occluders=False)
    assert scene.keypoints.shape == (1, schema.num_keypoints, 3)
    return scene.keypoints[0]


def _standing(yaw: float, size: float = 300.0, center=(200.0, 200.0)) -> PersonSpec:
    pose = {k: 0.0 for k in ("spine_lean", "spine_side", "twist", "head_yaw", "head_pitch")}
    for s in "lr":
        pose |= {f"arm_flex_{s}": 0.0, f"arm_abd_{s}": 12.0, f"elbow_{s}": 10.0, f"elbow_dir_{s}": 0.0}
        pose |= {f"hip_flex_{s}": 0.0, f"hip_abd_{s}": 4.0, f"knee_{s}": 0.0}
    return PersonSpec(pose=pose, yaw=yaw, size_px=size, center_px=center)


def test_left_right_sides_follow_the_view():
    i = {n: k for k, n in enumerate(COCO_NAMES)}
    pairs = ["eye", "ear", "shoulder", "elbow", "wrist", "hip", "knee", "ankle"]
    front = _figure_kps(_standing(0.0))
    for p in pairs:  # facing the camera: the person's left is on the image's right, all visible
        left, right = front[i[f"left_{p}"]], front[i[f"right_{p}"]]
        assert left[0] > right[0] + 5, p
        assert left[2] == 2 and right[2] == 2, p
    assert front[i["nose"], 2] == 2 and front[i["nose"], 1] < front[i["left_shoulder"], 1]
    assert front[i["left_ankle"], 1] > front[i["left_knee"], 1] > front[i["left_hip"], 1] > front[i["left_shoulder"], 1]

    back = _figure_kps(_standing(180.0))
    for p in ["shoulder", "elbow", "wrist", "hip", "knee", "ankle", "ear"]:
        assert back[i[f"left_{p}"], 0] < back[i[f"right_{p}"], 0] - 5, p
    assert back[i["nose"], 2] == 0 and back[i["left_eye"], 2] == 0, "the face is not labelled from behind"

    side = _figure_kps(_standing(90.0))  # one side faces the camera, the other is hidden behind the body
    # (the near hip is behind the hanging near arm, so it is not in the list)
    joints = ["shoulder", "knee", "ear", "eye"]
    near, far = ("left", "right") if side[i["left_ear"], 2] == 2 else ("right", "left")
    near_v = side[[i[f"{near}_{p}"] for p in joints], 2]
    far_v = side[[i[f"{far}_{p}"] for p in [*joints, "hip"]], 2]
    assert np.all(near_v == 2) and np.all(far_v <= 1)


def test_nearer_person_occludes_farther():
    far = _standing(0.0, 260, (200, 200))
    near = _standing(0.0, 300, (200, 200))
    near.pose["arm_abd_l"] = near.pose["arm_abd_r"] = 12.0
    kps = render_scene(
        np.random.default_rng(1), 400, 400, coco_schema(), persons=[far, near], occluders=False
    ).keypoints
    assert kps.shape == (2, 17, 3)
    # torso joints of the far person are behind the near one's body; the near person is fully visible
    i = {n: k for k, n in enumerate(COCO_NAMES)}
    hidden = [i[n] for n in ("nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip")]
    assert np.all(kps[0, hidden, 2] == 1)
    assert np.all(kps[1, :, 2] == 2)


def test_truncated_keypoints_are_unlabelled():
    spec = _standing(0.0, 300, (200, 20))  # head and shoulders above the image top
    k = _figure_kps(spec)
    i = {n: j for j, n in enumerate(COCO_NAMES)}
    assert k[i["nose"], 2] == 0 and np.all(k[i["nose"], :2] == 0)
    assert k[i["left_ankle"], 2] == 2


def test_crowdpose_and_generic_schemas(tmp_path: Path):
    cp = crowdpose_schema()
    assert keypoint_mapping(cp) is not None
    k = _figure_kps(_standing(0.0), cp)
    head, neck = k[cp.names.index("head")], k[cp.names.index("neck")]
    ls, rs = k[cp.names.index("left_shoulder")], k[cp.names.index("right_shoulder")]
    assert head[1] < neck[1] < ls[1] and rs[0] < neck[0] < ls[0]
    paths = generate_dataset(tmp_path / "cp", 3, 256, (1, 3), seed=0, schema=cp, split_name="val")
    d = _load(paths.annotations)
    assert d["categories"][0]["keypoints"] == list(cp.names) and _kps(d).shape[1] == 14
    assert all("crowdIndex" in im for im in d["images"])

    generic = KeypointSchema(names=("a", "b", "c", "d"), flip_index=(0, 2, 1, 3), skeleton=((0, 1), (0, 2), (2, 3)))
    paths = generate_dataset(tmp_path / "g", 3, 256, (1, 2), seed=0, schema=generic)
    assert _kps(_load(paths.annotations)).shape[1:] == (4, 3)
    loose = KeypointSchema(names=("a", "b", "c"), flip_index=(0, 2, 1), skeleton=((0, 1),))
    with pytest.raises(KapaoError, match=r"\['a', 'b', 'c'\] are not body joints"):
        generate_dataset(tmp_path / "x", 1, 256, schema=loose)


def test_small_persons_have_no_keypoints_as_in_coco(tmp_path: Path):
    paths = generate_dataset(tmp_path / "s", 6, 320, (4, 6), seed=1, min_person=12, clutter=0)
    d = _load(paths.annotations)
    small = [a for a in d["annotations"] if a["area"] < 32 * 32]
    assert small and all(a["num_keypoints"] == 0 and not any(a["keypoints"]) for a in small)
    assert all(a["num_keypoints"] > 0 for a in d["annotations"] if a["area"] > 64 * 64)
    paths = generate_dataset(tmp_path / "all", 6, 320, (4, 6), seed=1, min_person=12, clutter=0, min_kp_area=0)
    d = _load(paths.annotations)
    assert all(a["num_keypoints"] > 0 for a in d["annotations"] if a["area"] < 32 * 32 and a["bbox"][0] > 0)


def test_random_people_cover_the_pose_space():
    rng = np.random.default_rng(0)
    figs = [build_human(sample_person(rng)) for _ in range(200)]
    j = {n: k for k, n in enumerate(JOINTS)}
    # wrists above the head (arms raised) and knees near hip height (sitting/crouching) both occur
    raised = sum(f.joints[j["left_wrist"], 1] < f.joints[j["head"], 1] for f in figs)
    seated = sum(abs(f.joints[j["left_knee"], 1] - f.joints[j["left_hip"], 1]) < 0.1 for f in figs)
    assert raised >= 5 and seated >= 10
    facing = [f.base_v[j["nose"]] for f in figs]
    assert 0.25 < np.mean(np.array(facing) == 2) < 0.85


def test_cli_writes_dataset(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(
        ["synth", str(out), "--images", "3", "--val-images", "2", "--imgsz", "128", "--people", "1-2", "--seed", "5"]
    )
    assert rc == 0
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 3
    assert len(list((out / "images" / "val").glob("*.jpg"))) == 2
    assert (out / "annotations" / "person_keypoints_val.json").is_file() and (out / "data.yaml").is_file()
    assert "data YAML" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--people", "5-2"], "people range 5-2 is invalid"),
        (["--people", "x"], "not a range"),
        (["--images", "0"], "number of images is 0"),
        (["--val-images", "0"], "val images is 0"),
        (["--imgsz", "8"], "too small"),
        (["--data", "missing.yaml"], "not found"),
        (["--clutter", "-1"], "clutter -1.0 is invalid"),
        (["--min-person", "1"], "minimum person size"),
    ],
)
def test_cli_bad_args(tmp_path: Path, capsys, args, message):
    rc = cli_main(["synth", str(tmp_path / "o"), "--images", "2", "--imgsz", "64", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and message in err and len(err.splitlines()) == 1


def test_cli_unwritable_out(tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = cli_main(["synth", str(blocker / "out"), "--images", "1", "--imgsz", "64"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert str(blocker / "out") in err and "cannot create the output folder" in err


def test_side_cue_lightens_left_limbs_only():
    from kapao.data.synthetic import SceneOptions, render_scene
    from kapao.schema import coco_schema

    schema = coco_schema()
    plain = render_scene(np.random.default_rng(5), 256, 256, schema, SceneOptions(people=(1, 1), min_person=180, clutter=0))
    cued = render_scene(np.random.default_rng(5), 256, 256, schema,
                        SceneOptions(people=(1, 1), min_person=180, clutter=0, side_cue=0.5))
    np.testing.assert_array_equal(plain.keypoints, cued.keypoints)  # same scene, same labels
    names = schema.names
    brighter = {}
    for side in ("left", "right"):
        for joint in ("elbow", "knee"):
            k = names.index(f"{side}_{joint}")
            x, y, v = plain.keypoints[0, k]
            if v == 2:
                xi, yi = int(x), int(y)
                brighter[f"{side}_{joint}"] = int(cued.image[yi, xi].astype(int).sum()) - int(plain.image[yi, xi].astype(int).sum())
    assert any(k.startswith("left") for k in brighter) and any(k.startswith("right") for k in brighter)
    assert all(d > 0 for k, d in brighter.items() if k.startswith("left")), brighter
    assert all(d == 0 for k, d in brighter.items() if k.startswith("right")), brighter
