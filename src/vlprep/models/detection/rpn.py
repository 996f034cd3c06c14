"""Region proposal networks: anchors, the shared conv head, and proposal selection on one level
(detectron2, BUTD's C4 model) or over FPN levels (maskrcnn-benchmark, the X-152 model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from vlprep.models.detection.boxes import apply_deltas, clip_boxes, nms_plus_one, nonempty

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """detectron2: [len(sizes)*len(ratios), 4] anchors centred at 0, size-major; ratio = h/w."""
    out = []
    for size in sizes:
        area = size**2.0
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out)


def _centre_form(box: np.ndarray) -> tuple[float, float, float, float]:
    w = box[2] - box[0] + 1
    h = box[3] - box[1] + 1
    return w, h, box[0] + 0.5 * (w - 1), box[1] + 0.5 * (h - 1)


def _around(ws: np.ndarray, hs: np.ndarray, cx: float, cy: float) -> np.ndarray:
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)))


def detectron_cell_anchors(stride: int, sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """Detectron / maskrcnn-benchmark anchors (float64 arithmetic, then float32): the ``stride``-wide
    cell ``(0, 0, stride-1, stride-1)`` reshaped per ratio (``round(sqrt(area/ratio))`` wide), then
    scaled by ``size / stride``; ratio-major."""
    w, h, cx, cy = _centre_form(np.array([0, 0, stride - 1, stride - 1], dtype=np.float64))
    ratios_ = np.array(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / ratios_))
    by_ratio = _around(ws, np.round(ws * ratios_), cx, cy)
    scales = np.array(sizes, dtype=np.float64) / stride
    out = []
    for box in by_ratio:
        bw, bh, bx, by = _centre_form(box)
        out.append(_around(bw * scales, bh * scales, bx, by))
    return torch.from_numpy(np.vstack(out)).float()


def grid_anchors(cell: Tensor, grid_hw: tuple[int, int], stride: int) -> Tensor:
    """All anchors of a feature map, flattened in (y, x, anchor) order; cell (x, y) is shifted by
    ``(stride*x, stride*y)``."""
    gh, gw = grid_hw
    sx = torch.arange(0, gw * stride, step=stride, dtype=torch.float32, device=cell.device)
    sy = torch.arange(0, gh * stride, step=stride, dtype=torch.float32, device=cell.device)
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack((xx, yy, xx, yy), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for objectness logits [A] and anchor deltas [4A] per cell."""

    def __init__(self, cin: int, hidden: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv(x))
        return self.objectness_logits(h), self.anchor_deltas(h)


@dataclass(frozen=True)
class ProposalParams:
    pre_nms_topk: int
    post_nms_topk: int
    nms_thresh: float
    min_size: float = 0.0  # maskrcnn-benchmark only: drop boxes narrower ("+1" sides)
    levels_topk: int = 0  # maskrcnn-benchmark FPN only: the top-k over all levels, per image


def _flatten(logits: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """[N,A,H,W] logits and [N,4A,H,W] deltas -> [N, H*W*A] and [N, H*W*A, 4], (y, x, anchor) order."""
    n, a, gh, gw = logits.shape
    logits = logits.float().permute(0, 2, 3, 1).reshape(n, -1)
    deltas = deltas.float().view(n, a, 4, gh, gw).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return logits, deltas


class C4RPN(nn.Module):
    """detectron2's RPN on one feature map: per image, top ``pre_nms_topk`` logits (by ``sort``, as
    upstream: the same order among ties), decode, clip to ``[0, w]``, drop empty boxes, NMS
    (torchvision), keep ``post_nms_topk``. The head runs in float32 even under autocast."""

    def __init__(self, head: RPNHead, cell: Tensor, stride: int, params: ProposalParams):
        super().__init__()
        self.head = head
        self._cell, self.stride, self.params = cell, stride, params

    def forward(self, feat: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        """Per image: (proposals [R,4] float32 in input pixels, objectness logits [R]), best first."""
        with torch.autocast(device_type=feat.device.type, enabled=False):
            logits, deltas = _flatten(*self.head(feat.float()))
        anchors = grid_anchors(self._cell.to(feat.device), tuple(feat.shape[-2:]), self.stride)
        p = self.params
        out = []
        for i, hw in enumerate(image_sizes):
            boxes = apply_deltas(deltas[i], anchors, RPN_BOX_WEIGHTS)
            k = min(p.pre_nms_topk, logits.shape[1])
            scores, order = logits[i].sort(descending=True)
            scores, order = scores[:k], order[:k]
            boxes = clip_boxes(boxes[order], hw)
            keep = nonempty(boxes)
            if not bool(keep.all()):
                boxes, scores = boxes[keep], scores[keep]
            keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), p.nms_thresh)
            keep = keep[: p.post_nms_topk]
            out.append((boxes[keep], scores[keep]))
        return out


class FPNRPN(nn.Module):
    """maskrcnn-benchmark's RPN over FPN levels (test mode), per image and level: sigmoid objectness,
    ``topk`` ``pre_nms_topk``, decode with "+1" sides, clip to ``[0, w-1]``, drop boxes under
    ``min_size``, "+1" NMS (:func:`nms_plus_one`), keep ``post_nms_topk``; then the top
    ``levels_topk`` by objectness over all levels. The head runs in float32 even under autocast."""

    def __init__(
        self, head: RPNHead, cells: Sequence[Tensor], strides: Sequence[int], params: ProposalParams
    ):
        super().__init__()
        self.head = head
        self.cells, self.strides, self.params = list(cells), tuple(strides), params

    def _level(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        p = self.params
        scores, idx = logits[None].sigmoid().topk(min(p.pre_nms_topk, len(logits)), dim=1, sorted=True)
        scores, idx = scores[0], idx[0]
        boxes = clip_boxes(apply_deltas(deltas[idx], anchors[idx], RPN_BOX_WEIGHTS, offset=1), hw, offset=1)
        ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        big = (ws >= p.min_size) & (hs >= p.min_size)
        boxes, scores = boxes[big], scores[big]
        keep = nms_plus_one(boxes, scores, p.nms_thresh)[: p.post_nms_topk]
        return boxes[keep], scores[keep]

    def forward(
        self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image: (proposals [R,4] float32 in input pixels, objectness [R]), best first."""
        levels = []
        with torch.autocast(device_type=feats[0].device.type, enabled=False):
            for feat, cell, stride in zip(feats, self.cells, self.strides, strict=True):
                anchors = grid_anchors(cell.to(feat.device), tuple(feat.shape[-2:]), stride)
                levels.append((*_flatten(*self.head(feat.float())), anchors))
        out = []
        for i, hw in enumerate(image_sizes):
            per_level = [self._level(lg[i], dl[i], anchors, hw) for lg, dl, anchors in levels]
            boxes = torch.cat([b for b, _ in per_level])
            scores = torch.cat([s for _, s in per_level])
            _, top = scores.topk(min(self.params.levels_topk, len(scores)), dim=0, sorted=True)
            out.append((boxes[top], scores[top]))
        return out
