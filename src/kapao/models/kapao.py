"""The KAPAO network: a config-built backbone + neck, the KAPAO head, and test-time augmentation."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kapao.config import ModelConfig, load_model_config
from kapao.errors import KapaoError
from kapao.models.head import KapaoHead
from kapao.models.layers import C3, SPP, Concat, Conv, Focus, Upsample
from kapao.schema import KeypointSchema

TTA_PAD_VALUE = 0.447  # grey fill of the official scale_img padding


def _round_channels(c: float, divisor: int = 8) -> int:
    return int(math.ceil(c / divisor) * divisor)


def _build_layers(cfg: ModelConfig, in_channels: int = 3) -> tuple[nn.ModuleList, list[int]]:
    """Instantiate the config's layers; returns them and each layer's output channels."""
    layers: list[nn.Module] = []
    channels: list[int] = []
    for i, spec in enumerate(cfg.layers):
        c_in = [in_channels if (i == 0 and s == -1) else channels[s] for s in spec.sources]
        n = max(round(spec.repeats * cfg.depth_multiple), 1) if spec.repeats > 1 else spec.repeats
        args = list(spec.args)
        if spec.block in ("Conv", "Focus", "C3", "SPP"):
            c_out = _round_channels(args[0] * cfg.width_multiple)
            if spec.block == "Conv":
                k, s = (args[1:] + [1, 1])[:2]
                layer: nn.Module = Conv(c_in[0], c_out, int(k), int(s))
            elif spec.block == "Focus":
                layer = Focus(c_in[0], c_out, int(args[1]) if len(args) > 1 else 1)
            elif spec.block == "C3":
                shortcut = bool(args[1]) if len(args) > 1 else True
                layer = C3(c_in[0], c_out, n, shortcut)
            else:
                layer = SPP(c_in[0], c_out, tuple(int(k) for k in args[1]))
        elif spec.block == "Upsample":
            layer, c_out = Upsample(int(args[0]) if args else 2), c_in[0]
        else:  # Concat
            layer, c_out = Concat(), sum(c_in)
        layers.append(layer)
        channels.append(c_out)
    return nn.ModuleList(layers), channels


class KapaoModel(nn.Module):
    """KAPAO network for a keypoint schema with K keypoints (nc = 1 + K classes, 2K coordinates).

    forward(x) with x (B, 3, H, W) RGB in [0, 1], H and W multiples of the largest stride:
      training mode -> list of raw logits per level, each (B, A, H/s, W/s, 5 + nc + 2K)
      eval mode     -> decoded predictions (B, N, 5 + nc + 2K) in input pixels:
                       [x, y, w, h, obj, cls_0..cls_{nc-1}, kx_1, ky_1, ..., kx_K, ky_K]
    forward(x, augment=True, scales=[...], flips=[...]) -> test-time augmentation (eval only).
    """

    def __init__(self, cfg: ModelConfig | str, schema: KeypointSchema):
        super().__init__()
        self.cfg = load_model_config(cfg) if isinstance(cfg, str) else cfg
        self.schema = schema
        self.layers, channels = _build_layers(self.cfg)
        self.sources = [spec.sources for spec in self.cfg.layers]
        self.keep = {s for spec in self.cfg.layers for s in spec.sources if s != -1} | set(self.cfg.head_from)
        self.head = KapaoHead(
            schema.num_classes,
            2 * schema.num_keypoints,
            self.cfg.anchors,
            [channels[i] for i in self.cfg.head_from],
        )
        self.head.set_strides(self._probe_strides())
        self.head.initialize_biases()

    @property
    def stride(self) -> torch.Tensor:
        return self.head.stride

    @property
    def max_stride(self) -> int:
        return int(self.head.stride.max())

    @property
    def num_keypoints(self) -> int:
        return self.schema.num_keypoints

    def _probe_strides(self, size: int = 256) -> torch.Tensor:
        # Train mode, as the official constructor: BatchNorm counts this batch, so a fresh model's
        # state (num_batches_tracked = 1) equals the official one key for key.
        was_training = self.training
        self.train()
        with torch.no_grad():
            feats = self.features(torch.zeros(1, 3, size, size))
        self.train(was_training)
        return torch.tensor([size / f.shape[-2] for f in feats], dtype=torch.float32)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Neck outputs feeding the head, one per level (B, C_i, H/s_i, W/s_i)."""
        saved: dict[int, torch.Tensor] = {}
        for i, (layer, sources) in enumerate(zip(self.layers, self.sources)):
            if isinstance(layer, Concat):
                x = layer([x if s == -1 else saved[s] for s in sources])
            elif sources[0] != -1:
                x = layer(saved[sources[0]])
            else:
                x = layer(x)
            if i in self.keep:
                saved[i] = x
        return [saved[i] for i in self.cfg.head_from]

    def forward_raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw logits per level, each (B, A, H/s, W/s, 5 + nc + 2K), in any mode."""
        return self.head(self.features(x))

    def forward(
        self,
        x: torch.Tensor,
        augment: bool = False,
        scales: Sequence[float] | None = None,
        flips: Sequence[int | None] | None = None,
        flip_index: Sequence[int] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        if self.training:
            return self.forward_raw(x)
        if augment:
            return self.forward_tta(x, scales or [1.0], flips or [None] * len(scales or [1.0]), flip_index)
        return self.head.decode(self.forward_raw(x))

    def forward_tta(
        self,
        x: torch.Tensor,
        scales: Sequence[float],
        flips: Sequence[int | None],
        flip_index: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Test-time augmentation as the official code: one pass per (scale, flip) pair, each
        de-scaled to the input frame, concatenated along N.

        flips: None (no flip), 3 (left-right) or 2 (up-down; keypoints are not mirrored, as the
        official code). For left-right flips the keypoint-class columns and the keypoint (x, y)
        pairs are permuted by `flip_index` (default: the schema's).
        """
        if len(scales) != len(flips):
            raise KapaoError(f"TTA: {len(scales)} scales but {len(flips)} flips; give one flip per scale")
        if any(f not in (None, 2, 3) for f in flips):
            raise KapaoError(f"TTA: flips must be None/-1 (none), 2 (up-down) or 3 (left-right), got {list(flips)}")
        flip_index = list(self.schema.flip_index if flip_index is None else flip_index)
        h, w = x.shape[-2:]
        parts = []
        for scale, flip in zip(scales, flips):
            xi = x.flip(flip) if flip else x
            xi = scale_image(xi, scale, self.max_stride)
            parts.append(self._descale(self.head.decode(self.forward_raw(xi)), scale, flip, (h, w), flip_index))
        return torch.cat(parts, 1)

    def _descale(
        self, p: torch.Tensor, scale: float, flip: int | None, size: tuple[int, int], flip_index: list[int]
    ) -> torch.Tensor:
        k = self.num_keypoints
        nc5 = 5 + self.head.nc
        xy, wh, conf, cls_kp, kp = p[..., 0:2], p[..., 2:4], p[..., 4:6], p[..., 6:nc5], p[..., nc5:]
        xy, wh, kp = xy / scale, wh / scale, kp / scale
        if flip == 2:
            xy = torch.stack((xy[..., 0], size[0] - xy[..., 1]), -1)
        elif flip == 3:
            xy = torch.stack((size[1] - xy[..., 0], xy[..., 1]), -1)
            kp = kp.view(*kp.shape[:-1], k, 2)
            kp = torch.stack((size[1] - kp[..., 0], kp[..., 1]), -1)[..., flip_index, :].flatten(-2)
            cls_kp = cls_kp[..., flip_index]
        return torch.cat((xy, wh, conf, cls_kp, kp), -1)

    def focus_as_conv(self) -> "KapaoModel":
        """Replace every Focus layer by its equivalent strided conv (`Focus.as_conv`), for
        inference graphs; the official checkpoint key layout no longer applies afterwards."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Focus):
                self.layers[i] = layer.as_conv()
        return self

    def fuse(self) -> "KapaoModel":
        """Fold every BatchNorm into its conv, for inference (as the official loader does)."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        return self


