"""Visual Genome bottom-up-attention Faster R-CNN (ResNet-101 C4, 1600 objects, 400 attributes).

A plain torch + torchvision.ops reimplementation of the detectron2 port of BUTD
(airsplay/py-bottom-up-attention, ``faster_rcnn_R_101_C4_attr_caffemaxpool.yaml``), numerically
matching it on the golden fixtures (``shared/fixtures/butd``):

- input: uint8 BGR, shortest-edge resize with Pillow bilinear, minus the Caffe pixel mean (std 1);
- backbone: stem (7x7/2 conv, FrozenBN, ReLU, 3x3/2 max-pool with ``ceil_mode``) and res2..res4
  bottlenecks, stride in the first 1x1 conv; FrozenBN uses running_mean/var with eps 1e-5;
- RPN: 12 anchors per cell (sizes 64..512 x ratios 0.5/1/2, size-major), top 6000 -> clip ->
  NMS 0.7 -> 300 proposals;
- RoI head: RoIPool 14x14 at 1/16 -> res5 (stride 1, dilation 2) -> mean -> 2048-d feature;
  ``cls_score`` 1601 (background LAST), class-specific ``bbox_pred`` (weights 10,10,5,5) and the
  attribute branch (embedding of the argmax over all 1601 logits, concat, 512, ReLU, 401 with
  no-attribute LAST).

Parameter names equal detectron2's, except ``proposal_generator.rpn_head.*`` which is ``rpn.head.*``
here (see :func:`d2_to_vlprep_key`); the anchor buffer is not stored.

Box selection (which proposals become the image's regions) lives in :mod:`vlprep.models.butd_recipes`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from torchvision.ops import RoIPool, batched_nms

from vlprep import VlprepError
from vlprep.models import weights as wts
from vlprep.models.butd_recipes import Recipe, RoIOutputs, get_recipe, grid_boxes

log = logging.getLogger(__name__)

PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BOX_SCALE_CLAMP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class BUTDConfig:
    """Architecture sizes. The default is the full VG model; :meth:`tiny` keeps the code path, shrunk."""

    stem_channels: int = 64
    stage_blocks: tuple[int, int, int] = (3, 4, 23)  # res2, res3, res4 (ResNet-101)
    bottleneck_channels: int = 64  # res2's bottleneck width; doubles per stage, outputs are 4x
    res5_blocks: int = 3
    res5_dilation: int = 2
    rpn_channels: int = 512
    anchor_sizes: tuple[float, ...] = (64, 128, 256, 512)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms_thresh: float = 0.7
    pooler_resolution: int = 14
    num_classes: int = 1600  # foreground; the classifier has one more (background, last)
    num_attributes: int = 400  # the attribute classifier has one more (no-attribute, last)
    attr_embed_dim: int = 256
    attr_hidden_dim: int = 512
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN_BGR

    @classmethod
    def tiny(cls, **overrides: Any) -> BUTDConfig:
        """A small variant for fast tests: 1 block per stage, 8x fewer channels, 20 classes."""
        small = dict(
            stem_channels=8,
            stage_blocks=(1, 1, 1),
            bottleneck_channels=8,
            res5_blocks=1,
            rpn_channels=32,
            rpn_pre_nms_topk=1000,
            rpn_post_nms_topk=100,
            num_classes=20,
            num_attributes=10,
            attr_embed_dim=8,
            attr_hidden_dim=16,
        )
        return cls(**{**small, **overrides})

    @property
    def res4_channels(self) -> int:
        return self.bottleneck_channels * 16

    @property
    def feature_dim(self) -> int:
        return self.bottleneck_channels * 32

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)


# ---------------------------------------------------------------- layers


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:  # autocast: fold into a scale and shift in the input's dtype
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class Conv2dNorm(nn.Conv2d):
    """Bias-free conv followed by FrozenBN in ``.norm`` (detectron2's ``Conv2d(norm=...)`` naming)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """1x1 (carries the stride) -> 3x3 (dilated) -> 1x1, plus a projection shortcut when shapes change."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.shortcut = Conv2dNorm(cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else None
        self.conv1 = Conv2dNorm(cin, width, 1, stride=stride)
        self.conv2 = Conv2dNorm(width, width, 3, padding=dilation, dilation=dilation)
        self.conv3 = Conv2dNorm(width, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def make_stage(blocks: int, cin: int, width: int, cout: int, stride: int, dilation: int = 1) -> nn.Sequential:
    layers = [Bottleneck(cin, width, cout, stride=stride, dilation=dilation)]
    layers += [Bottleneck(cout, width, cout, dilation=dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """7x7/2 conv + FrozenBN + ReLU + Caffe-style 3x3/2 max-pool (``ceil_mode=True``, no padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv2dNorm(3, channels, 7, stride=2, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4(nn.Module):
    """Stem + res2..res4; output stride 16."""

    def __init__(self, cfg: BUTDConfig):
        super().__init__()
        b = cfg.bottleneck_channels
        n2, n3, n4 = cfg.stage_blocks
        self.stem = Stem(cfg.stem_channels)
        self.res2 = make_stage(n2, cfg.stem_channels, b, 4 * b, stride=1)
        self.res3 = make_stage(n3, 4 * b, 2 * b, 8 * b, stride=2)
        self.res4 = make_stage(n4, 8 * b, 4 * b, 16 * b, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


# ---------------------------------------------------------------- boxes


def apply_deltas(deltas: Tensor, boxes: Tensor, weights: Sequence[float]) -> Tensor:
    """Decode ``(dx, dy, dw, dh)`` deltas [R, K*4] against boxes [R, 4] (x0,y0,x1,y1; width = x1-x0)."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
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
    out = torch.empty_like(deltas)
    out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    out[:, 2::4] = pred_ctr_x + 0.5 * pred_w
    out[:, 3::4] = pred_ctr_y + 0.5 * pred_h
    return out


def clip_boxes_(boxes: Tensor, hw: tuple[int, int]) -> Tensor:
    """Clamp [N,4] boxes in place to ``[0, w] x [0, h]``."""
    h, w = hw
    boxes[:, 0].clamp_(min=0, max=w)
    boxes[:, 1].clamp_(min=0, max=h)
    boxes[:, 2].clamp_(min=0, max=w)
    boxes[:, 3].clamp_(min=0, max=h)
    return boxes


def scale_boxes_(boxes: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """Multiply x coordinates by ``scale_x`` and y by ``scale_y``, in place (float32 arithmetic)."""
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    return boxes


# ---------------------------------------------------------------- RPN


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """[len(sizes)*len(ratios), 4] anchors centred at 0, size-major; ratio = h/w."""
    out = []
    for size in sizes:
        area = size**2.0
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out)


def grid_anchors(cell: Tensor, grid_hw: tuple[int, int], stride: int = 16) -> Tensor:
    """All anchors of a feature map, flattened in (y, x, anchor) order; cell (x, y) is centred at (16x, 16y)."""
    gh, gw = grid_hw
    sx = torch.arange(0, gw * stride, step=stride, dtype=torch.float32, device=cell.device)
    sy = torch.arange(0, gh * stride, step=stride, dtype=torch.float32, device=cell.device)
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack((xx, yy, xx, yy), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    def __init__(self, cin: int, hidden: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv(x))
        return self.objectness_logits(h), self.anchor_deltas(h)


class RPN(nn.Module):
    """Region proposals: top-k by objectness, clip, drop empty, NMS, keep ``post_nms_topk``."""

    def __init__(self, cfg: BUTDConfig):
        super().__init__()
        self.cfg = cfg
        self.head = RPNHead(cfg.res4_channels, cfg.rpn_channels, cfg.num_anchors)
        self._cell = cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)

    def forward(self, res4: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        """Per image: (proposals [R,4] float32 in resized-image coords, objectness logits [R]), best first.

        The head runs in float32 even under autocast: objectness ranks 6000 of ~26k anchors.
        """
        with torch.autocast(device_type=res4.device.type, enabled=False):
            logits, deltas = self.head(res4.float())
        n, a, gh, gw = logits.shape
        logits = logits.float().permute(0, 2, 3, 1).reshape(n, -1)
        deltas = deltas.float().view(n, a, 4, gh, gw).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        anchors = grid_anchors(self._cell.to(res4.device), (gh, gw))
        cfg = self.cfg
        out = []
        for i, hw in enumerate(image_sizes):
            boxes = apply_deltas(deltas[i], anchors, RPN_BOX_WEIGHTS)
            k = min(cfg.rpn_pre_nms_topk, logits.shape[1])
            scores, order = logits[i].sort(descending=True)  # sort, as upstream: same order among ties
            scores, order = scores[:k], order[:k]
            boxes = clip_boxes_(boxes[order], hw)
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if not bool(nonempty.all()):
                boxes, scores = boxes[nonempty], scores[nonempty]
            keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), cfg.rpn_nms_thresh)
            keep = keep[: cfg.rpn_post_nms_topk]
            out.append((boxes[keep], scores[keep]))
        return out


# ---------------------------------------------------------------- RoI head


class BoxPredictor(nn.Module):
    """Class logits, class-specific box deltas and attribute logits from the pooled feature."""

    def __init__(self, cfg: BUTDConfig):
        super().__init__()
        d, c = cfg.feature_dim, cfg.num_classes
        self.cls_score = nn.Linear(d, c + 1)
        self.bbox_pred = nn.Linear(d, c * 4)
        self.cls_embedding = nn.Embedding(c + 1, cfg.attr_embed_dim)
        self.fc_attr = nn.Linear(d + cfg.attr_embed_dim, cfg.attr_hidden_dim)
        self.attr_score = nn.Linear(cfg.attr_hidden_dim, cfg.num_attributes + 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls_logits = self.cls_score(x)
        deltas = self.bbox_pred(x)
        emb = self.cls_embedding(cls_logits.argmax(dim=1))  # argmax over all classes, background included
        attr_logits = self.attr_score(F.relu(self.fc_attr(torch.cat([x, emb.to(x.dtype)], dim=1))))
        return cls_logits, deltas, attr_logits


class Res5RoIHeads(nn.Module):
    """RoIPool on res4, res5 at stride 1 with dilation, mean over the 14x14 grid, box predictor."""

    def __init__(self, cfg: BUTDConfig):
        super().__init__()
        b = cfg.bottleneck_channels
        self.res5 = make_stage(cfg.res5_blocks, 16 * b, 8 * b, 32 * b, stride=1, dilation=cfg.res5_dilation)
        self.box_predictor = BoxPredictor(cfg)
        self.pooler = RoIPool((cfg.pooler_resolution, cfg.pooler_resolution), spatial_scale=1.0 / 16)

    def features(self, res4: Tensor, boxes: Tensor, chunk: int | None = None) -> Tensor:
        """Pooled 2048-d features of boxes [R,4] (resized-image coords) on one image's res4 [1,C,H,W]."""
        boxes = boxes.float()  # kept in float32 under autocast: RoIPool rounds coordinates
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
        if len(rois) == 0:
            return res4.new_zeros(0, self.box_predictor.cls_score.in_features)
        step = chunk or len(rois)
        pool_input = res4.float()  # max-pooling is exact in any dtype; rois stay float32
        parts = [
            self.res5(self.pooler(pool_input, rois[s : s + step]).to(res4.dtype)).mean(dim=[2, 3])
            for s in range(0, len(rois), step)
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------- images


def decode_image(source: str | Path | bytes | BinaryIO) -> np.ndarray:
    """Decode an image file to uint8 BGR HxWx3, like ``cv2.imread`` (EXIF orientation applied)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        im = ImageOps.exif_transpose(im)
        rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def resized_hw(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge``: short side to ``min_size``, long side capped at ``max_size``."""
    scale = min_size * 1.0 / min(h, w)
    if h < w:
        newh, neww = min_size, scale * w
    else:
        newh, neww = scale * h, min_size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_bgr(bgr: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """Pillow bilinear resize of a uint8 HxWx3 image (as the detectron2 port does)."""
    h, w = bgr.shape[:2]
    nh, nw = resized_hw(h, w, min_size, max_size)
    if (nh, nw) == (h, w):
        return bgr
    return np.asarray(Image.fromarray(bgr).resize((nw, nh), Image.BILINEAR))


def _check_image(img: np.ndarray, i: int) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise VlprepError(f"image {i}: expected a uint8 HxWx3 BGR array (see decode_image), got {desc}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise VlprepError(f"image {i}: empty image {img.shape}")
    return img


# ---------------------------------------------------------------- detector


@dataclass(frozen=True)
class _Item:
    index: int  # position in the caller's list
    image_hw: tuple[int, int]
    resized_hw: tuple[int, int]


class BUTDDetector(nn.Module):
    """The full model plus a batching-invariant extraction API (:meth:`extract`, :meth:`extract_multi`).

    Run options (set with :meth:`configure`): ``device``; ``autocast_dtype`` (torch.bfloat16 or
    torch.float16, CUDA only); ``channels_last`` (CUDA only); ``roi_chunk`` (max RoIs per res5 call).
    """

    def __init__(self, cfg: BUTDConfig | None = None):
        super().__init__()
        self.cfg = cfg or BUTDConfig()
        self.backbone = ResNetC4(self.cfg)
        self.rpn = RPN(self.cfg)
        self.roi_heads = Res5RoIHeads(self.cfg)
        self.weights: wts.Resolved | None = None  # where the weights came from (is_random for random:<seed>)
        self.autocast_dtype: torch.dtype | None = None
        self.channels_last = False
        self.roi_chunk: int | None = None
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.roi_heads.box_predictor.cls_score.weight.device

    @property
    def is_random(self) -> bool:
        return bool(self.weights and self.weights.is_random)

    def configure(
        self,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        channels_last: bool = False,
        roi_chunk: int | None = None,
    ) -> BUTDDetector:
        """Set run options (see the class docstring); returns self."""
        if device is not None:
            self.to(device)
        if isinstance(autocast_dtype, str):
            names = {
                "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16,
                "fp16": torch.float16,
                "float16": torch.float16,
                "fp32": None,
                "float32": None,
                "none": None,
            }
            if autocast_dtype.lower() not in names:
                raise VlprepError(f"autocast dtype {autocast_dtype!r}: use bf16, fp16 or fp32")
            autocast_dtype = names[autocast_dtype.lower()]
        if (autocast_dtype is not None or channels_last) and self.device.type != "cuda":
            raise VlprepError(
                "autocast and channels_last are CUDA-only options; use device='cuda' or drop them"
            )
        if autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise VlprepError(f"autocast dtype {autocast_dtype}: use torch.bfloat16 or torch.float16")
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.roi_chunk = roi_chunk
        return self

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _plan(
        self, images: Sequence[np.ndarray], min_size: int, max_size: int, batch_size: int
    ) -> list[list[_Item]]:
        """Batches of images with equal resized size (so no padding ever reaches the backbone)."""
        by_size: dict[tuple[int, int], list[_Item]] = {}
        for i, img in enumerate(images):
            h, w = _check_image(img, i).shape[:2]
            item = _Item(i, (h, w), resized_hw(h, w, min_size, max_size))
            by_size.setdefault(item.resized_hw, []).append(item)
        return [
            items[s : s + batch_size] for items in by_size.values() for s in range(0, len(items), batch_size)
        ]

    def _backbone(
        self, images: Sequence[np.ndarray], batch: list[_Item], min_size: int, max_size: int
    ) -> Tensor:
        """res4 of a batch: Pillow resize, float32 CHW minus the pixel mean, stacked."""
        mean = torch.tensor(self.cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1)
        tensors = []
        for item in batch:
            resized = resize_bgr(np.ascontiguousarray(images[item.index]), min_size, max_size)
            tensors.append(torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1)) - mean)
        x = torch.stack(tensors)
        if self.device.type == "cuda":
            x = x.pin_memory()  # page-locked, so the copy below overlaps with work already queued
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _roi_outputs(self, res4: Tensor, boxes: Tensor, p: _Item, given: Tensor | None = None) -> RoIOutputs:
        """Run the RoI head on one image's boxes (resized coords); outputs on CPU, float32.

        Under autocast only res5 runs in reduced precision; the box predictor runs in float32.
        """
        heads = self.roi_heads
        feats = heads.features(res4, boxes, self.roi_chunk).float()
        with torch.autocast(device_type=feats.device.type, enabled=False):
            cls_logits, deltas, attr_logits = heads.box_predictor(feats)
        pred_boxes = apply_deltas(deltas.float(), boxes.float(), ROI_BOX_WEIGHTS)
        return RoIOutputs(
            boxes=boxes.float().cpu(),
            features=feats.cpu(),
            cls_logits=cls_logits.float().cpu(),
            attr_logits=attr_logits.float().cpu(),
            pred_boxes=pred_boxes.cpu(),
            image_hw=p.image_hw,
            resized_hw=p.resized_hw,
            given_boxes=given,
        )

    @torch.inference_mode()
    def roi_outputs(
        self,
        images: Sequence[np.ndarray],
        *,
        min_size: int = 600,
        max_size: int = 1000,
        boxes: Sequence[np.ndarray] | None = None,
        batch_size: int = 8,
    ) -> list[RoIOutputs]:
        """RoI-head outputs per image for all RPN proposals, or for ``boxes`` (original pixels) if given."""
        if boxes is not None and len(boxes) != len(images):
            raise VlprepError(
                f"{len(boxes)} box arrays for {len(images)} images: pass one [K,4] array per image"
            )
        out: list[RoIOutputs | None] = [None] * len(images)
        with self._autocast():
            for batch in self._plan(images, min_size, max_size, batch_size):
                res4 = self._backbone(images, batch, min_size, max_size)
                proposals = self.rpn(res4, [p.resized_hw for p in batch]) if boxes is None else None
                for k, p in enumerate(batch):
                    if proposals is not None:
                        out[p.index] = self._roi_outputs(res4[k : k + 1], proposals[k][0], p)
                    else:
                        rois, original = self._given_rois(boxes[p.index], p)
                        out[p.index] = self._roi_outputs(res4[k : k + 1], rois, p, original)
        return out  # type: ignore[return-value]

    def _given_rois(self, boxes: np.ndarray, p: _Item) -> tuple[Tensor, Tensor]:
        """(boxes scaled to the resized image on the model's device, the original boxes as float32)."""
        given = torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        (h, w), (nh, nw) = p.image_hw, p.resized_hw
        return scale_boxes_(given.clone(), nw / w, nh / h).to(self.device), given

    def extract(
        self,
        images: Sequence[np.ndarray],
        recipe: Recipe | str,
        *,
        boxes: Sequence[np.ndarray] | None = None,
        batch_size: int = 8,
    ) -> list[dict[str, Any]]:
        """Regions of each image (uint8 BGR HxWx3) under one recipe; one result dict per image, in order.

        ``boxes``: per-image [K,4] boxes in original pixels, for the ``given-boxes`` recipe (without
        them that recipe uses its ``grid``). See :mod:`vlprep.models.butd_recipes` for the result keys.
        """
        recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        return [
            r[recipe.name] for r in self.extract_multi(images, [recipe], boxes=boxes, batch_size=batch_size)
        ]

    @torch.inference_mode()
    def extract_multi(
        self,
        images: Sequence[np.ndarray],
        recipes: Sequence[Recipe | str],
        *,
        boxes: Sequence[np.ndarray] | None = None,
        batch_size: int = 8,
    ) -> list[dict[str, dict[str, Any]]]:
        """Several recipes at once, sharing the backbone, proposals and RoI features where their resize
        sizes agree. Returns per image ``{recipe.name: result}``."""
        recipes = [get_recipe(r) if isinstance(r, str) else r for r in recipes]
        names = [r.name for r in recipes]
        if len(set(names)) != len(names):
            raise VlprepError(
                f"recipes {names}: names must be distinct (rename one with replace(r, name=...))"
            )
        if boxes is not None and len(boxes) != len(images):
            raise VlprepError(
                f"{len(boxes)} box arrays for {len(images)} images: pass one [K,4] array per image"
            )
        results: list[dict[str, dict[str, Any]]] = [{} for _ in images]
        groups: dict[tuple[int, int], list[Recipe]] = {}
        for r in recipes:
            groups.setdefault((r.min_size, r.max_size), []).append(r)
        with self._autocast():
            for (min_size, max_size), group in groups.items():
                on_proposals = [r for r in group if not r.uses_given_boxes]
                on_given = [r for r in group if r.uses_given_boxes]
                for batch in self._plan(images, min_size, max_size, batch_size):
                    res4 = self._backbone(images, batch, min_size, max_size)
                    proposals = self.rpn(res4, [p.resized_hw for p in batch]) if on_proposals else None
                    for k, p in enumerate(batch):
                        feat = res4[k : k + 1]
                        if proposals is not None:
                            outs = self._roi_outputs(feat, proposals[k][0], p)
                            for r in on_proposals:
                                results[p.index][r.name] = r.select(outs)
                        for r in on_given:
                            given = boxes[p.index] if boxes is not None else r.default_boxes(*p.image_hw)
                            rois, original = self._given_rois(given, p)
                            outs = self._roi_outputs(feat, rois, p, original)
                            results[p.index][r.name] = r.select(outs)
        return results


# ---------------------------------------------------------------- weights


# detectron2 name prefix -> name prefix here. Every other name is identical.
_D2_PREFIXES = (("proposal_generator.rpn_head.", "rpn.head."),)
# detectron2 buffers derived from the config, not stored here.
_D2_IGNORED = ("proposal_generator.anchor_generator.cell_anchors.",)


def d2_to_vlprep_key(name: str) -> str | None:
    """Map a detectron2 state-dict name to this module's name (None: a derived buffer to ignore).

    ``proposal_generator.rpn_head.X`` -> ``rpn.head.X``; ``proposal_generator.anchor_generator.cell_anchors.*``
    -> ignored; every other name (``backbone.*``, ``roi_heads.res5.*``, ``roi_heads.box_predictor.*``) is
    unchanged. Names already in this module's form pass through unchanged.
    """
    if name.startswith(_D2_IGNORED):
        return None
    for d2, ours in _D2_PREFIXES:
        if name.startswith(d2):
            return ours + name[len(d2) :]
    return name


def vlprep_to_d2_key(name: str) -> str:
    """Inverse of :func:`d2_to_vlprep_key`."""
    for d2, ours in _D2_PREFIXES:
        if name.startswith(ours):
            return d2 + name[len(ours) :]
    return name


def to_d2_state_dict(model: BUTDDetector) -> dict[str, Tensor]:
    """The model's tensors under detectron2 names (as in ``faster_rcnn_from_caffe_attr.pkl``)."""
    return {vlprep_to_d2_key(k): v.detach().clone() for k, v in model.state_dict().items()}


def load_state(model: BUTDDetector, arrays: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load name -> array/tensor (detectron2 or vlprep names) into the model, strictly.

    Arrays are cast to float32 (the zoo pickles may be float16). A FrozenBN without running
    statistics gets mean 0 / var 1, as detectron2 does for converted Caffe models; any other missing
    or unexpected name, or a shape mismatch, is an error naming a few of them.
    """
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for name, value in arrays.items():
        key = d2_to_vlprep_key(str(name))
        if key is None:
            continue
        if key not in own:
            unexpected.append(str(name))
            continue
        t = value if isinstance(value, Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        mapped[key] = t.to(torch.float32)
    missing = [k for k in own if k not in mapped]
    filled = [k for k in missing if k.endswith((".norm.running_mean", ".norm.running_var"))]
    for k in filled:
        mapped[k] = torch.zeros_like(own[k]) if k.endswith("running_mean") else torch.ones_like(own[k])
    missing = [k for k in missing if k not in filled]
    bad_shape = [
        f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing (e.g. {', '.join(vlprep_to_d2_key(k) for k in missing[:4])})"
        )
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} with wrong shapes (e.g. {'; '.join(bad_shape[:3])})")
    if problems:
        raise VlprepError(
            f"{source}: does not match the BUTD R-101-C4 attribute architecture ({model.cfg.num_classes} classes): "
            + "; ".join(problems)
            + ". Expected detectron2 names such as backbone.res4.0.conv1.weight (Caffe2/Detectron blob names are "
            "not converted)."
        )
    if filled:
        log.warning(
            "%s: no running statistics for %d FrozenBN layers; using mean 0, var 1", source, len(filled) // 2
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(mapped[k])


def init_random(model: BUTDDetector, seed: int) -> None:
    """Deterministic random weights in the real architecture (for offline tests and demos, not a model).

    Convs: He normal (fan out); RPN convs N(0, 0.01); FrozenBN identity, except the last norm of each
    residual branch (weight 0.2) so activations stay bounded; linear layers small normals.
    """
    g = torch.Generator().manual_seed(int(seed))
    stds = {
        "rpn.head.": 0.01,
        "roi_heads.box_predictor.cls_score.": 0.05,
        "roi_heads.box_predictor.bbox_pred.": 0.001,
        "roi_heads.box_predictor.cls_embedding.": 1.0,
        "roi_heads.box_predictor.fc_attr.": 0.02,
        "roi_heads.box_predictor.attr_score.": 0.05,
    }
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.fill_(0.2 if ".conv3." in name else 1.0)
            elif name.endswith("running_var"):
                t.fill_(1.0)
            elif name.endswith(("norm.bias", "running_mean")) or name.endswith(".bias"):
                t.zero_()
            else:
                std = next((s for prefix, s in stds.items() if name.startswith(prefix)), None)
                if std is None:  # backbone / res5 convs
                    std = math.sqrt(2.0 / (t.shape[0] * t[0, 0].numel()))
                t.copy_(torch.randn(t.shape, generator=g) * std)


def load_detector(
    weights: str | Path = wts.BUTD_VG_ATTR_WEIGHTS,
    *,
    config: BUTDConfig | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    cache_dir: str | Path | None = None,
) -> BUTDDetector:
    """Build the detector and load ``weights`` (a spec: URL, gs://, local path or ``random:<seed>``)."""
    model = BUTDDetector(config)
    resolved = wts.resolve(weights, cache_dir=cache_dir)
    if resolved.is_random:
        init_random(model, resolved.seed or 0)
        log.warning("BUTD detector uses RANDOM weights (%s): features are not meaningful", resolved.spec)
    else:
        arrays, layout = wts.load_checkpoint(resolved.path)
        load_state(model, arrays, source=str(resolved.path))
        log.info("BUTD weights from %s (%s layout)", resolved.describe(), layout)
    model.weights = resolved
    return model.configure(device=device, autocast_dtype=autocast_dtype, channels_last=channels_last)


__all__ = [
    "BUTDConfig",
    "BUTDDetector",
    "load_detector",
    "load_state",
    "init_random",
    "to_d2_state_dict",
    "d2_to_vlprep_key",
    "vlprep_to_d2_key",
    "decode_image",
    "resize_bgr",
    "resized_hw",
    "grid_boxes",
    "apply_deltas",
]
