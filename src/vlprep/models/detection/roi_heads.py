"""RoI heads: BUTD's res5 head on RoIPool (with an optional attribute branch) and maskrcnn-benchmark's
FPN 2-layer MLP head on multi-level RoIAlign. Both take one image's features and boxes in input pixels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import RoIPool, roi_align

from vlprep.models.detection.boxes import area_plus_one


def _rois(boxes: Tensor) -> Tensor:
    """[R,4] boxes of image 0 -> [R,5] RoIs (batch index first), float32."""
    boxes = boxes.float()
    return torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)


class BoxPredictor(nn.Module):
    """Class logits [C+1] (background last), class-specific box deltas [4C] and, when
    ``num_attributes`` > 0, attribute logits [A+1] (no-attribute last) from an embedding of the
    argmax over all class logits (background included) concatenated with the feature."""

    def __init__(
        self, dim: int, num_classes: int, num_attributes: int = 0, embed_dim: int = 0, hidden_dim: int = 0
    ):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)
        self.has_attributes = num_attributes > 0
        if self.has_attributes:
            self.cls_embedding = nn.Embedding(num_classes + 1, embed_dim)
            self.fc_attr = nn.Linear(dim + embed_dim, hidden_dim)
            self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        cls_logits = self.cls_score(x)
        deltas = self.bbox_pred(x)
        if not self.has_attributes:
            return cls_logits, deltas, None
        emb = self.cls_embedding(cls_logits.argmax(dim=1))
        attr_logits = self.attr_score(F.relu(self.fc_attr(torch.cat([x, emb.to(x.dtype)], dim=1))))
        return cls_logits, deltas, attr_logits


class Res5Head(nn.Module):
    """RoIPool (``resolution`` at ``1/stride``) -> res5 stage -> mean over the grid -> predictor."""

    def __init__(self, res5: nn.Module, predictor: BoxPredictor, resolution: int, stride: int = 16):
        super().__init__()
        self.res5 = res5
        self.box_predictor = predictor
        self.pooler = RoIPool((resolution, resolution), spatial_scale=1.0 / stride)

    def features(self, feat: Tensor, boxes: Tensor, chunk: int | None = None) -> Tensor:
        """Pooled features [R,D] of boxes [R,4] on one image's feature map [1,C,H,W], ``chunk`` RoIs per
        res5 call. RoIs stay float32 under autocast (RoIPool rounds coordinates) and pooling runs on
        float32 input (max-pooling is exact in any dtype)."""
        rois = _rois(boxes)
        if len(rois) == 0:
            return feat.new_zeros(0, self.box_predictor.cls_score.in_features)
        step = chunk or len(rois)
        pool_input = feat.float()
        parts = [
            self.res5(self.pooler(pool_input, rois[s : s + step]).to(feat.dtype)).mean(dim=[2, 3])
            for s in range(0, len(rois), step)
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class LevelRoIAlign(nn.Module):
    """maskrcnn-benchmark's multi-level pooler: each box goes to level
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale + 1e-6))`` (area with "+1" sides),
    clamped to the pooled levels, then ``roi_align(aligned=False)`` at that level's scale.

    (``torchvision.ops.MultiScaleRoIAlign`` maps levels with areas without +1 and the epsilon outside
    the log, so it assigns some boxes another level.)"""

    def __init__(
        self,
        resolution: int,
        scales: Sequence[float],
        sampling_ratio: int,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.resolution, self.scales, self.sampling_ratio = resolution, tuple(scales), sampling_ratio
        self.k_min, self.k_max = -math.log2(scales[0]), -math.log2(scales[-1])
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level

    def levels(self, boxes: Tensor) -> Tensor:
        """Index into ``scales`` for each box [R,4]."""
        s = torch.sqrt(area_plus_one(boxes))
        lvl = torch.floor(self.canonical_level + torch.log2(s / self.canonical_scale + 1e-6))
        return torch.clamp(lvl, min=self.k_min, max=self.k_max).to(torch.int64) - int(self.k_min)

    def forward(self, feats: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """[R, C, r, r] from one image's levels (each [1,C,H,W], finest first) and boxes [R,4]."""
        rois, levels = _rois(boxes), self.levels(boxes.float())
        r = self.resolution
        out = feats[0].new_zeros(len(rois), feats[0].shape[1], r, r)
        for k, scale in enumerate(self.scales):
            idx = torch.nonzero(levels == k).squeeze(1)
            if len(idx):
                out[idx] = roi_align(feats[k], rois[idx], (r, r), scale, self.sampling_ratio, aligned=False)
        return out


class MLPHead(nn.Module):
    """maskrcnn-benchmark's ``FPN2MLPFeatureExtractor`` (pooler, ``fc6``, ``fc7``, ReLU after each) and
    ``FPNPredictor``'s ``cls_score``; its ``bbox_pred`` is not built (no X-LXMERT recipe uses it)."""

    def __init__(self, pooler: LevelRoIAlign, channels: int, dim: int, num_classes: int):
        super().__init__()
        self.pooler = pooler
        self.fc6 = nn.Linear(channels * pooler.resolution**2, dim)
        self.fc7 = nn.Linear(dim, dim)
        self.cls_score = nn.Linear(dim, num_classes)

    def forward(
        self, feats: Sequence[Tensor], boxes: Tensor, *, scores: bool
    ) -> tuple[Tensor, Tensor | None]:
        """(fc6 [R,dim], class logits [R,num_classes] when ``scores``) for one image, in float32."""
        with torch.autocast(device_type=boxes.device.type, enabled=False):
            pooled = self.pooler([f.float() for f in feats], boxes)
            fc6 = F.relu(self.fc6(pooled.view(len(pooled), -1)))
            logits = self.cls_score(F.relu(self.fc7(fc6))) if scores else None
        return fc6, logits
