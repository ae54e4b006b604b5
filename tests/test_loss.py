"""KAPAO loss against the official golden (loss.npz / loss.json), a loop reference, and the hyp files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from kapao.engine.loss import HeadParams, KapaoLoss, ciou
from kapao.errors import KapaoError
from kapao.hyp import Hyp, load_hyp, scale_hyp
from kapao.models.kapao import KapaoModel
from kapao.schema import coco_schema

FIELDS = ("b", "a", "gj", "gi", "tcls", "tbox", "tkps", "anch")


@pytest.fixture(scope="module")
def loss_golden(golden):
    npz = np.load(golden / "loss.npz")
    return {k: npz[k] for k in npz.files}, json.loads((golden / "loss.json").read_text())


def _golden_loss(meta) -> KapaoLoss:
    hyp = scale_hyp(load_hyp("hyp.kp-p6"), num_levels=4, num_classes=18, imgsz=640)
    return KapaoLoss(HeadParams(torch.tensor(meta["anchors_grid_units"]), 18, 17), hyp)


def _preds(arrays, device="cpu"):
    return [torch.from_numpy(arrays[f"p{i}"]).to(device) for i in range(4)]


# ------------------------------------------------------------------------------------------------
# Hyperparameters


def test_hyp_files_and_scaling_match_official(loss_golden):
    _, meta = loss_golden
    raw = load_hyp("hyp.kp-p6")
    assert {k: v for k, v in raw.to_dict().items() if k != "label_smoothing"} == meta["hyp_raw"]
    scaled = scale_hyp(raw, num_levels=4, num_classes=18, imgsz=640)
    assert scaled.to_dict() == meta["hyp_scaled"]  # exact floats, e.g. obj 0.5249999999999999
    p5 = load_hyp("hyp.kp")
    assert (p5.cls, p5.obj, p5.kp, p5.translate, p5.scale) == (0.5, 1.0, 0.05, 0.2, 0.8)
    s3 = scale_hyp(p5, num_levels=3, num_classes=15, imgsz=1280)
    assert s3.box == 0.05 and s3.kp == 0.05 and s3.obj == 4.0 and s3.cls == 0.5 * (15 / 80.0)


def test_hyp_errors(tmp_path):
    good = load_hyp("hyp.kp-p6").to_dict()
    with pytest.raises(KapaoError, match=r"unknown hyp key\(s\) \['lr'\]"):
        Hyp.from_dict({**good, "lr": 0.1}, source="h.yaml")
    missing = dict(good)
    del missing["anchor_t"]
    with pytest.raises(KapaoError, match=r"h\.yaml: missing hyp key\(s\) \['anchor_t'\]"):
        Hyp.from_dict(missing, source="h.yaml")
    with pytest.raises(KapaoError, match="'fliplr' is 1.5; expected a value in"):
        Hyp.from_dict({**good, "fliplr": 1.5})
    with pytest.raises(KapaoError, match="'box' is 'big'; expected a number"):
        Hyp.from_dict({**good, "box": "big"})
    with pytest.raises(KapaoError, match="'anchor_t'"):
        Hyp.from_dict({**good, "anchor_t": 0.5})
    with pytest.raises(KapaoError, match="hyp YAML not found"):
        load_hyp(tmp_path / "none.yaml")
    p = tmp_path / "h.yaml"
    p.write_text("lr0: [oops\n")
    with pytest.raises(KapaoError, match="not valid YAML"):
        load_hyp(p)
    assert load_hyp("kp-p6") == load_hyp("hyp.kp-p6.yaml")


# ------------------------------------------------------------------------------------------------
# The official golden


def test_build_targets_matches_official(loss_golden):
    arrays, meta = loss_golden
    loss = _golden_loss(meta)
    levels = loss.build_targets(_preds(arrays), torch.from_numpy(arrays["targets"]))
    assert [len(lt) for lt in levels] == meta["matches_per_level"] == [2020, 771, 96, 3]
    for i, lt in enumerate(levels):
        for f in FIELDS:
            ours, ref = getattr(lt, f).numpy(), arrays[f"bt{i}_{f}"]
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, (i, f)
            np.testing.assert_array_equal(ours, ref, err_msg=f"level {i} {f}")
        cells = torch.stack((lt.b, lt.a, lt.gj, lt.gi), 1).unique(dim=0)
        assert len(cells) == meta["per_level_n_unique_cells"][i]
        assert int((lt.tkps[..., 2] > 0).sum()) == meta["visible_kp_matches_per_level"][i]


def test_loss_matches_official(loss_golden):
    arrays, meta = loss_golden
    out = _golden_loss(meta).compute(_preds(arrays), torch.from_numpy(arrays["targets"]))
    for i in range(4):
        np.testing.assert_array_equal(out.tobj[i].numpy(), arrays[f"tobj{i}"], err_msg=f"tobj{i}")
    np.testing.assert_allclose([x.item() for x in out.obj_bce], meta["per_level_obj_bce_unweighted"], rtol=1e-5)
    np.testing.assert_allclose([x.item() for x in out.cls_bce], meta["per_level_cls_bce_unweighted"], rtol=1e-5)
    np.testing.assert_allclose(out.items.numpy(), meta["loss_items_lbox_lobj_lcls_lkps"], rtol=1e-5)
    np.testing.assert_allclose(out.loss.item(), meta["loss_total_times_bs"], rtol=1e-5)


def test_last_write_wins_is_what_the_golden_needs(loss_golden):
    """Many matches share a cell; the golden keeps the last one's IoU. First-write-wins differs."""
    arrays, meta = loss_golden
    loss = _golden_loss(meta)
    preds = _preds(arrays)
    out = loss.compute(preds, torch.from_numpy(arrays["targets"]))
    lt = out.targets[0]
    ps = preds[0][lt.b, lt.a, lt.gj, lt.gi]
    iou = ciou(torch.cat((ps[:, :2].sigmoid() * 2 - 0.5, (ps[:, 2:4].sigmoid() * 2) ** 2 * lt.anch), 1), lt.tbox)
    first = torch.zeros_like(out.tobj[0])
    for j in reversed(range(len(lt))):  # the first write of a cell survives
        first[lt.b[j], lt.a[j], lt.gj[j], lt.gi[j]] = iou[j].clamp(0)
    assert not torch.equal(first, out.tobj[0])
    np.testing.assert_array_equal(out.tobj[0].numpy(), arrays["tobj0"])


