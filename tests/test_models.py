"""The model family against the official architecture, weight rule, forward and TTA goldens."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from kapao.config import load_model_config
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel, from_official_state_dict, official_key, to_official_state_dict
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema

from float_noise import assert_close_to_golden
from weight_rule import apply_weight_rule

SCHEMAS = {"coco": coco_schema, "crowdpose": crowdpose_schema}


@pytest.fixture(scope="module")
def architecture(golden):
    return json.loads((golden / "architecture.json").read_text())


@pytest.mark.parametrize("size", ["s", "m", "l"])
@pytest.mark.parametrize("dataset", ["coco", "crowdpose"])
def test_architecture_matches_official(architecture, size, dataset):
    ref = architecture[f"kapao_{size}_{dataset}"]
    model = KapaoModel(f"kapao-{size}", SCHEMAS[dataset]())
    state = to_official_state_dict(model)
    expected = {key: (shape, dtype) for key, shape, dtype in ref["state_dict"]}
    assert len(state) == ref["n_state_dict_keys"]
    assert set(state) == set(expected)
    for key, tensor in state.items():
        shape, dtype = expected[key]
        assert list(tensor.shape) == shape, key
        assert str(tensor.dtype).replace("torch.", "") == dtype, key
    assert sum(p.numel() for p in model.parameters()) == ref["n_parameters"]
    assert model.stride.tolist() == ref["strides"]
    assert model.head.anchors.tolist() == ref["anchors_grid_units"]
    assert model.head.anchor_grid.view(4, 3, 2).tolist() == ref["anchor_grid_pixels"]
    assert model.head.no == ref["detect"]["no"]


def test_kapao_n_is_cpu_sized_and_any_k_works():
    schema = KeypointSchema(names=("a", "b", "c"), flip_index=(0, 2, 1))
    model = KapaoModel("kapao-n", schema).eval()
    assert model.head.no == 5 + 4 + 6
    assert model.layers[0].conv.conv.out_channels == 16  # 64 * 0.25
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 192))
    rows = 3 * sum((128 // s) * (192 // s) for s in (8, 16, 32, 64))
    assert out.shape == (1, rows, 15)


def test_weight_rule_matches_checksums(golden):
    checks = json.loads((golden / "weights_checksums.json").read_text())
    assert checks["global_seed"] == 0
    for name, ref in checks["weights"].items():
        _, size, dataset = name.split("_")
        model = KapaoModel(f"kapao-{size}", SCHEMAS[dataset]())
        apply_weight_rule(model, seed=0)
        state = to_official_state_dict(model)
        for key, want in ref.items():
            t = state[key]
            arr = t.numpy() if not t.is_floating_point() else t.float().numpy()
            assert hashlib.md5(arr.tobytes()).hexdigest() == want["md5"], (name, key)


@pytest.fixture(scope="module")
def seeded_s(golden):
    model = KapaoModel("kapao-s", coco_schema())
    apply_weight_rule(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def forward_golden(golden):
    return dict(np.load(golden / "forward_s640.npz"))


@pytest.fixture(scope="module")
def seeded_s64(seeded_s):
    """The same model in float64: its outputs are the reference for this CPU's float32 noise."""
    import copy

    return copy.deepcopy(seeded_s).double()


def assert_predictions_close(ours: np.ndarray, ours64: np.ndarray, ref: np.ndarray, nc: int = 18,
                             coord_atol: float = 2e-3) -> None:
    """README tolerances (probabilities atol 1e-5; pixel coordinates rtol 1e-5, atol 2e-3), plus
    twice the float32 noise measured here (`float_noise`)."""
    assert ours.shape == ref.shape == ours64.shape
    assert_close_to_golden(ours, ours64, ref, slice(4, 5 + nc), rtol=0, atol=1e-5)
    assert_close_to_golden(ours, ours64, ref, np.r_[0:4, 5 + nc : ref.shape[-1]], rtol=1e-5, atol=coord_atol)


