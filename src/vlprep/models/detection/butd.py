"""Visual Genome bottom-up-attention Faster R-CNN (ResNet-101 C4, 1600 objects, 400 attributes).

A plain torch + torchvision.ops reimplementation of the detectron2 port of BUTD
(airsplay/py-bottom-up-attention, ``faster_rcnn_R_101_C4_attr_caffemaxpool.yaml``), numerically
matching it on the golden fixtures (``shared/fixtures/butd``):

- input: uint8 BGR, shortest-edge resize with Pillow bilinear, minus the Caffe pixel mean (std 1);
- backbone: Caffe stem (7x7/2 conv, FrozenBN, ReLU, 3x3/2 max-pool with ``ceil_mode``) and res2..res4
  bottlenecks, stride in the first 1x1 conv; FrozenBN uses running_mean/var with eps 1e-5;
- RPN: 12 anchors per cell (sizes 64..512 x ratios 0.5/1/2, size-major), top 6000 -> clip ->
  NMS 0.7 -> 300 proposals;
- RoI head: RoIPool 14x14 at 1/16 -> res5 (stride 1, dilation 2) -> mean -> 2048-d feature;
  ``cls_score`` 1601 (background LAST), class-specific ``bbox_pred`` (weights 10,10,5,5) and the
  attribute branch (embedding of the argmax over all 1601 logits, concat, 512, ReLU, 401 with
  no-attribute LAST).

Parameter names equal detectron2's, except ``proposal_generator.rpn_head.*`` which is ``rpn.head.*``
here (:data:`~vlprep.models.detection.checkpoints.D2_KEYS`); the anchor buffer is not stored.
Box selection (which proposals become the image's regions) lives in :mod:`.selection`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlprep import VlprepError
from vlprep.models import weights as wts
from vlprep.models.detection import checkpoints
from vlprep.models.detection.batching import Detector, Item, buckets
from vlprep.models.detection.boxes import apply_deltas, scale_boxes
from vlprep.models.detection.outputs import RoIOutputs
from vlprep.models.detection.preprocess import PIXEL_MEAN_BGR, check_bgr, resize_bgr, resized_hw
from vlprep.models.detection.resnet import BlockStyle, ResNet, Stem, make_stage, make_stages
from vlprep.models.detection.roi_heads import BoxPredictor, Res5Head
from vlprep.models.detection.rpn import C4RPN, ProposalParams, RPNHead, cell_anchors
from vlprep.models.detection.selection import Recipe, get_recipe

log = logging.getLogger(__name__)

ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


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


# Random-init stds by parameter prefix (everything else: He normal), see checkpoints.init_random.
_RANDOM_STDS = {
    "rpn.head.": 0.01,
    "roi_heads.box_predictor.cls_score.": 0.05,
    "roi_heads.box_predictor.bbox_pred.": 0.001,
    "roi_heads.box_predictor.cls_embedding.": 1.0,
    "roi_heads.box_predictor.fc_attr.": 0.02,
    "roi_heads.box_predictor.attr_score.": 0.05,
}


class BUTDDetector(Detector):
    """The full model plus a batching-invariant extraction API (:meth:`extract`, :meth:`extract_multi`).

    Images are bucketed by resized size, so no padding ever reaches the backbone and an image's regions
    do not depend on the other images of the call. Run options: see :class:`.batching.Detector`.
    """

    def __init__(self, cfg: BUTDConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or BUTDConfig()
        b = cfg.bottleneck_channels
        style = BlockStyle()
        self.backbone = ResNet(
            Stem(cfg.stem_channels, caffe_pool=True),
            make_stages(cfg.stem_channels, cfg.stage_blocks, b, 4 * b, style),
        )
        params = ProposalParams(cfg.rpn_pre_nms_topk, cfg.rpn_post_nms_topk, cfg.rpn_nms_thresh)
        head = RPNHead(cfg.res4_channels, cfg.rpn_channels, cfg.num_anchors)
        self.rpn = C4RPN(head, cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios), 16, params)
        res5 = make_stage(
            cfg.res5_blocks, 16 * b, 8 * b, 32 * b, stride=1, dilation=cfg.res5_dilation, style=style
        )
        predictor = BoxPredictor(
            cfg.feature_dim, cfg.num_classes, cfg.num_attributes, cfg.attr_embed_dim, cfg.attr_hidden_dim
        )
        self.roi_heads = Res5Head(res5, predictor, cfg.pooler_resolution)
        self.freeze()

    def _backbone(
        self, images: Sequence[np.ndarray], batch: list[Item], min_size: int, max_size: int
    ) -> Tensor:
        """res4 of a batch: Pillow resize, float32 CHW minus the pixel mean, stacked."""
        mean = torch.tensor(self.cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1)
        tensors = []
        for item in batch:
            resized = resize_bgr(np.ascontiguousarray(images[item.index]), min_size, max_size)
            tensors.append(torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1)) - mean)
        return self.backbone(self.to_input(torch.stack(tensors)))[-1]

    def _roi_outputs(self, res4: Tensor, boxes: Tensor, p: Item, given: Tensor | None = None) -> RoIOutputs:
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
            pred_boxes=pred_boxes.cpu(),
            image_hw=p.image_hw,
            resized_hw=p.input_hw,
            attr_logits=None if attr_logits is None else attr_logits.float().cpu(),
            given_boxes=given,
        )

    def _given_rois(self, boxes: np.ndarray, p: Item) -> tuple[Tensor, Tensor]:
        """(boxes scaled to the resized image on the model's device, the original boxes as float32)."""
        given = torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        (h, w), (nh, nw) = p.image_hw, p.input_hw
        return scale_boxes(given, nw / w, nh / h).to(self.device), given

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
        them that recipe uses its ``grid``). See :mod:`.selection` for the result keys.
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
        shapes = [check_bgr(img, i).shape[:2] for i, img in enumerate(images)]
        results: list[dict[str, dict[str, Any]]] = [{} for _ in images]
        groups: dict[tuple[int, int], list[Recipe]] = {}
        for r in recipes:
            groups.setdefault((r.min_size, r.max_size), []).append(r)
        with self.autocast():
            for (min_size, max_size), group in groups.items():
                items = [Item(i, hw, resized_hw(*hw, min_size, max_size)) for i, hw in enumerate(shapes)]
                for batch in buckets(items, batch_size):
                    res4 = self._backbone(images, batch, min_size, max_size)
                    self._select(res4, batch, group, boxes, results)
        return results

    def _select(
        self,
        res4: Tensor,
        batch: list[Item],
        recipes: list[Recipe],
        boxes: Sequence[np.ndarray] | None,
        results: list[dict[str, dict[str, Any]]],
    ) -> None:
        """Run each recipe of one resize group on a batch's res4, into ``results``."""
        on_proposals = [r for r in recipes if not r.uses_given_boxes]
        on_given = [r for r in recipes if r.uses_given_boxes]
        proposals = self.rpn(res4, [p.input_hw for p in batch]) if on_proposals else None
        for k, p in enumerate(batch):
            feat = res4[k : k + 1]
            if proposals is not None:
                outs = self._roi_outputs(feat, proposals[k][0], p)
                for r in on_proposals:
                    results[p.index][r.name] = r.select(outs)
            for r in on_given:
                given = boxes[p.index] if boxes is not None else r.default_boxes(*p.image_hw)
                rois, original = self._given_rois(given, p)
                results[p.index][r.name] = r.select(self._roi_outputs(feat, rois, p, original))


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
    resolved = wts.resolve(weights, cache_dir=cache_dir, model="butd")
    if resolved.is_random:
        checkpoints.init_random(model, resolved.seed or 0, _RANDOM_STDS)
        log.warning("BUTD detector uses RANDOM weights (%s): features are not meaningful", resolved.spec)
    else:
        arrays, layout = wts.load_checkpoint(resolved.path)
        load_state(model, arrays, source=str(resolved.path))
        log.info("BUTD weights from %s (%s layout)", resolved.describe(), layout)
    model.weights = resolved
    return model.configure(device=device, autocast_dtype=autocast_dtype, channels_last=channels_last)


def load_state(model: BUTDDetector, arrays: dict[str, Any], source: str = "checkpoint") -> None:
    """Load name -> array (detectron2 names, or the model's own) into ``model`` strictly; a FrozenBN
    without statistics gets mean 0 / var 1, as detectron2 does for converted Caffe models."""
    what = f"BUTD R-101-C4 attribute architecture ({model.cfg.num_classes} classes)"
    checkpoints.load_state(model, arrays, checkpoints.D2_KEYS, source=source, what=what, fill_bn_stats=True)
