"""KAPAO training loss: target assignment plus box, objectness, class and keypoint losses.

Assignment (YOLOv5 style): a target matches every anchor of a level whose width and height ratios
to it are all within 1/anchor_t..anchor_t; each match is also given to the neighbouring cells whose
centre is within half a cell (offsets g = 0.5: centre, x-1, y-1, x+1, y+1). Per match:
  box  1 - CIoU of (2s - 0.5, (2s)^2 * anchor) against the target (cell-relative, grid units)
  obj  BCE of every cell against its CIoU (clamped at 0), per-level balance [4, 1, 0.25, 0.06]
  cls  BCE over the nc class columns (person + one per keypoint)
  kp   mean over visible keypoints of the (unsquared) L2 distance between (4s - 2) * anchor and
       the keypoint relative to the assigned cell, in grid units
Gains come from the (scaled) hyp; the result is the sum times the batch size, as the official
code, which this reproduces number for number (including which target writes a shared cell's
objectness target: the last one in assignment order; here that is resolved explicitly, so it is
the same on CPU and CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kapao.errors import KapaoError
from kapao.hyp import Hyp

# Objectness weight per level (P3, P4, P5, P6, P7) for 4+ levels; 3-level models use [4, 1, 0.4].
BALANCE = (4.0, 1.0, 0.25, 0.06, 0.02)
BALANCE_3 = (4.0, 1.0, 0.4)
NEIGHBOUR_G = 0.5  # a neighbour cell is used when the centre is within this fraction of its edge


@dataclass(frozen=True)
class HeadParams:
    """What the loss needs to know about the head when no model is at hand."""

    anchors: torch.Tensor  # (L, A, 2) anchor sizes in grid units (pixels / stride)
    num_classes: int  # nc = 1 + K
    num_keypoints: int  # K


@dataclass
class LevelTargets:
    """Matches of one output level (n of them), in assignment order (offset, anchor, target)."""

    b: torch.Tensor  # (n,) image index in the batch
    a: torch.Tensor  # (n,) anchor index
    gj: torch.Tensor  # (n,) cell row
    gi: torch.Tensor  # (n,) cell column
    tcls: torch.Tensor  # (n,) class
    tbox: torch.Tensor  # (n, 4) box centre relative to the cell, w, h (grid units)
    tkps: torch.Tensor  # (n, K, 3) keypoint x, y relative to the cell (grid units), v
    anch: torch.Tensor  # (n, 2) the matched anchor (grid units)

    def __len__(self) -> int:
        return len(self.b)


@dataclass
class LossOutput:
    """Everything a loss evaluation produced (the loss, its parts, and the targets used)."""

    loss: torch.Tensor  # () sum of the weighted parts times the batch size
    items: torch.Tensor  # (4,) detached [lbox, lobj, lcls, lkps], gains applied
    obj_bce: list[torch.Tensor]  # per level, unweighted objectness BCE
    cls_bce: list[torch.Tensor]  # per level, unweighted class BCE (levels without matches: 0)
    tobj: list[torch.Tensor]  # per level (B, A, H, W) objectness targets
    targets: list[LevelTargets]


def ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of paired boxes, both (n, 4) as (xc, yc, w, h); returns (n,).

    CIoU = IoU - (centre distance^2 / enclosing diagonal^2 + alpha * v), v the aspect-ratio term;
    alpha is treated as a constant (no gradient). eps placement as in YOLOv5, so values match.
    """
    b1x1, b1x2 = box1[:, 0] - box1[:, 2] / 2, box1[:, 0] + box1[:, 2] / 2
    b1y1, b1y2 = box1[:, 1] - box1[:, 3] / 2, box1[:, 1] + box1[:, 3] / 2
    b2x1, b2x2 = box2[:, 0] - box2[:, 2] / 2, box2[:, 0] + box2[:, 2] / 2
    b2y1, b2y2 = box2[:, 1] - box2[:, 3] / 2, box2[:, 1] + box2[:, 3] / 2
    inter = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(0) * (
        torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)
    ).clamp(0)
    w1, h1 = b1x2 - b1x1, b1y2 - b1y1 + eps
    w2, h2 = b2x2 - b2x1, b2y2 - b2y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)
    ch = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    c2 = cw**2 + ch**2 + eps
    rho2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
    v = (4 / math.pi**2) * torch.pow(torch.atan(w2 / h2) - torch.atan(w1 / h1), 2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def _bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean BCE-with-logits; with gamma > 0 the focal-loss form (alpha 0.25), as fl_gamma asks."""
    if gamma <= 0:
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    p = logits.sigmoid()
    p_t = target * p + (1 - target) * (1 - p)
    alpha = 0.25
    alpha_t = target * alpha + (1 - target) * (1 - alpha)
    return (loss * alpha_t * (1.0 - p_t) ** gamma).mean()


def _last_write_wins(lin: torch.Tensor) -> torch.Tensor:
    """Indices into `lin` (n,) of the last occurrence of each distinct value: what a sequential
    `x[lin] = v` keeps. Explicit, so it is deterministic on any device (an indexed assignment with
    duplicate indices is not on CUDA); O(n log n) time and O(n) memory."""
    sorted_lin, perm = torch.sort(lin, stable=True)
    last = torch.ones_like(sorted_lin, dtype=torch.bool)
    last[:-1] = sorted_lin[1:] != sorted_lin[:-1]
    return perm[last]


class KapaoLoss:
    """loss, items = KapaoLoss(model, hyp)(preds, targets).

    model: a KapaoModel (or DDP-wrapped), its KapaoHead, or a HeadParams.
    hyp:   hyperparameters already scaled for the model (`kapao.hyp.scale_hyp`).
    preds: raw logits per level, each (B, A, H_i, W_i, 5 + nc + 2K).
    targets: (nt, 6 + 3K) rows [image index, class, xc, yc, w, h, K x (x, y, v)], normalised to
             the network input (as the dataloader makes them).
    Returns the loss () = (lbox + lobj + lcls + lkps) * B and the detached items (4,).
    """

    def __init__(self, model: nn.Module | HeadParams, hyp: Hyp, balance: Sequence[float] | None = None):
        self.hyp = hyp
        m = getattr(model, "module", model)
        self._head = getattr(m, "head", m)
        if isinstance(self._head, HeadParams):
            anchors = self._head.anchors
            self.nc, self.nk = self._head.num_classes, self._head.num_keypoints
        else:
            try:
                anchors = self._head.anchors
                self.nc, self.nk = int(self._head.nc), int(self._head.num_coords) // 2
            except AttributeError:
                raise KapaoError("KapaoLoss: pass a KapaoModel, its head, or a HeadParams") from None
        self.nl, self.na = int(anchors.shape[0]), int(anchors.shape[1])
        if balance is None:
            balance = BALANCE_3 if self.nl == 3 else BALANCE + (BALANCE[-1],) * max(0, self.nl - len(BALANCE))
        if len(balance) < self.nl:
            raise KapaoError(f"KapaoLoss: balance has {len(balance)} values for {self.nl} levels")
        self.balance = [float(x) for x in balance[: self.nl]]
        self.gr = 1.0  # objectness target = (1 - gr) + gr * IoU
        eps = hyp.label_smoothing
        self.cp, self.cn = 1.0 - 0.5 * eps, 0.5 * eps

    @property
    def anchors(self) -> torch.Tensor:
        """(L, A, 2) grid units; read from the head each time so device moves and re-anchoring apply."""
        return self._head.anchors

    def __call__(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.compute(preds, targets)
        return out.loss, out.items

    # ------------------------------------------------------------------------------------------
    def build_targets(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> list[LevelTargets]:
        """Assign targets (nt, 6 + 3K) to anchors and cells of every level; see LevelTargets."""
        if len(preds) != self.nl:
            raise KapaoError(f"KapaoLoss: got {len(preds)} prediction levels, the head has {self.nl}")
        device = preds[0].device
        ncols = 6 + 3 * self.nk
        if targets.ndim != 2 or targets.shape[1] != ncols:
            raise KapaoError(
                f"KapaoLoss: targets have shape {tuple(targets.shape)}, expected (n, {ncols}) = "
                f"[image, class, xc, yc, w, h, {self.nk} x (x, y, v)]"
            )
        targets = targets.to(device=device, dtype=torch.float32)
        na, nt, k = self.na, targets.shape[0], self.nk
        anchors_all = self.anchors.to(device=device, dtype=torch.float32)
        # every target once per anchor, with the anchor index appended: (na, nt, 7 + 3K)
        ai = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).repeat(1, nt)
        t_all = torch.cat((targets.repeat(na, 1, 1), ai[:, :, None]), 2)
        g = NEIGHBOUR_G
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=torch.float32) * g
        kx = torch.arange(k, device=device) * 3 + 6  # keypoint x columns
        out = []
        for i in range(self.nl):
            anchors = anchors_all[i]
            ny, nx = int(preds[i].shape[2]), int(preds[i].shape[3])
            gain = torch.ones(ncols + 1, device=device)
            gain[2:6] = torch.tensor([nx, ny, nx, ny], device=device, dtype=torch.float32)
            gain[kx] = float(nx)
            gain[kx + 1] = float(ny)
            t = t_all * gain
            if nt:
                r = t[:, :, 4:6] / anchors[:, None]
                t = t[torch.max(r, 1.0 / r).max(2)[0] < self.hyp.anchor_t]  # (m, 7 + 3K), anchor-major
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                jx, jy = ((gxy % 1.0 < g) & (gxy > 1.0)).T
                lx, ly = ((gxi % 1.0 < g) & (gxi > 1.0)).T
                sel = torch.stack((torch.ones_like(jx), jx, jy, lx, ly))  # (5, m)
                o_idx, r_idx = sel.nonzero(as_tuple=True)  # row-major: offset, then anchor, target
                t = t[r_idx]
                offsets = off[o_idx]
            else:
                t = t_all[0]
                offsets = torch.zeros((0, 2), device=device)
            b, c = t[:, :2].long().T
            gxy = t[:, 2:4]
            gwh = t[:, 4:6]
            gij = (gxy - offsets).long()
            gij[:, 0].clamp_(0, nx - 1)
            gij[:, 1].clamp_(0, ny - 1)
            a = t[:, -1].long()
            kp = t[:, 6:-1].reshape(-1, k, 3).clone()
            kp[..., :2] -= gij[:, None, :]
            out.append(
                LevelTargets(
                    b=b, a=a, gj=gij[:, 1], gi=gij[:, 0], tcls=c,
                    tbox=torch.cat((gxy - gij, gwh), 1), tkps=kp, anch=anchors[a],
                )
            )
        return out

    # ------------------------------------------------------------------------------------------
    def compute(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> LossOutput:
        """The loss with its parts, per-level BCEs, objectness targets and assignments."""
        device = preds[0].device
        h = self.hyp
        cls_pw = torch.tensor([h.cls_pw], device=device)
        obj_pw = torch.tensor([h.obj_pw], device=device)
        zero = torch.zeros((), device=device)
        lbox, lobj, lcls, lkps = zero, zero, zero, zero
        level_targets = self.build_targets(preds, targets)
        obj_bce, cls_bce, tobjs = [], [], []
        nc = self.nc
        for i, (pi, lt) in enumerate(zip(preds, level_targets)):
            pi = pi.float()
            bsz, na, ny, nx, no = pi.shape
            if no != 5 + nc + 2 * self.nk:
                raise KapaoError(f"KapaoLoss: level {i} has {no} outputs per anchor, expected {5 + nc + 2 * self.nk}")
            tobj = torch.zeros(pi.shape[:4], device=device, dtype=pi.dtype)
            lc = zero
            n = len(lt)
            if n:
                ps = pi[lt.b, lt.a, lt.gj, lt.gi]  # (n, no)
                pxy = ps[:, :2].sigmoid() * 2.0 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * lt.anch
                iou = ciou(torch.cat((pxy, pwh), 1), lt.tbox)
                lbox = lbox + (1.0 - iou).mean()

                vis = lt.tkps[..., 2] > 0  # (n, K)
                if vis.any():
                    pkp = (ps[:, 5 + nc :].reshape(n, self.nk, 2).sigmoid() * 4.0 - 2.0) * lt.anch[:, None, :]
                    d = torch.linalg.norm(pkp[vis] - lt.tkps[vis][:, :2], dim=-1)
                    lkps = lkps + d.mean()

                score = (1.0 - self.gr) + self.gr * iou.detach().clamp(0).to(tobj.dtype)
                lin = ((lt.b * na + lt.a) * ny + lt.gj) * nx + lt.gi
                win = _last_write_wins(lin)
                tobj.view(-1)[lin[win]] = score[win]

                if nc > 1:
                    tc = torch.full_like(ps[:, 5 : 5 + nc], self.cn)
                    tc[torch.arange(n, device=device), lt.tcls] = self.cp
                    lc = _bce(ps[:, 5 : 5 + nc], tc, cls_pw, h.fl_gamma)
                    lcls = lcls + lc
            ob = _bce(pi[..., 4], tobj, obj_pw, h.fl_gamma)
            lobj = lobj + ob * self.balance[i]
            obj_bce.append(ob.detach())
            cls_bce.append(lc.detach())
            tobjs.append(tobj)
        lbox = lbox * h.box
        lobj = lobj * h.obj
        lcls = lcls * h.cls
        lkps = lkps * h.kp
        bs = preds[0].shape[0]
        loss = (lbox + lobj + lcls + lkps) * bs
        items = torch.stack((lbox, lobj, lcls, lkps)).detach()
        return LossOutput(loss=loss, items=items, obj_bce=obj_bce, cls_bce=cls_bce, tobj=tobjs, targets=level_targets)