def test_forward_matches_official(seeded_s, seeded_s64, forward_golden):
    x = torch.from_numpy(forward_golden["input"])
    assert torch.equal(
        x, torch.from_numpy(forward_golden["input_uint8_chw_rgb"]).float().div(255.0)[None]
    )
    with torch.no_grad():
        raw, out = seeded_s.forward_raw(x), seeded_s(x)
        raw64, out64 = seeded_s64.forward_raw(x.double()), seeded_s64(x.double())
    for level in (2, 3):
        assert_close_to_golden(raw[level].numpy(), raw64[level].numpy(), forward_golden[f"logits_level{level}"],
                               None, rtol=0, atol=1e-5)
    assert_predictions_close(out.numpy(), out64.numpy(), forward_golden["output"])


def test_tta_matches_official(seeded_s, seeded_s64, forward_golden):
    x = torch.from_numpy(forward_golden["input"])
    with torch.no_grad():
        out = seeded_s(x, augment=True, scales=[0.8, 1, 1.2], flips=[None, 3, None])
        out64 = seeded_s64(x.double(), augment=True, scales=[0.8, 1, 1.2], flips=[None, 3, None])
        single = seeded_s(x, augment=True, scales=[1], flips=[None])
    assert_predictions_close(out.numpy(), out64.numpy(), forward_golden["output_tta"])
    assert torch.equal(single, seeded_s(x))


def test_fused_model_close_to_unfused(seeded_s, forward_golden):
    import copy

    fused = copy.deepcopy(seeded_s).fuse()
    x = torch.from_numpy(forward_golden["input"])
    with torch.no_grad():
        out = fused(x).numpy()
    ref = forward_golden["output"]
    # the README's measured fused-vs-unfused bounds: 0.0127 px, 3.8e-6 probability
    assert np.abs(out[..., 4:23] - ref[..., 4:23]).max() < 1e-5
    assert np.abs(out[..., :4] - ref[..., :4]).max() < 0.05


def test_head_stays_fp32_under_bf16_autocast(seeded_s, forward_golden):
    """Mixed precision (training --bf16) runs the backbone in bf16 but the 1x1 output convs in
    fp32: the logits come out fp32 and equal the fp32 head applied to the bf16 features."""
    x = torch.from_numpy(forward_golden["input"])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = seeded_s.features(x)
            raw = seeded_s.head(feats)
        assert all(f.dtype == torch.bfloat16 for f in feats)
        assert all(r.dtype == torch.float32 for r in raw)
        ref = seeded_s.head([f.float() for f in feats])
        exact = seeded_s.forward_raw(x)
    for r, e in zip(raw, ref):
        assert torch.equal(r, e)
    # bf16 backbone logits stay near the fp32 ones (a sanity bound, not a golden)
    assert max((r - e).abs().max().item() for r, e in zip(raw, exact)) < 1.0


def test_updown_flip_leaves_keypoints(seeded_s, forward_golden):
    x = torch.from_numpy(forward_golden["input"])
    with torch.no_grad():
        plain = seeded_s(x)
        ud = seeded_s(x, augment=True, scales=[1], flips=[2])
        direct = seeded_s.head.decode(seeded_s.forward_raw(x.flip(2)))
    assert torch.allclose(ud[..., 1], x.shape[2] - direct[..., 1])
    assert torch.equal(ud[..., 23:], direct[..., 23:])
    assert plain.shape == ud.shape


def test_map_decode_equals_official_decode(seeded_s, seeded_s64, forward_golden):
    """The exported graphs' elementwise decode (`decode_maps`) gives the official decode's rows,
    on the golden input (official output, golden tolerances) and bit-close to our `decode`."""
    x = torch.from_numpy(forward_golden["input"])
    head = seeded_s.head
    with torch.no_grad():
        feats = seeded_s.features(x)
        maps = head.output_maps(feats)
        ours = head.decode_maps(maps, head.map_decode_coefficients())
        ref = head.decode(head(feats))
        head64 = seeded_s64.head
        ours64 = head64.decode_maps(head64.output_maps(seeded_s64.features(x.double())), head64.map_decode_coefficients())
    assert_predictions_close(ours.numpy(), ours64.numpy(), forward_golden["output"])
    # only float rounding apart: probabilities equal, coordinates within a few float32 ulps
    assert torch.equal(ours[..., 4:23], ref[..., 4:23])
    coords = torch.cat((ours[..., :4], ours[..., 23:]), -1) - torch.cat((ref[..., :4], ref[..., 23:]), -1)
    assert coords.abs().max().item() < 1e-3