def test_loss_from_model_head(loss_golden):
    """KapaoLoss(model, hyp) reads the anchors from the model's head (grid units)."""
    arrays, meta = loss_golden
    model = KapaoModel("kapao-s", coco_schema())
    hyp = scale_hyp(load_hyp("hyp.kp-p6"), model.head.nl, model.head.nc, 640)
    loss, items = KapaoLoss(model, hyp)(_preds(arrays), torch.from_numpy(arrays["targets"]))
    assert loss.shape == () and items.shape == (4,) and not items.requires_grad
    np.testing.assert_allclose(loss.item(), meta["loss_total_times_bs"], rtol=1e-5)


def test_loss_gradients_flow(loss_golden):
    arrays, meta = loss_golden
    preds = [p.clone().requires_grad_(True) for p in _preds(arrays)]
    loss, _ = _golden_loss(meta)(preds, torch.from_numpy(arrays["targets"]))
    loss.backward()
    for p in preds:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # keypoint columns get gradient only where a visible keypoint was matched
    assert preds[0].grad[..., 23:].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_matches_official_on_cuda(loss_golden):
    arrays, meta = loss_golden
    loss = _golden_loss(meta)
    out = loss.compute(_preds(arrays, "cuda"), torch.from_numpy(arrays["targets"]).cuda())
    for i in range(4):
        np.testing.assert_array_equal(out.tobj[i].cpu().numpy(), arrays[f"tobj{i}"])
    np.testing.assert_allclose(out.items.cpu().numpy(), meta["loss_items_lbox_lobj_lcls_lkps"], rtol=1e-5)
    np.testing.assert_allclose(out.loss.item(), meta["loss_total_times_bs"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Any K, any number of levels: the vectorized assignment equals a plain loop


def _loop_build_targets(anchors, shapes, targets, k, anchor_t, g=0.5):
    """One target, anchor and offset at a time, in the official order (offset, anchor, target)."""
    offs = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)]
    levels = []
    for i, (ny, nx) in enumerate(shapes):
        gain = torch.ones(6 + 3 * k)
        gain[2:6] = torch.tensor([nx, ny, nx, ny], dtype=torch.float32)
        gain[6::3] = float(nx)
        gain[7::3] = float(ny)
        rows = []
        for o, (ox, oy) in enumerate(offs):
            for a in range(anchors.shape[1]):
                for t in targets:
                    ts = t * gain
                    r = ts[4:6] / anchors[i, a]
                    if not torch.max(r, 1 / r).max() < anchor_t:
                        continue
                    x, y = ts[2].item(), ts[3].item()
                    xi, yi = nx - ts[2], ny - ts[3]
                    ok = [True, x % 1 < g and x > 1, y % 1 < g and y > 1,
                          (xi % 1 < g).item() and xi.item() > 1, (yi % 1 < g).item() and yi.item() > 1][o]
                    if not ok:
                        continue
                    gi = min(max(int(ts[2] - ox), 0), nx - 1)
                    gj = min(max(int(ts[3] - oy), 0), ny - 1)
                    kp = ts[6:].view(k, 3).clone()
                    kp[:, 0] -= gi
                    kp[:, 1] -= gj
                    rows.append((int(t[0]), a, gj, gi, int(t[1]), torch.stack([ts[2] - gi, ts[3] - gj, ts[4], ts[5]]), kp))
        levels.append(rows)
    return levels


