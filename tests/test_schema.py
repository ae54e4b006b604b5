from __future__ import annotations

import pytest

from kapao.errors import KapaoError
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema


def test_shipped_schemas():
    coco = coco_schema()
    assert coco.num_keypoints == 17 and coco.num_classes == 18
    assert coco.class_names[:2] == ["person", "nose"]
    assert coco.flip_index[1] == 2 and coco.kp_bbox == 0.05
    assert len(coco.colors) == 17 and coco.evaluator == "coco"
    crowd = crowdpose_schema()
    assert crowd.num_keypoints == 14 and crowd.evaluator == "crowdpose"
    assert crowd.oks_sigmas[6] == pytest.approx(0.107)


def test_round_trip_through_dict():
    coco = coco_schema()
    again = KeypointSchema.from_dict(coco.to_dict())
    assert again.to_dict() == coco.to_dict()


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"flip_index": [0, 2, 1]}, "'flip_index' has 3 entries, expected 17"),
        ({"flip_index": [1] * 17}, "permutation"),
        ({"skeleton": [[0, 17]]}, "skeleton edge"),
        ({"oks_sigmas": [0.1]}, "'oks_sigmas' has 1 entries"),
        ({"kp_bbox": 2}, "kp_bbox"),
        ({"evaluator": "mpii"}, "evaluator"),
    ],
)
def test_bad_schema_messages(patch, message):
    d = coco_schema().to_dict() | patch
    with pytest.raises(KapaoError, match=message):
        KeypointSchema.from_dict(d, source="my.yaml")


def test_missing_yaml(tmp_path):
    with pytest.raises(KapaoError, match="not found"):
        KeypointSchema.from_yaml(tmp_path / "none.yaml")
    p = tmp_path / "nokp.yaml"
    p.write_text("path: x\n")
    with pytest.raises(KapaoError, match="no 'keypoints:' section"):
        KeypointSchema.from_yaml(p)
