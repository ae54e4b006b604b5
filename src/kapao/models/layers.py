"""Building blocks of the YOLOv5-P6 backbone and neck.

Attribute names (`conv`, `bn`, `cv1`, `m`, ...) are chosen so that state-dict keys line up with the
official checkpoints one to one; see `kapao.models.kapao.official_key`.
"""

from __future__ import annotations

import torch
from torch import nn

# BatchNorm settings of the official models (YOLOv5 initialize_weights).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm -> SiLU. After `fuse()`, Conv2d with bias -> SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold BatchNorm into the convolution (inference only): w' = w * g/sqrt(v+eps), b' = beta - g*m/sqrt(v+eps)."""
        if isinstance(self.bn, nn.Identity):
            return
        conv, bn = self.conv, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            groups=conv.groups, bias=True,
        ).to(conv.weight.device, conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        # same operation order as the official fuse_conv_and_bn, so fused outputs agree to the ulp
        fused.bias.copy_(bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps)))
        fused.requires_grad_(conv.weight.requires_grad)
        self.conv = fused
        self.bn = nn.Identity()


class Focus(nn.Module):
    """Space-to-depth (2x2 pixel blocks -> 4x channels), then a Conv. Halves the resolution losslessly."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = Conv(c_in * 4, c_out, k, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(
            torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        )

    @torch.no_grad()
    def as_conv(self) -> Conv:
        """The same layer as one strided conv on the full-resolution input (kernel 2k, stride 2s,
        padding 2p): the space-to-depth block (dy, dx) of channel c at tap (ky, kx) is the input
        pixel at tap (2ky + dy, 2kx + dx). Equal up to float summation order; exported graphs use
        it because runtimes run the four strided slices and their concat slowly."""
        inner = self.conv.conv
        c_out, c4, k, _ = inner.weight.shape
        c_in, (s, p) = c4 // 4, (inner.stride[0], inner.padding[0])
        conv = nn.Conv2d(c_in, c_out, 2 * k, 2 * s, 2 * p, bias=inner.bias is not None)
        conv = conv.to(inner.weight.device, inner.weight.dtype)
        w = inner.weight.view(c_out, 2, 2, c_in, k, k)  # (o, dx, dy, c, ky, kx): blocks in cat order
        conv.weight.copy_(w.permute(0, 3, 4, 2, 5, 1).reshape(c_out, c_in, 2 * k, 2 * k))
        if inner.bias is not None:
            conv.bias.copy_(inner.bias)
        out = Conv(c_in, c_out, 2 * k, 2 * s, act=False)
        out.conv, out.bn, out.act = conv, self.conv.bn, self.conv.act
        return out.requires_grad_(inner.weight.requires_grad)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 conv pair, with a residual connection when the shapes allow it."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, expansion: float = 0.5):
        super().__init__()
        hidden = int(c_out * expansion)
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(hidden, c_out, 3, 1)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block: a bottleneck stack on half the channels, concatenated with a 1x1 bypass."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, expansion: float = 0.5):
        super().__init__()
        hidden = int(c_out * expansion)
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(c_in, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, expansion=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPP(nn.Module):
    """Spatial pyramid pooling: parallel stride-1 max-pools of several sizes, concatenated."""

    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(kernels) + 1), c_out, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.m)], 1))


class Concat(nn.Module):
    """Channel concatenation of several earlier feature maps."""

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, 1)


class Upsample(nn.Upsample):
    """Nearest-neighbour upsampling by an integer factor."""

    def __init__(self, factor: int = 2):
        super().__init__(scale_factor=factor, mode="nearest")
