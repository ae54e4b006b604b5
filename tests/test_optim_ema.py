from __future__ import annotations

import math

import pytest
import torch

from kapao.engine.ema import ModelEMA
from kapao.engine.optim import accumulation_steps, build_optimizer, lr_lambda, warmup, warmup_accumulation
from kapao.models.kapao import KapaoModel
from kapao.schema import coco_schema


@pytest.fixture(scope="module")
def model():
    return KapaoModel("kapao-n", coco_schema())


def test_three_groups_cover_every_parameter_once(model):
    opt = build_optimizer(model, lr=0.01, momentum=0.937, weight_decay=5e-4)
    groups = [g["params"] for g in opt.param_groups]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() == 1 for p in groups[0]) and all(p.dim() == 4 for p in groups[1])
    assert [g["weight_decay"] for g in opt.param_groups] == [0, 5e-4, 0]
    assert opt.param_groups[0]["nesterov"] is True
    adam = build_optimizer(model, lr=0.001, momentum=0.9, weight_decay=0, adam=True)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.9, 0.999)


def test_schedules():
    f = lr_lambda(100, 0.2)
    assert f(0) == pytest.approx(1.0) and f(100) == pytest.approx(0.2) and f(50) == pytest.approx(0.6)
    lin = lr_lambda(11, 0.1, linear=True)
    assert lin(0) == 1.0 and lin(10) == pytest.approx(0.1)
    assert accumulation_steps(16) == 4 and accumulation_steps(128) == 1
    assert warmup_accumulation(0, 100, 16) == 1 and warmup_accumulation(100, 100, 16) == 4


def test_warmup_ramps(model):
    opt = build_optimizer(model, lr=0.01, momentum=0.937, weight_decay=5e-4)
    for g in opt.param_groups:
        g["initial_lr"] = 0.01
    warmup(opt, 0, 100, 1.0, 0.937, 0.8, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.1]
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8)
    warmup(opt, 100, 100, 1.0, 0.937, 0.8, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01] * 3)


def test_ema_follows_and_round_trips(model):
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = next(ema.ema.parameters()).clone()
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1))
    after = next(ema.ema.parameters())
    assert torch.allclose(after, before * d + (before + 1) * (1 - d), atol=1e-6)
    state = ema.state_dict()
    other = ModelEMA(model)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(next(other.ema.parameters()), after)
