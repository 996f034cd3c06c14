"""Boxes [N,4] as (x0, y0, x1, y1): delta decoding, clipping, scaling, grids, and the "+1" NMS.

Two conventions meet here. detectron2 measures a box as ``x1 - x0`` (``offset=0``);
maskrcnn-benchmark / Detectron as ``x1 - x0 + 1`` (``offset=1``): its box coder, clipping
(to ``w - 1``), areas and NMS all use that. Each function takes the offset so one copy serves both,
and with ``offset=0`` the float operations are exactly detectron2's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

BOX_SCALE_CLAMP = math.log(1000.0 / 16)


def apply_deltas(deltas: Tensor, boxes: Tensor, weights: Sequence[float], offset: int = 0) -> Tensor:
    """Decode ``(dx, dy, dw, dh)`` deltas [R, K*4] against boxes [R, 4] into [R, K*4] boxes (float32)."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    if offset:
        widths, heights = widths + offset, heights + offset
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=BOX_SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=BOX_SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    right = pred_ctr_x + 0.5 * pred_w
    bottom = pred_ctr_y + 0.5 * pred_h
    if offset:  # maskrcnn-benchmark: "- 1" on the far sides
        right, bottom = right - offset, bottom - offset
    out = torch.empty_like(deltas)
    out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    out[:, 2::4] = right
    out[:, 3::4] = bottom
    return out


def clip_boxes(boxes: Tensor, hw: tuple[int, int], offset: int = 0) -> Tensor:
    """A copy of [N, 4k] boxes with x clamped to ``[0, w - offset]`` and y to ``[0, h - offset]``."""
    h, w = hw
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w - offset)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h - offset)
    return boxes


def scale_boxes(boxes: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """A copy of [N, 4k] boxes with x multiplied by ``scale_x`` and y by ``scale_y`` (float32 arithmetic)."""
    boxes = boxes.clone()
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    return boxes


def nonempty(boxes: Tensor) -> Tensor:
    """Mask of boxes with positive width and height (detectron2's ``nonempty``)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def grid_boxes(h: int, w: int, n: int = 8) -> np.ndarray:
    """An n x n grid over an HxW image: float32 [n*n,4] from ``linspace(0, W, n+1)`` and
    ``linspace(0, H, n+1)``, row-major (index ``i*n + j``, i over y). The BUTD given-boxes grid."""
    xs = np.linspace(0, w, n + 1)
    ys = np.linspace(0, h, n + 1)
    return np.array(
        [[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(n) for j in range(n)], dtype=np.float32
    )


def cell_grid_boxes(h: int, w: int, n: int = 8) -> Tensor:
    """X-LXMERT's grid: cell (i, j) = ``(j*(W//n), i*(H//n), (j+1)*(W//n), (i+1)*(H//n))``, float32
    [n*n, 4], row-major. Cells are whole pixels; the last row/column ends ``H % n`` / ``W % n`` short."""
    gh, gw = h // n, w // n
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    return torch.stack([j * gw, i * gh, (j + 1) * gw, (i + 1) * gh], dim=1).float()


def area_plus_one(boxes: Tensor) -> Tensor:
    """maskrcnn-benchmark's ``BoxList.area()``: ``(x1 - x0 + 1) * (y1 - y0 + 1)``."""
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


def _overlaps_plus_one(boxes: Tensor, thresh: float) -> Tensor:
    """[N,N] mask ``IoU >= thresh`` in maskrcnn-benchmark's float32 arithmetic ("+1" sides)."""
    x0, y0, x1, y1 = (boxes[:, k].contiguous() for k in range(4))
    areas = area_plus_one(boxes)
    w = (torch.minimum(x1[:, None], x1[None, :]) - torch.maximum(x0[:, None], x0[None, :]) + 1).clamp(min=0)
    h = (torch.minimum(y1[:, None], y1[None, :]) - torch.maximum(y0[:, None], y0[None, :]) + 1).clamp(min=0)
    inter = w * h
    iou = inter / (areas[:, None] + areas[None, :] - inter)
    return iou >= torch.tensor(thresh, dtype=iou.dtype)  # the C++ kernel compares with a float threshold


def nms_plus_one_masks(boxes: Tensor, scores: Tensor, thresh: float) -> Tensor:
    """Greedy NMS as maskrcnn-benchmark's CPU kernel, for S score sets over the same N boxes at once.

    ``scores`` [S, N] -> kept mask [S, N]. Per set: visit boxes by descending score (``sort``, as the
    kernel); a box not yet suppressed is kept and suppresses every later box with IoU ``>= thresh``,
    IoU on "+1" sides. (torchvision's ``nms`` differs: ``>`` and sides without +1.) The S sets run
    in lockstep, one rank per step, so S per-class NMS calls cost N vectorised steps.
    """
    s, n = scores.shape
    keep = torch.zeros(s, n, dtype=torch.bool, device=scores.device)
    if n == 0:
        return keep
    boxes = boxes.float()
    overlap = _overlaps_plus_one(boxes, thresh)
    order = torch.sort(scores, dim=1, descending=True).indices
    suppressed = torch.zeros(s, n, dtype=torch.bool, device=scores.device)
    rows = torch.arange(s, device=scores.device)
    for r in range(n):
        i = order[:, r]
        alive = ~suppressed[rows, i]
        keep[rows, i] = alive
        suppressed |= overlap[i] & alive[:, None]
    return keep


def nms_plus_one(boxes: Tensor, scores: Tensor, thresh: float) -> Tensor:
    """Indices kept by maskrcnn-benchmark's NMS for one score vector, ascending (as the kernel returns)."""
    return nms_plus_one_masks(boxes, scores[None], thresh)[0].nonzero().flatten()
