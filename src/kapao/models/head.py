"""The KAPAO head: at every anchor, one pose object and the keypoint-object class scores.

Each output level has a 1x1 conv with `A * (5 + nc + 2K)` channels (A anchors, nc = 1 + K classes).
Per anchor the row is `[x, y, w, h, obj, cls_0..cls_{nc-1}, kx_1, ky_1, ..., kx_K, ky_K]`.

Two decodes give the same predictions: `decode` follows the official formulas term by term (eager
inference, TTA, the goldens); `decode_maps` writes them as one elementwise polynomial per channel
on the conv maps, before the transpose, for exported graphs: runtimes fuse it into one pass, where
the per-column slices and concatenations cost ~10-15 ms per 1024 image (it differs from `decode`
by float rounding only, a few 1e-4 px).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class KapaoHead(nn.Module):
    """Raw per-level logits in training; `decode` turns them into input-pixel predictions.

    Buffers (both in the state dict, as in the official checkpoints):
      anchors     (L, A, 2)          anchor sizes in grid units (pixels / stride), used by the loss
      anchor_grid (L, 1, A, 1, 1, 2) anchor sizes in pixels, used by decoding
    """

    def __init__(
        self,
        num_classes: int,
        num_coords: int,
        anchors_px: list[list[float]] | tuple[tuple[float, ...], ...],
        in_channels: list[int],
    ):
        super().__init__()
        self.nc = num_classes
        self.num_coords = num_coords
        self.no = 5 + num_classes + num_coords
        self.nl = len(anchors_px)
        self.na = len(anchors_px[0]) // 2
        a = torch.tensor(anchors_px, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", a.clone())  # divided by the strides once they are known
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in in_channels)

    def set_strides(self, strides: torch.Tensor) -> None:
        """Record the level strides and express `anchors` in grid units."""
        self.stride.copy_(strides)
        self.anchors.copy_(self.anchor_grid.view(self.nl, -1, 2) / strides.view(-1, 1, 1))

    @torch.no_grad()
    def initialize_biases(self, image_size: int = 640) -> None:
        """Prior-probability bias init for training from scratch (obj ~ 8 objects per 640 image,
        class ~ 0.6 / (nc - 0.99)), as the official model does."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.view(self.na, -1)
            b[:, 4] += math.log(8 / (image_size / s) ** 2)
            b[:, 5 : 5 + self.nc] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features[i] (B, C_i, H_i, W_i) -> raw logits per level, each (B, A, H_i, W_i, no)."""
        device_type = features[0].device.type
        if torch.is_autocast_enabled(device_type):
            # mixed precision: the 1x1 output convs run in fp32, bf16/fp16 logits would cost
            # keypoint precision (a bf16 logit near 1 is only good to ~0.4 %)
            with torch.autocast(device_type, enabled=False):
                return self.forward([f.float() for f in features])
        out = []
        for conv, f in zip(self.m, features):
            y = conv(f)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def output_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features[i] -> the output convs' maps (B, A * no, H_i, W_i), channel = anchor * no + column."""
        return [conv(f) for conv, f in zip(self.m, features)]

    def map_decode_coefficients(self) -> torch.Tensor:
        """(L, 5, A * no) float32 per-channel coefficients (q, a, c, mx, my) of `decode_maps`:
        value = (q * s + a) * s + mx * grid_x + my * grid_y + c, with s = sigmoid(logit).
        From the official formulas: xy = 2 stride s + (grid - 0.5) stride; wh = 4 anchor s^2;
        obj/cls = s; keypoints = 4 anchor s + grid stride - 2 anchor."""
        nc5, k = 5 + self.nc, self.num_coords // 2
        out = torch.zeros(self.nl, 5, self.na, self.no)
        for i, st in enumerate(self.stride.tolist()):
            anchors = self.anchor_grid[i].view(self.na, 2).float().cpu()
            q, a, c, mx, my = out[i]
            a[:, 0:2], c[:, 0:2], mx[:, 0], my[:, 1] = 2 * st, -0.5 * st, st, st
            q[:, 2:4] = 4 * anchors
            a[:, 4:nc5] = 1
            a[:, nc5:] = (4 * anchors).repeat(1, k)
            c[:, nc5:] = (-2 * anchors).repeat(1, k)
            mx[:, nc5::2], my[:, nc5 + 1 :: 2] = st, st
        return out.view(self.nl, 5, self.na * self.no)

    def decode_maps(self, maps: list[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
        """Output maps (B, A * no, H_i, W_i) -> (B, N, no), the rows of `decode`; `coefficients`
        from `map_decode_coefficients` (an exported graph stores them as constants)."""
        out = []
        for y, coef in zip(maps, coefficients):
            b, _, h, w = y.shape
            q, a, c, mx, my = (t.view(1, -1, 1, 1) for t in coef.to(y.dtype))
            gx = torch.arange(w, device=y.device, dtype=y.dtype).view(1, 1, 1, w)
            gy = torch.arange(h, device=y.device, dtype=y.dtype).view(1, 1, h, 1)
            s = y.sigmoid()
            d = (s * q + a) * s + (gx * mx + (gy * my + c))
            out.append(d.view(b, self.na, self.no, h * w).transpose(2, 3).reshape(b, -1, self.no))
        return torch.cat(out, 1)

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw logits per level -> (B, N, no) in input pixels, rows ordered level, anchor, y, x.

        With s = sigmoid(logit): xy = (2s - 0.5 + grid) * stride, wh = (2s)^2 * anchor,
        keypoints = (4s - 2) * anchor_wh + grid * stride (no -0.5 offset, scaled by the anchor
        width/height, as the official head). Written with concatenation, not in-place slice
        writes, so exported graphs stay free of scatter ops.
        """
        nc5 = 5 + self.nc
        k = self.num_coords // 2
        out = []
        for i, logits in enumerate(raw):
            b, a, h, w, _ = logits.shape
            stride = self.stride[i]
            gy, gx = torch.meshgrid(
                torch.arange(h, device=logits.device, dtype=logits.dtype),
                torch.arange(w, device=logits.device, dtype=logits.dtype),
                indexing="ij",
            )
            grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2)
            anchor = self.anchor_grid[i].to(logits.dtype)  # (1, A, 1, 1, 2)
            s = logits.sigmoid()
            xy = (s[..., 0:2] * 2 - 0.5 + grid) * stride
            wh = (s[..., 2:4] * 2) ** 2 * anchor
            kp = (s[..., nc5:].view(b, a, h, w, k, 2) * 4 - 2) * anchor.unsqueeze(-2)
            kp = kp + (grid * stride).unsqueeze(-2)
            y = torch.cat((xy, wh, s[..., 4:nc5], kp.view(b, a, h, w, 2 * k)), -1)
            out.append(y.view(b, -1, self.no))
        return torch.cat(out, 1)
