"""Optimizer and learning-rate schedule of the official recipe: three parameter groups (no weight
decay on BatchNorm weights and on biases), SGD with Nesterov momentum or Adam, one-cycle or
linear LR, and a warm-up that ramps LR, momentum and gradient accumulation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH = 64  # the official recipe's batch size; smaller batches accumulate gradients


def accumulation_steps(batch_size: int, nominal: int = NOMINAL_BATCH) -> int:
    return max(round(nominal / batch_size), 1)


def build_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float, adam: bool = False
) -> torch.optim.Optimizer:
    """Groups, in this order: 0 = BatchNorm weights (no decay), 1 = conv weights (decay), 2 = biases (no decay)."""
    bn_weights, weights, biases = [], [], []
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            biases.append(bias)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            bn_weights.append(module.weight)
        elif isinstance(weight, nn.Parameter):
            weights.append(weight)
    if adam:
        opt: torch.optim.Optimizer = torch.optim.Adam(bn_weights, lr=lr, betas=(momentum, 0.999))
    else:
        opt = torch.optim.SGD(bn_weights, lr=lr, momentum=momentum, nesterov=True)
    opt.add_param_group({"params": weights, "weight_decay": weight_decay})
    opt.add_param_group({"params": biases})
    return opt


def lr_lambda(epochs: int, lrf: float, linear: bool = False) -> Callable[[int], float]:
    """Multiplier of lr0 per epoch: cosine one-cycle from 1 to lrf, or linear."""
    if linear:
        return lambda e: (1 - e / max(epochs - 1, 1)) * (1.0 - lrf) + lrf
    return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1.0) + 1.0


def warmup(
    optimizer: torch.optim.Optimizer,
    iteration: int,
    warmup_iters: int,
    epoch_factor: float,
    momentum: float,
    warmup_momentum: float,
    warmup_bias_lr: float,
) -> None:
    """Ramp during the first `warmup_iters` iterations: bias LR falls from warmup_bias_lr, the other
    groups rise from 0, to initial_lr * epoch_factor; momentum rises from warmup_momentum."""
    xp = [0, warmup_iters]
    for j, group in enumerate(optimizer.param_groups):
        start = warmup_bias_lr if j == 2 else 0.0
        group["lr"] = float(np.interp(iteration, xp, [start, group["initial_lr"] * epoch_factor]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(iteration, xp, [warmup_momentum, momentum]))
        elif "betas" in group:
            group["betas"] = (float(np.interp(iteration, xp, [warmup_momentum, momentum])), group["betas"][1])


def warmup_accumulation(iteration: int, warmup_iters: int, batch_size: int, nominal: int = NOMINAL_BATCH) -> int:
    """Gradient-accumulation steps during warm-up (from 1 up to nominal / batch_size)."""
    return max(1, int(np.interp(iteration, [0, warmup_iters], [1, nominal / batch_size]).round()))
