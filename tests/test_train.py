"""Training end to end on tiny synthetic scenes: outputs, resume after SIGKILL, NaN guard,
DDP with torchrun (2 CPU processes, gloo), and the bad-input messages."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kapao import weights as weights_lib
from kapao.cli.main import main
from kapao.data.synthetic import synthesize
from kapao.engine.trainer import TrainOptions, load_training_checkpoint, train
from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel
from kapao.schema import KeypointSchema, crowdpose_schema

SMALL = dict(cfg="kapao-n", imgsz=128, batch_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return synthesize(root, num_images=12, val_images=4, imgsz=128, people=(1, 2), seed=3)


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "results.csv").open()))


def test_train_writes_everything(tiny_data, tmp_path):
    run, history = train(TrainOptions(data=str(tiny_data), epochs=2, project=str(tmp_path), **SMALL))
    assert [h.epoch for h in history] == [0, 1]
    for name in ("results.csv", "results.png", "train_batch.jpg", "options.json", "weights/last.pt",
                 "weights/last.safetensors", "weights/best.safetensors"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["0", "1"] and "val/AP" in rows[0]
    assert all(float(r["train/box"]) > 0 for r in rows)
    model, meta = weights_lib.load(run / "weights" / "last.safetensors")
    assert meta.info["epoch"] == 1 and meta.info["recipe"]["cfg"] == "kapao-n"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 128, 128)).shape[-1] == 5 + 18 + 34
    ckpt = load_training_checkpoint(run / "weights" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["ema"]["updates"] > 0


def test_bf16_training_matches_fp32_loss_and_runs(tiny_data, tmp_path):
    """--bf16: the loss of one batch under bf16 autocast stays near the fp32 loss (same weights;
    3.0 % apart on this untrained model, where bf16 rounding compounds over ~60 layers), and a bf16
    run trains, validates and writes fp32 weights."""
    from kapao.engine.loss import KapaoLoss
    from kapao.hyp import load_hyp, scale_hyp

    torch.manual_seed(0)
    schema = KeypointSchema.from_yaml(tiny_data)
    model = KapaoModel("kapao-n", schema).train().to(memory_format=torch.channels_last)
    hyp = scale_hyp(load_hyp("hyp.kp-p6"), model.head.nl, model.head.nc, 128)
    loss_fn = KapaoLoss(model, hyp)
    x = torch.rand(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.6] + [0.5, 0.5, 2.0] * 17,
                            [1, 0, 0.3, 0.4, 0.2, 0.3] + [0.3, 0.4, 2.0] * 17])
    loss32 = loss_fn(model(x), targets)[0].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(x)
    assert all(p.dtype == torch.float32 for p in preds)
    loss16 = loss_fn(preds, targets)[0].item()
    assert 0 < abs(loss16 - loss32) / loss32 < 0.05

    run, history = train(TrainOptions(data=str(tiny_data), epochs=1, project=str(tmp_path), bf16=True, **SMALL))
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(history[0].losses)))
    state = load_training_checkpoint(run / "weights" / "last.pt")
    assert state["options"]["bf16"] is True
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_resume_after_sigkill_loses_at_most_one_epoch(tiny_data, tmp_path, capsys):
    epochs = 6
    cmd = [sys.executable, "-m", "kapao", "train", "--data", str(tiny_data), "--cfg", "kapao-n", "--imgsz", "128",
           "--batch-size", "4", "--epochs", str(epochs), "--workers", "0", "--project", str(tmp_path), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "exp"
    deadline = time.time() + 600
    while time.time() < deadline and not (run / "weights" / "last.pt").is_file():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)  # somewhere after the first epoch: mid-epoch, or mid-save
    proc.wait()
    killed_at = load_training_checkpoint(run / "weights" / "last.pt")["epoch"]
    assert killed_at < epochs - 1  # the run was really cut short
    # atomic writes: whatever the kill interrupted, the files under their final names load
    for final in (run / "weights").glob("*.safetensors"):
        weights_lib.load(final)
    rc = main(["train", "--resume", str(run / "weights" / "last.pt"), "--quiet"])
    assert rc == 0
    assert f"from epoch {killed_at + 1} " in capsys.readouterr().out  # only the unfinished epoch is redone
    assert [r["epoch"] for r in _rows(run)] == [str(e) for e in range(epochs)]  # one row per epoch
    assert load_training_checkpoint(run / "weights" / "last.pt")["epoch"] == epochs - 1
    assert not (tmp_path / "exp2").exists()  # resumed in place
    assert not list((run / "weights").glob(".*tmp*"))  # temp files a kill left behind are cleaned up


def test_nan_loss_stops_cleanly(tiny_data, tmp_path, capsys):
    model = KapaoModel("kapao-n", KeypointSchema.from_yaml(tiny_data))
    with torch.no_grad():
        model.head.m[0].bias.fill_(float("nan"))
    weights_lib.save(model, tmp_path / "nan.safetensors", half=False)
    rc = main(["train", "--data", str(tiny_data), "--cfg", "kapao-n", "--imgsz", "128", "--batch-size", "4",
               "--epochs", "1", "--workers", "0", "--weights", str(tmp_path / "nan.safetensors"),
               "--project", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "loss became nan" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "exp" / "weights" / "last.pt").exists()


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_inputs_fail_before_the_first_step(tiny_data, tmp_path, capsys):
    good = yaml.safe_load(tiny_data.read_text())
    cases = {
        "missing_split": (_write_yaml(tmp_path / "a.yaml", {k: v for k, v in good.items() if k != "train_annotations"}), [], "train_annotations"),
        "nothing_there": (_write_yaml(tmp_path / "b.yaml", good | {"train_annotations": "nope.json"}), [], "not found"),
        "batch_too_big": (tiny_data, ["--batch-size", "64"], "larger than the 12 training images"),
        "other_k": (tiny_data, ["--weights", str(tmp_path / "cp.safetensors")], "14 keypoints"),
    }
    weights_lib.save(KapaoModel("kapao-n", crowdpose_schema()), tmp_path / "cp.safetensors")
    for name, (data, extra, message) in cases.items():
        rc = main(["train", "--data", str(data), "--cfg", "kapao-n", "--imgsz", "128", "--batch-size", "4", "--epochs", "1",
                   "--workers", "0", "--project", str(tmp_path / name), "--quiet", *extra])
        err = capsys.readouterr().err
        assert rc == 1, name
        assert message in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
    with pytest.raises(KapaoError, match="--imgsz 100"):
        train(TrainOptions(data=str(tiny_data), epochs=1, project=str(tmp_path), **(SMALL | {"imgsz": 100})))


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_data, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "kapao", "train", "--data", str(tiny_data), "--cfg", "kapao-n", "--imgsz", "128", "--batch-size", "4",
           "--epochs", "1", "--workers", "0", "--project", str(tmp_path), "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "exp"
    ddp = json.loads((run / "ddp.json").read_text())
    assert ddp == {"world_size": 2, "ranks_agree_after_first_step": True, "ranks_agree_at_end": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # one run folder, made by rank 0
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.safetensors", "last.pt", "last.safetensors"]
    assert [r["epoch"] for r in _rows(run)] == ["0"]