def test_map_decode_other_schema_and_anchors():
    """Any K and anchor count: decode_maps rows equal decode rows (a 5-keypoint, 2-anchor head
    with distinct anchors per level, on a non-square batch-2 input)."""
    from kapao.models.head import KapaoHead

    torch.manual_seed(0)
    k = 5
    anchors = [[10, 13, 16, 30], [30, 61, 62, 45], [116, 90, 156, 198]]
    head = KapaoHead(1 + k, 2 * k, anchors, [8, 16, 32]).eval()
    head.set_strides(torch.tensor([8.0, 16.0, 32.0]))
    feats = [torch.randn(2, c, 64 // s, 32 // s) * 3 for c, s in ((8, 8), (16, 16), (32, 32))]
    with torch.no_grad():
        ours = head.decode_maps(head.output_maps(feats), head.map_decode_coefficients())
        ref = head.decode(head(feats))
    assert ours.shape == ref.shape == (2, 2 * (8 * 4 + 4 * 2 + 2 * 1), 5 + 6 + 10)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("k,s", [(3, 1), (1, 1), (3, 2)])
@pytest.mark.parametrize("fused", [False, True])
def test_focus_as_strided_conv(k, s, fused):
    """Focus (space-to-depth + conv) equals its one-conv form (kernel 2k, stride 2s), BN kept or
    folded; and a whole model with it converted gives the same predictions."""
    from kapao.models.layers import Focus

    torch.manual_seed(k + s)
    focus = Focus(3, 16, k, s).eval()
    focus.conv.bn.running_mean.normal_()
    focus.conv.bn.running_var.uniform_(0.5, 2.0)
    if fused:
        focus.conv.fuse()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref, ours = focus(x), focus.as_conv()(x)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=2e-6)


def test_model_focus_as_conv_keeps_predictions(seeded_s, seeded_s64, forward_golden):
    """The exported graphs' form of the model (BN folded, Focus as one conv) against the official
    output, with the README's fused-forward allowance on coordinates (0.0127 px; both changes only
    reorder float sums)."""
    import copy

    model = copy.deepcopy(seeded_s).fuse().focus_as_conv()
    model64 = copy.deepcopy(seeded_s64).fuse().focus_as_conv()
    assert not any(type(m).__name__ == "Focus" for m in model.modules())
    x = torch.from_numpy(forward_golden["input"])
    with torch.no_grad():
        out, out64 = model(x).numpy(), model64(x.double()).numpy()
    assert_predictions_close(out, out64, forward_golden["output"], coord_atol=0.0127)


def test_bad_tta_flip_is_refused(seeded_s):
    with pytest.raises(KapaoError, match="flips"):
        seeded_s(torch.zeros(1, 3, 64, 64), augment=True, scales=[1], flips=[-1])


def test_key_mapping_round_trip():
    model = KapaoModel("kapao-n", coco_schema())
    official = to_official_state_dict(model)
    assert "model.33.anchor_grid" in official and "model.0.conv.conv.weight" in official
    back = from_official_state_dict(official, head_index=33)
    assert list(back) == list(model.state_dict())
    assert official_key("head.m.3.bias", 33) == "model.33.m.3.bias"


def test_model_config_errors(tmp_path):
    with pytest.raises(KapaoError, match="unknown model config"):
        load_model_config("kapao-xxl")
    bad = tmp_path / "bad.yaml"
    bad.write_text("depth_multiple: 1\nwidth_multiple: 1\nanchors: [[1,2]]\nhead_from: [0]\nbackbone: [[-1, 1, Magic, []]]\n")
    with pytest.raises(KapaoError, match="unknown block 'Magic'"):
        load_model_config(bad)
