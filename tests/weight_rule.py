"""The goldens' deterministic weight rule (shared/golden/README.md section 2), keyed by official names."""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import torch

_DETECT_BIAS = re.compile(r"model\.\d+\.m\.\d+\.bias")


def rule_weight(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray | None:
    """float32 array for official state-dict `key`, or None for tensors the model builds itself."""
    if key.endswith(("num_batches_tracked", ".anchors", ".anchor_grid")):
        return None
    shape = tuple(int(s) for s in shape)
    z = np.random.default_rng(zlib.crc32(key.encode("utf-8")) + int(seed)).standard_normal(size=shape)
    if len(shape) == 4:  # conv weights: zero-mean filters scaled by 1/sqrt(fan_in)
        fan_in = shape[1] * shape[2] * shape[3]
        flat = z.reshape(shape[0], fan_in)
        a = (flat - flat.mean(axis=1, keepdims=True)).reshape(shape) * (1.0 / math.sqrt(fan_in))
    elif key.endswith(".running_mean"):
        a = 0.05 * z
    elif key.endswith(".running_var"):
        a = 0.5 + 0.5 * z * z
    elif key.endswith(".weight"):
        a = 1.0 + 0.1 * z
    elif _DETECT_BIAS.fullmatch(key):
        a = 0.5 * z
    elif key.endswith(".bias"):
        a = 1.0 + 0.05 * z
    else:
        raise KeyError(key)
    return a.astype(np.float32)


def apply_weight_rule(model, seed: int = 0, fp16: bool = False) -> None:
    """Overwrite `model`'s state in place with the rule (optionally rounded to fp16)."""
    from kapao.models.kapao import official_key

    head_index = len(model.layers)
    state = model.state_dict()
    new = {}
    for k, v in state.items():
        w = rule_weight(official_key(k, head_index), tuple(v.shape), seed)
        if w is None:
            continue
        t = torch.from_numpy(w)
        new[k] = t.half().float() if fp16 else t
    model.load_state_dict(new, strict=False)


def seeded_kapao_s(seed: int = 0):
    """KAPAO-S (COCO-17) with the goldens' seeded weights, in eval mode: the model the export and
    runtime goldens were made from."""
    from kapao.models.kapao import KapaoModel
    from kapao.schema import coco_schema

    m = KapaoModel("kapao-s", coco_schema())
    apply_weight_rule(m, seed)
    return m.eval()
