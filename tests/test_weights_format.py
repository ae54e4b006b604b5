"""kapao's own weights format, `kapao convert`, and bad input through the API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kapao.cli.main import main
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.schema import KeypointSchema, coco_schema, crowdpose_schema
from kapao.weights import load, save


@pytest.fixture(scope="module")
def ckpt_path(golden) -> Path:
    return golden / "e2e" / "kapao_s_coco_seed0.pt"


@pytest.fixture(scope="module")
def official(ckpt_path):
    return load(ckpt_path)


@pytest.fixture(scope="module")
def x640(golden) -> torch.Tensor:
    return torch.from_numpy(np.load(golden / "forward_s640.npz")["input"])


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_official_to_ours(official, ckpt_path, x640, tmp_path, capsys):
    model, meta = official
    out = tmp_path / "kapao_s_coco.safetensors"
    assert main(["convert", str(ckpt_path), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kapao-s" in printed and "K=17" in printed and str(out) in printed and "472 tensors" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing
    assert out.stat().st_size < 26e6  # fp16, like the official file

    model2, meta2 = load(out)
    assert meta2.format == "kapao" and meta2.stored_dtype == "float16,float32"  # fp32 anchors
    assert (
        meta2.config == meta.config
        and meta2.schema.to_dict() == meta.schema.to_dict()
        and meta2.class_names == meta.class_names
    )
    assert meta2.info["converted_from"] == str(ckpt_path) and meta2.info["source_format"] == "official"
    assert meta2.info["epoch"] == -1
    assert_same_state(model, model2)
    x = x640[..., :256, :320]  # a crop keeps the forward cheap; every weight still takes part
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))

    with safe_open(str(out), "pt") as f:  # our names, config and schema in the metadata
        keys = set(f.keys())
        md = f.metadata()
    assert "layers.0.conv.conv.weight" in keys and "head.m.0.weight" in keys and len(keys) == 472
    assert md["format"] == "kapao-weights" and json.loads(md["model_config"])["name"] == "kapao-s"
    assert json.loads(md["schema"])["names"] == list(coco_schema().names)


def test_fp32_convert(official, ckpt_path, tmp_path):
    out = tmp_path / "w32.safetensors"
    assert main(["convert", str(ckpt_path), str(out), "--fp32"]) == 0
    model2, meta2 = load(out)
    assert meta2.stored_dtype == "float32"
    assert_same_state(official[0], model2)


def test_save_any_schema_and_half(tmp_path):
    """A custom keypoint set (K=3) on kapao-n: one file rebuilds it; half rounds floats to fp16."""
    schema = KeypointSchema(names=("a", "b", "c"), flip_index=(0, 2, 1), oks_sigmas=(0.1, 0.2, 0.3))
    torch.manual_seed(0)
    model = KapaoModel("kapao-n", schema)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    f32 = save(model, tmp_path / "n32.safetensors", info={"recipe": "test", "ap": 0.5}, half=False)
    f16 = save(model, tmp_path / "n16.safetensors")
    assert f32.stat().st_mode & 0o777 == 0o644  # shareable like any saved file, not mkstemp's 0600
    m32, meta32 = load(f32)
    m16, _ = load(f16)
    assert meta32.schema.to_dict() == schema.to_dict() and meta32.info == {"recipe": "test", "ap": 0.5}
    assert meta32.class_names == ("person", "a", "b", "c")
    assert_same_state(model, m32)
    got = m16.state_dict()
    for k, v in model.state_dict().items():
        want = v.half().float() if v.is_floating_point() and "anchor" not in k else v
        assert torch.equal(got[k], want), k
    with pytest.raises(KapaoError, match=r"n32\.safetensors: the checkpoint has 3 keypoints .* 17"):
        load(f32, schema=coco_schema())


def test_save_refuses_fused_and_bad_info(tmp_path):
    model = KapaoModel("kapao-n", crowdpose_schema())
    with pytest.raises(KapaoError, match="info must be JSON"):
        save(model, tmp_path / "a.safetensors", info={"x": object()})
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(KapaoError, match=r"a_file/c\.safetensors: cannot write here"):
        save(model, blocker / "c.safetensors")
    with pytest.raises(KapaoError, match="fused"):
        save(model.fuse(), tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == [blocker]


def test_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(f))
    with pytest.raises(KapaoError, match=r"other\.safetensors: a safetensors file without kapao metadata"):
        load(f)


# --- bad input: one line naming the file, exit 1, no traceback ----------------------------------


def run_cli(capsys, *argv: str) -> str:
    code = main(["convert", *argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("kapao convert: error: ")
    return err


def test_bad_input_cli(ckpt_path, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    err = run_cli(capsys, str(tmp_path / "missing.pt"), out)
    assert "missing.pt: file not found" in err

    rand = tmp_path / "random.pt"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "random.pt: not a checkpoint" in run_cli(capsys, str(rand), out)

    text = tmp_path / "notes.txt"
    text.write_text("this is a text file\n")
    assert "notes.txt: not a checkpoint" in run_cli(capsys, str(text), out)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty.pt: empty file" in run_cli(capsys, str(empty), out)

    data = ckpt_path.read_bytes()
    for n, cut in (("half", len(data) // 2), ("tail", len(data) - 100), ("head", 100)):
        trunc = tmp_path / f"trunc_{n}.pt"
        trunc.write_bytes(data[:cut])
        assert f"trunc_{n}.pt: truncated or corrupt" in run_cli(capsys, str(trunc), out)

    err = run_cli(capsys, str(ckpt_path), out, "--data", "crowdpose")
    assert "kapao_s_coco_seed0.pt: the checkpoint has 17 keypoints" in err and "14" in err

    err = run_cli(capsys, "kapao_xl_coco", out)
    assert "kapao_xl_coco: unknown weights name" in err and "kapao_s_coco, kapao_m_coco" in err

    err = run_cli(capsys, str(ckpt_path), out, "--sha256", "0" * 64)
    assert "sha256 mismatch" in err and str(ckpt_path) in err
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_safetensors(official, tmp_path, capsys):
    good = save(official[0], tmp_path / "good.safetensors")
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(KapaoError, match=r"bad\.safetensors: truncated or corrupt"):
        load(bad)
    assert "bad.safetensors: truncated or corrupt" in run_cli(capsys, str(bad), str(tmp_path / "o"))


def test_bad_device(ckpt_path):
    with pytest.raises(KapaoError, match="not a torch device"):
        load(ckpt_path, device="gpu7")
