"""Official-format checkpoints: the real golden file, and the variants released files may have."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kapao.config import load_model_config
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel, to_official_state_dict
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema
from kapao.weights import load
from kapao.weights.official import config_from_official_yaml, read_official, resolve_schema

from weight_rule import apply_weight_rule, rule_weight


@pytest.fixture(scope="module")
def ckpt_path(golden) -> Path:
    return golden / "e2e" / "kapao_s_coco_seed0.pt"


@pytest.fixture(scope="module")
def ckpt_json(golden) -> dict:
    return json.loads((golden / "e2e" / "checkpoint.json").read_text())


@pytest.fixture(scope="module")
def loaded(ckpt_path):
    return load(ckpt_path)


def md5(t: torch.Tensor) -> str:
    return hashlib.md5(t.contiguous().numpy().tobytes()).hexdigest()


def test_golden_checkpoint_tensors(loaded, ckpt_json):
    model, _ = loaded
    state = to_official_state_dict(model)
    ref = ckpt_json["state_dict"]
    assert len(state) == len(ref) == 472
    assert set(state) == set(ref)
    for key, t in state.items():
        # md5_float32 is of `.float()` bytes for every key (num_batches_tracked included)
        assert md5(t.float()) == ref[key]["md5_float32"], key
        if not t.is_floating_point():
            assert t.dtype == torch.int64 and md5(t) == ref[key]["md5_stored"], key
        else:
            assert t.dtype == torch.float32, key
    assert sum(p.numel() for p in model.parameters()) == ckpt_json["flags"]["n_params"] == 12_559_980


def test_golden_checkpoint_equals_rule_rounded_to_fp16(loaded):
    model, _ = loaded
    n = 0
    for key, t in to_official_state_dict(model).items():
        w = rule_weight(key, tuple(t.shape), 0)
        if w is None:
            continue
        assert torch.equal(t, torch.from_numpy(w).half().float()), key
        n += 1
    assert n == 472 - 77 - 2  # all but num_batches_tracked, anchors, anchor_grid


def test_golden_checkpoint_attributes(loaded, ckpt_path, ckpt_json):
    model, meta = loaded
    attrs = ckpt_json["model_attributes"]
    assert meta.format == "official" and meta.source == ckpt_path and meta.registry is None
    assert meta.stored_dtype == "float16"
    assert meta.class_names == tuple(attrs["names"]) and len(meta.class_names) == 18
    assert meta.schema == coco_schema()
    assert meta.config == load_model_config("kapao-s")
    assert model.head.nc == 18 and model.head.num_coords == 34 and model.head.no == 57
    assert model.stride.tolist() == [8.0, 16.0, 32.0, 64.0]
    assert meta.info["epoch"] == -1 and meta.info["best_fitness"] == [0.0] and meta.info["used"] == "model"
    assert meta.info["yaml_file"] == "yolov5s6.yaml"
    assert meta.info["hyp"]["box"] == pytest.approx(0.0375)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


def test_read_official_raw(ckpt_path, ckpt_json):
    ckpt = read_official(ckpt_path)
    assert ckpt.nc == 18 and ckpt.num_coords == 34 and ckpt.head_index == 33
    assert ckpt.stride == (8.0, 16.0, 32.0, 64.0)
    assert ckpt.yaml == ckpt_json["model_attributes"]["yaml"]
    for key, t in ckpt.state_dict.items():  # stored bytes untouched (fp16 / int64)
        assert md5(t) == ckpt_json["state_dict"][key]["md5_stored"], key


def test_golden_checkpoint_forward(loaded, golden):
    model, _ = loaded
    x = torch.from_numpy(np.load(golden / "forward_s640.npz")["input"])
    ref = KapaoModel("kapao-s", coco_schema())
    apply_weight_rule(ref, seed=0, fp16=True)
    ref.eval()
    with torch.no_grad():
        out = model(x)
        want = ref(x)
    assert out.shape == (1, 17850, 57)
    assert torch.isfinite(out).all()
    assert torch.equal(out, want)  # same weights, same code path: bit-identical


def test_official_yaml_converts_to_kapao_s(ckpt_json):
    y = ckpt_json["model_attributes"]["yaml"]
    cfg = config_from_official_yaml(y, "test.yaml")
    assert cfg == load_model_config("kapao-s")
    # a yaml that matches no shipped config keeps its layers under the given name
    y2 = {**y, "width_multiple": 0.375}
    cfg2 = config_from_official_yaml(y2, "test.yaml", name="official-x")
    assert cfg2.name == "official-x" and cfg2.width_multiple == 0.375 and cfg2.layers == cfg.layers
    # an anchor count instead of sizes: sizes come from the checkpoint's anchor_grid
    anchors = [list(a) for a in cfg.anchors]
    assert config_from_official_yaml({**y, "anchors": 3}, "t", anchors).anchors == cfg.anchors
    with pytest.raises(KapaoError, match="anchor"):
        config_from_official_yaml({**y, "anchors": 3}, "t")


@pytest.mark.parametrize("size", ["m", "l"])
def test_official_yaml_for_m_and_l(ckpt_json, size):
    """The yolov5{m,l}6 yamls differ from s6 only in the multiples; they map to kapao-m/l."""
    mult = {"m": (0.67, 0.75), "l": (1.0, 1.0)}[size]
    y = {**ckpt_json["model_attributes"]["yaml"], "depth_multiple": mult[0], "width_multiple": mult[1]}
    assert config_from_official_yaml(y, "t") == load_model_config(f"kapao-{size}")


def test_official_yaml_unsupported_block(ckpt_json):
    y = json.loads(json.dumps(ckpt_json["model_attributes"]["yaml"]))
    y["backbone"][10] = [-1, 1, "SPPF", [1024, 5]]
    with pytest.raises(KapaoError, match=r"t\.yaml: .*layer 10 uses 'SPPF'"):
        config_from_official_yaml(y, "t.yaml")
    y["backbone"][10] = [-1, 1, "SPP", [1024, [3, 5, 7]]]
    y["head"][1] = [-1, 1, "nn.Upsample", [None, 2, "bilinear"]]
    with pytest.raises(KapaoError, match="Upsample"):
        config_from_official_yaml(y, "t.yaml")


def test_schema_from_names_and_mismatch():
    coco_names = ("person", *coco_schema().names)
    cp_names = ("person", *crowdpose_schema().names)
    assert resolve_schema(17, coco_names, None, "f.pt") == coco_schema()
    assert resolve_schema(14, cp_names, None, "f.pt") == crowdpose_schema()
    with pytest.raises(KapaoError, match=r"f\.pt: .*neither COCO nor CrowdPose.*--data"):
        resolve_schema(3, ("person", "a", "b", "c"), None, "f.pt")
    custom = KeypointSchema(names=("a", "b", "c"), flip_index=(0, 2, 1))
    assert resolve_schema(3, ("person", "a", "b", "c"), custom, "f.pt") is custom
    with pytest.raises(KapaoError, match="has 17 keypoints but the schema .* has 14"):
        resolve_schema(17, coco_names, crowdpose_schema(), "f.pt")


def test_other_keypoint_count_than_asked(ckpt_path):
    with pytest.raises(KapaoError, match=r"kapao_s_coco_seed0\.pt: the checkpoint has 17 keypoints .* 14"):
        load(ckpt_path, schema=crowdpose_schema())


def _rewrite_archive(src: Path, dst: Path, prefix: str, drop_extra: bool, pkl_edit=None) -> None:
    """Copy a torch archive under another folder name, optionally as torch 1.x wrote it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            rest = name.split("/", 1)[1]
            if drop_extra and rest in (".data/serialization_id", ".format_version", ".storage_alignment", "byteorder"):
                continue
            data = zin.read(name)
            if rest == "data.pkl" and pkl_edit is not None:
                data = pkl_edit(data)
            zout.writestr(f"{prefix}/{rest}", data)


