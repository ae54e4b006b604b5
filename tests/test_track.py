from __future__ import annotations

import numpy as np
import pytest

from kapao.track import PoseTracker


def _person(x: float, y: float, k: int = 17) -> tuple[np.ndarray, np.ndarray]:
    box = np.array([x, y, x + 50, y + 120], float)
    rng = np.random.default_rng(int(x))
    kps = np.stack([x + rng.uniform(0, 50, k), y + rng.uniform(0, 120, k)], -1)
    return box, kps


def test_ids_follow_moving_people_and_swap_order():
    tracker = PoseTracker()
    a, ka = _person(10, 10)
    b, kb = _person(300, 40)
    ids0 = tracker.update(np.stack([a, b]), np.stack([ka, kb]))
    assert list(ids0) == [1, 2]
    # next frame: both moved a little, detections come in the other order
    ids1 = tracker.update(np.stack([b + 4, a + 3]), np.stack([kb + 4, ka + 3]))
    assert list(ids1) == [2, 1]
    # a third person appears, the first disappears
    c, kc = _person(600, 10)
    ids2 = tracker.update(np.stack([b + 8, c]), np.stack([kb + 8, kc]))
    assert list(ids2) == [2, 3]


def test_lost_tracks_expire_and_empty_frames():
    tracker = PoseTracker(max_missed=1)
    a, ka = _person(10, 10)
    assert list(tracker.update(a[None], ka[None])) == [1]
    assert tracker.update(np.zeros((0, 4)), np.zeros((0, 17, 2))).shape == (0,)
    assert tracker.update(np.zeros((0, 4)), np.zeros((0, 17, 2))).shape == (0,)
    assert list(tracker.update(a[None], ka[None])) == [2]  # expired: a new id


def test_box_iou_equals_torchvision():
    """The NumPy IoU the tracker matches with gives torchvision's `box_iou` bit for bit."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from kapao.track import box_iou

    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        for na, nb in ((0, 3), (3, 0), (1, 1), (17, 9), (40, 40)):
            xy = rng.uniform(0, 200, (na + nb, 2))
            boxes = np.concatenate((xy, xy + rng.uniform(0, 100, (na + nb, 2))), 1).astype(dtype)
            boxes[: min(2, na + nb), 2:] = boxes[: min(2, na + nb), :2]  # zero-area boxes too
            a, b = boxes[:na], boxes[na:]
            ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
            ours = box_iou(a, b)
            assert ours.dtype == ref.dtype and ours.shape == (na, nb)
            np.testing.assert_array_equal(ours, ref)