def scale_image(x: torch.Tensor, ratio: float, stride: int) -> torch.Tensor:
    """Bilinear resize by `ratio`, then pad right/bottom with grey up to a multiple of `stride`."""
    if ratio == 1.0:
        return x
    h, w = x.shape[-2:]
    size = (int(h * ratio), int(w * ratio))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    ph, pw = (math.ceil(v * ratio / stride) * stride for v in (h, w))
    return F.pad(x, [0, pw - size[1], 0, ph - size[0]], value=TTA_PAD_VALUE)


# --- names: our parameters <-> official state-dict keys ----------------------------------------

_OURS = re.compile(r"^layers\.(\d+)\.(.+)$")
_OFFICIAL = re.compile(r"^model\.(\d+)\.(.+)$")


def official_key(our_key: str, head_index: int) -> str:
    """`layers.4.cv1.conv.weight` -> `model.4.cv1.conv.weight`; `head.m.0.bias` -> `model.33.m.0.bias`."""
    if our_key.startswith("head."):
        return f"model.{head_index}.{our_key[5:]}"
    m = _OURS.match(our_key)
    if not m:
        raise KeyError(our_key)
    return f"model.{m.group(1)}.{m.group(2)}"


def our_key(official: str, head_index: int) -> str:
    """Inverse of `official_key`."""
    m = _OFFICIAL.match(official)
    if not m:
        raise KeyError(official)
    i, rest = int(m.group(1)), m.group(2)
    return f"head.{rest}" if i == head_index else f"layers.{i}.{rest}"


def to_official_state_dict(model: KapaoModel) -> dict[str, torch.Tensor]:
    head_index = len(model.layers)
    return {official_key(k, head_index): v for k, v in model.state_dict().items()}


def from_official_state_dict(state: dict[str, torch.Tensor], head_index: int) -> dict[str, torch.Tensor]:
    return {our_key(k, head_index): v for k, v in state.items()}


def build_model(cfg: str | ModelConfig, schema: KeypointSchema) -> KapaoModel:
    return KapaoModel(cfg, schema)