def _released_style(pkl: bytes) -> bytes:
    """Edits of data.pkl as a torch 1.x + numpy 1.x + GPU training run would have written it."""
    assert pkl.count(b"cnumpy._core.multiarray\n_reconstruct\n") == 1
    pkl = pkl.replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    cpu = b"X\x03\x00\x00\x00cpu"  # BINUNICODE 'cpu', memoized after its first use
    assert pkl.count(cpu) == 1
    return pkl.replace(cpu, b"X\x06\x00\x00\x00cuda:0")


def test_released_checkpoint_variants(ckpt_path, loaded, tmp_path):
    """torch 1.x archive layout, other folder name, cuda storages, numpy 1.x paths (README 1.5)."""
    dst = tmp_path / "kapao_s_coco.pt"
    _rewrite_archive(ckpt_path, dst, "kapao_s_coco", drop_extra=True, pkl_edit=_released_style)
    model, meta = load(dst)
    ref_model, _ = loaded
    for (k, a), (k2, b) in zip(model.state_dict().items(), ref_model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert meta.info["best_fitness"] == [0.0]
    assert meta.config.name == "kapao-s"


def test_yaml_that_does_not_fit_the_tensors(ckpt_path, tmp_path):
    """The config comes from the pickled yaml; tensors of another width are a clear error."""
    key = b"X\x0e\x00\x00\x00width_multiple"  # BINUNICODE key, then a memo put, then BINFLOAT 0.5
    old, new = b"G" + struct.pack(">d", 0.5), b"G" + struct.pack(">d", 0.75)

    def edit(pkl: bytes) -> bytes:
        i = pkl.index(key) + len(key)
        j = pkl.index(old, i)
        assert j - i <= 5  # only the memo put in between
        return pkl[:j] + new + pkl[j + len(old) :]

    dst = tmp_path / "wide.pt"
    _rewrite_archive(ckpt_path, dst, "wide", drop_extra=False, pkl_edit=edit)
    assert read_official(dst).yaml["width_multiple"] == 0.75
    with pytest.raises(KapaoError, match=r"wide\.pt: tensor layers\.0\.conv\.conv\.weight has shape \(32, 12, 3, 3\)"):
        load(dst)


def test_damaged_archives(ckpt_path, tmp_path):
    """A missing storage record, a flipped byte (zip CRC) and a broken pickle: one-line errors."""
    missing = tmp_path / "missing_record.pt"
    with zipfile.ZipFile(ckpt_path) as zin, zipfile.ZipFile(missing, "w") as zout:
        for name in zin.namelist():
            if name != "last/data/7":
                zout.writestr(name, zin.read(name))
    with pytest.raises(KapaoError, match=r"missing_record\.pt: not a readable checkpoint .*record '7' is missing"):
        load(missing)

    data = bytearray(ckpt_path.read_bytes())
    with zipfile.ZipFile(ckpt_path) as z:
        info = z.getinfo("last/data/0")
    off = info.header_offset  # local header: 30 bytes, then name and extra (torch pads the extra)
    start = (
        off
        + 30
        + int.from_bytes(data[off + 26 : off + 28], "little")
        + int.from_bytes(data[off + 28 : off + 30], "little")
    )
    data[start + 5] ^= 0xFF  # a byte of the stored tensor data
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(KapaoError, match=r"flipped\.pt: truncated or corrupt checkpoint .*CRC"):
        load(flipped)

    broken = tmp_path / "broken_pickle.pt"
    _rewrite_archive(ckpt_path, broken, "last", drop_extra=False, pkl_edit=lambda pkl: pkl[: len(pkl) // 2])
    with pytest.raises(KapaoError, match=r"broken_pickle\.pt: not a readable checkpoint"):
        load(broken)