@pytest.mark.parametrize("k,nl", [(3, 3), (5, 2), (17, 4)])
def test_vectorized_assignment_equals_loop(k, nl):
    gen = torch.Generator().manual_seed(k * 10 + nl)
    bs, na = 2, 3
    shapes = [(16 // 2**i, 20 // 2**i) for i in range(nl)]
    anchors = torch.rand(nl, na, 2, generator=gen) * 4 + 0.5
    nt = 40
    targets = torch.zeros(nt, 6 + 3 * k)
    targets[:, 0] = torch.randint(0, bs, (nt,), generator=gen).float()
    targets[:, 1] = torch.randint(0, 1 + k, (nt,), generator=gen).float()
    targets[:, 2:4] = torch.rand(nt, 2, generator=gen) * 0.98 + 0.01
    targets[:, 4:6] = torch.rand(nt, 2, generator=gen) * 0.4 + 0.02
    kp = torch.rand(nt, k, 3, generator=gen)
    kp[..., 2] = torch.randint(0, 3, (nt, k), generator=gen).float()
    targets[:, 6:] = kp.view(nt, -1)
    hyp = load_hyp("hyp.kp-p6")
    loss = KapaoLoss(HeadParams(anchors, 1 + k, k), hyp)
    preds = [torch.randn(bs, na, h, w, 5 + 1 + k + 2 * k, generator=gen) for h, w in shapes]
    levels = loss.build_targets(preds, targets)
    ref = _loop_build_targets(anchors, shapes, targets, k, hyp.anchor_t)
    for lt, rows in zip(levels, ref):
        assert len(lt) == len(rows) > 0
        assert lt.b.tolist() == [r[0] for r in rows]
        assert lt.a.tolist() == [r[1] for r in rows]
        assert lt.gj.tolist() == [r[2] for r in rows]
        assert lt.gi.tolist() == [r[3] for r in rows]
        assert lt.tcls.tolist() == [r[4] for r in rows]
        torch.testing.assert_close(lt.tbox, torch.stack([r[5] for r in rows]), rtol=0, atol=0)
        torch.testing.assert_close(lt.tkps, torch.stack([r[6] for r in rows]), rtol=0, atol=0)
    out = loss.compute(preds, targets)
    # objectness targets: a plain sequential loop (last write wins) gives the same tensor
    for pi, lt, tobj in zip(preds, out.targets, out.tobj):
        ps = pi[lt.b, lt.a, lt.gj, lt.gi]
        iou = ciou(torch.cat((ps[:, :2].sigmoid() * 2 - 0.5, (ps[:, 2:4].sigmoid() * 2) ** 2 * lt.anch), 1), lt.tbox)
        seq = torch.zeros_like(tobj)
        for j in range(len(lt)):
            seq[lt.b[j], lt.a[j], lt.gj[j], lt.gi[j]] = iou[j].clamp(0)
        torch.testing.assert_close(tobj, seq, rtol=0, atol=0)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert len(loss.balance) == nl and loss.balance[:2] == [4.0, 1.0]
    assert loss.balance == ([4.0, 1.0, 0.4] if nl == 3 else [4.0, 1.0, 0.25, 0.06][:nl])


def test_no_targets_and_bad_shapes():
    k = 2
    loss = KapaoLoss(HeadParams(torch.ones(2, 3, 2), 1 + k, k), load_hyp("hyp.kp-p6"))
    preds = [torch.zeros(1, 3, 4, 4, 5 + 3 + 4), torch.zeros(1, 3, 2, 2, 5 + 3 + 4)]
    total, items = loss(preds, torch.zeros(0, 6 + 3 * k))
    assert items[0] == 0 and items[2] == 0 and items[3] == 0 and items[1] > 0
    np.testing.assert_allclose(total.item(), items.sum().item() * 1, rtol=1e-6)
    with pytest.raises(KapaoError, match=r"targets have shape \(3, 9\), expected \(n, 12\)"):
        loss(preds, torch.zeros(3, 9))
    with pytest.raises(KapaoError, match="got 1 prediction levels, the head has 2"):
        loss(preds[:1], torch.zeros(0, 12))
    with pytest.raises(KapaoError, match="outputs per anchor"):
        loss([torch.zeros(1, 3, 4, 4, 9), torch.zeros(1, 3, 2, 2, 9)], torch.zeros(0, 12))


def test_label_smoothing_and_focal_change_the_class_loss(loss_golden):
    arrays, meta = loss_golden
    base = scale_hyp(load_hyp("hyp.kp-p6"), 4, 18, 640)
    t = torch.from_numpy(arrays["targets"])
    anchors = HeadParams(torch.tensor(meta["anchors_grid_units"]), 18, 17)
    ref = KapaoLoss(anchors, base)(_preds(arrays), t)[1]
    smooth = KapaoLoss(anchors, dataclasses.replace(base, label_smoothing=0.1))(_preds(arrays), t)[1]
    focal = KapaoLoss(anchors, dataclasses.replace(base, fl_gamma=1.5))(_preds(arrays), t)[1]
    assert smooth[2] != ref[2] and torch.equal(smooth[[0, 1, 3]], ref[[0, 1, 3]])
    assert focal[2] < ref[2] and focal[1] < ref[1] and torch.equal(focal[[0, 3]], ref[[0, 3]])


def test_end_to_end_with_a_small_model_and_any_k():
    """Train-mode forward of kapao-n for a 3-keypoint schema, loss, backward into the weights."""
    from kapao.schema import KeypointSchema

    torch.manual_seed(0)
    schema = KeypointSchema(names=("a", "b", "c"), flip_index=(0, 2, 1))
    model = KapaoModel("kapao-n", schema).train()
    hyp = scale_hyp(load_hyp("hyp.kp-p6"), model.head.nl, schema.num_classes, 128)
    loss_fn = KapaoLoss(model, hyp)
    targets = torch.tensor([
        [0, 0, 0.5, 0.5, 0.3, 0.6, 0.45, 0.3, 2, 0.55, 0.3, 2, 0.5, 0.7, 1],
        [0, 1, 0.45, 0.3, 0.05, 0.05, 0.5, 0.5, 0, 0.5, 0.5, 0, 0.5, 0.5, 0],
        [1, 0, 0.2, 0.3, 0.2, 0.4, 0.0, 0.0, 0, 0.25, 0.2, 2, 0.2, 0.4, 2],
    ])
    loss, items = loss_fn(model(torch.rand(2, 3, 128, 128)), targets)
    loss.backward()
    assert torch.isfinite(loss) and (items > 0).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)
