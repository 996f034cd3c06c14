"""X-LXMERT's detector: Visual Genome Faster R-CNN ResNeXt-152 32x8d FPN (vqa-maskrcnn-benchmark).

A plain torch + torchvision.ops reimplementation of the model vilbert-multi-task publishes
(``detectron_model.pth`` + ``detectron_config.yaml``) as Vedanuj Goswami's maskrcnn-benchmark fork
builds it, and of X-LXMERT's two feature recipes (``feature_extraction/coco_extract_grid_feature.py``,
``coco_extract_bbox_feature.py``), matching them on the golden fixtures (``shared/fixtures/x152``):

- MSRA stem and ResNeXt bottlenecks (32 groups, stride in the 3x3), frozen BN without eps
  (``x * w/sqrt(var) + (b - mean * w/sqrt(var))``); FPN 512 with nearest x2 top-down and
  P6 = ``max_pool2d(P5, 1, 2, 0)``;
- RPN: 3 anchors per cell and level (Detectron anchors), per level sigmoid top-1000, "+1" box
  decoding, clip to ``w - 1``, the fork's "+1" NMS at 0.7, then the top 1000 over all levels;
- box head: multi-level RoIAlign 7x7 (sampling 2, ``aligned=False``, level mapper with "+1" areas),
  ``fc6`` -> ReLU -> ``fc7`` -> ReLU -> ``cls_score`` (1601, background FIRST).

Recipes (:data:`RECIPES`; images are uint8 BGR HxWx3, as :func:`vlprep.data.images.decode_bgr` gives):

- ``grid8``: float BGR minus mean, cv2-linear resize to ``int(scale*side)`` floored to /32 each
  (``imsize=N``: NxN), no padding; a fixed 8x8 grid of whole-pixel cells; fc6 -> [8,8,2048].
  Result: ``features`` float32 [8,8,D], ``img_w``, ``img_h``, ``recipe``.
- ``boxes36``: aspect-preserving resize (``fx = fy = scale``), zero-padded to /32 (the fork records the
  PADDED size as the image size, so proposals are clipped to the padded canvas); per class 1..1600 the
  fork's NMS at 0.5 over the proposals in original pixels -> ``max_conf`` -> top 36.
  Result: ``features`` float32 [36,D] (fc6), ``obj_id`` int64 [36] (0-based over the 1600 foreground
  classes), ``boxes`` float32 [36,4] (original pixels, may pass the image's edge), ``img_w``,
  ``img_h``, and ``num_boxes`` (how many have ``max_conf > 0``; upstream asserts 36), ``obj_conf``,
  ``max_conf``, ``proposal_idx``, ``recipe``.

Both recipes have ``exif = False``: upstream reads images with ``PIL.Image.open``, which does not apply
the EXIF orientation.
"""

from __future__ import annotations

import dataclasses
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
from vlprep.models.detection import checkpoints, preprocess
from vlprep.models.detection.batching import Detector, Item, buckets, padded_hw, stack_padded
from vlprep.models.detection.boxes import cell_grid_boxes, nms_plus_one_masks
from vlprep.models.detection.fpn import FPN
from vlprep.models.detection.layers import FoldedFrozenBatchNorm2d
from vlprep.models.detection.resnet import BlockStyle, ResNet, Stem, make_stages
from vlprep.models.detection.roi_heads import LevelRoIAlign, MLPHead
from vlprep.models.detection.rpn import FPNRPN, ProposalParams, RPNHead, detectron_cell_anchors
from vlprep.models.detection.x152_config import X152Config, check, config_from_yaml

log = logging.getLogger(__name__)

XLXMERT_WEIGHTS = "https://dl.fbaipublicfiles.com/vilbert-multi-task/detectron_model.pth"
XLXMERT_CONFIG = "https://dl.fbaipublicfiles.com/vilbert-multi-task/detectron_config.yaml"


@dataclass(frozen=True, kw_only=True)
class GridRecipe:
    """X-LXMERT grid features: fc6 of a ``grid`` x ``grid`` grid of cells (``imsize``: NxN input)."""

    name: str = "grid8"
    grid: int = 8
    imsize: int | None = None
    exif: bool = False


@dataclass(frozen=True, kw_only=True)
class Boxes36Recipe:
    """X-LXMERT box features: fc6 of the top ``num_boxes`` RPN proposals by per-class-NMS max confidence."""

    name: str = "boxes36"
    num_boxes: int = 36
    nms_thresh: float = 0.5
    exif: bool = False


RECIPES = {r.name: r for r in (GridRecipe(), Boxes36Recipe())}


def get_recipe(name: str, **overrides: Any) -> GridRecipe | Boxes36Recipe:
    """A recipe by name, with fields overridden (e.g. ``get_recipe("grid8", imsize=448)``)."""
    if name not in RECIPES:
        raise VlprepError(f"unknown X-LXMERT recipe {name!r}; choose one of {', '.join(RECIPES)}")
    try:
        return dataclasses.replace(RECIPES[name], **overrides)
    except TypeError as e:
        raise VlprepError(f"recipe {name}: {e}") from None


_RANDOM_STDS = {"rpn.head.": 0.01, "roi_heads.fc": 0.01, "roi_heads.cls_score.": 0.05}


class X152Detector(Detector):
    """The model plus a batching-invariant extraction API (:meth:`extract`). Run options: see
    :class:`.batching.Detector` (``roi_chunk`` is unused: the box head is one fc6 per image)."""

    def __init__(self, cfg: X152Config | None = None):
        super().__init__()
        self.cfg = cfg = check(cfg or X152Config())
        norm = FoldedFrozenBatchNorm2d
        style = BlockStyle(groups=cfg.groups, stride_in_1x1=False, norm=norm)
        width, out = cfg.groups * cfg.width_per_group, cfg.res2_out_channels
        stages = make_stages(cfg.stem_channels, cfg.stage_blocks, width, out, style)
        self.backbone = ResNet(
            Stem(cfg.stem_channels, caffe_pool=False, norm=norm), stages, num_outputs=len(stages)
        )
        self.fpn = FPN([out << i for i in range(len(stages))], cfg.fpn_channels)
        cells = [
            detectron_cell_anchors(stride, (size,), cfg.anchor_ratios)
            for stride, size in zip(cfg.anchor_strides, cfg.anchor_sizes, strict=True)
        ]
        params = ProposalParams(
            cfg.rpn_pre_nms_topk,
            cfg.rpn_post_nms_topk,
            cfg.rpn_nms_thresh,
            cfg.rpn_min_size,
            cfg.rpn_levels_topk,
        )
        head = RPNHead(cfg.fpn_channels, cfg.fpn_channels, len(cfg.anchor_ratios))
        self.rpn = FPNRPN(head, cells, cfg.anchor_strides, params)
        pooler = LevelRoIAlign(cfg.pooler_resolution, cfg.pooler_scales, cfg.sampling_ratio)
        self.roi_heads = MLPHead(pooler, cfg.fpn_channels, cfg.mlp_dim, cfg.num_classes)
        self.freeze()

    def _features(self, tensors: list[Tensor], divisor: int) -> list[Tensor]:
        """FPN levels P2..P6 of a batch of [3,H,W] inputs of one (padded) size."""
        x = self.to_input(stack_padded(tensors, divisor) if divisor > 1 else torch.stack(tensors))
        return self.fpn(self.backbone(x))

    @torch.inference_mode()
    def extract(
        self,
        images: Sequence[np.ndarray],
        recipe: str | GridRecipe | Boxes36Recipe = "grid8",
        *,
        imsize: int | None = None,
        batch_size: int = 1,
    ) -> list[dict[str, Any]]:
        """One result dict per image (uint8 BGR HxWx3), in order; see the module docstring for the keys.

        ``imsize`` (grid recipes only) overrides the recipe's. Images are bucketed by the size their
        tensor has at the backbone, so an image's result does not depend on the rest of the call.
        """
        recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        if imsize is not None:
            if not isinstance(recipe, GridRecipe):
                raise VlprepError(f"imsize applies to the grid recipes, not {recipe.name}")
            recipe = dataclasses.replace(recipe, imsize=imsize)
        shapes = [preprocess.check_bgr(img, i).shape[:2] for i, img in enumerate(images)]
        results: list[dict[str, Any]] = [{} for _ in images]
        with self.autocast():
            if isinstance(recipe, GridRecipe):
                self._grid(images, shapes, recipe, batch_size, results)
            else:
                self._boxes(images, shapes, recipe, batch_size, results)
        return results

    def _input_sizes(
        self, shapes: Sequence[tuple[int, int]], recipe: GridRecipe | Boxes36Recipe
    ) -> list[Item]:
        cfg = self.cfg
        items = []
        for i, (h, w) in enumerate(shapes):
            if isinstance(recipe, GridRecipe):
                hw = preprocess.grid_input_hw(h, w, recipe.imsize, cfg.min_size, cfg.max_size)
                if hw[0] < 32 or hw[1] < 32 or hw[0] % 32 or hw[1] % 32:
                    raise VlprepError(
                        f"image {i}: grid input {hw[1]}x{hw[0]}; the FPN needs both sides multiples of 32"
                        " (imsize must be a multiple of 32)"
                    )
            else:
                hw = preprocess.boxes_input_hw(h, w, cfg.min_size, cfg.max_size)
            items.append(Item(i, (h, w), hw))
        return items

    def _grid(self, images, shapes, recipe: GridRecipe, batch_size: int, results: list) -> None:
        for batch in buckets(self._input_sizes(shapes, recipe), batch_size):
            inputs = [
                preprocess.resize_linear_cv2(preprocess.minus_mean(images[p.index]), p.input_hw)
                for p in batch
            ]
            feats = self._features(inputs, 1)
            boxes = cell_grid_boxes(*batch[0].input_hw, recipe.grid).to(self.device)
            for k, p in enumerate(batch):
                fc6, _ = self.roi_heads([f[k : k + 1] for f in feats], boxes, scores=False)
                h, w = p.image_hw
                features = fc6.cpu().numpy().reshape(recipe.grid, recipe.grid, -1)
                results[p.index] = {"features": features, "img_w": w, "img_h": h, "recipe": recipe.name}

    def _boxes(self, images, shapes, recipe: Boxes36Recipe, batch_size: int, results: list) -> None:
        cfg = self.cfg
        items = self._input_sizes(shapes, recipe)
        for batch in buckets(items, batch_size, key=lambda it: padded_hw(it.input_hw, cfg.size_divisibility)):
            scales = [preprocess.xlxmert_scale(*p.image_hw, cfg.min_size, cfg.max_size) for p in batch]
            inputs = [
                preprocess.resize_linear_cv2(preprocess.minus_mean(images[p.index]), p.input_hw, s)
                for p, s in zip(batch, scales, strict=True)
            ]
            feats = self._features(inputs, cfg.size_divisibility)
            canvas = padded_hw(batch[0].input_hw, cfg.size_divisibility)  # the fork's recorded image size
            proposals = self.rpn(feats, [canvas] * len(batch))
            for k, (p, scale) in enumerate(zip(batch, scales, strict=True)):
                boxes = proposals[k][0]
                fc6, logits = self.roi_heads([f[k : k + 1] for f in feats], boxes, scores=True)
                results[p.index] = select_boxes(
                    fc6.cpu(), logits.cpu(), boxes.cpu(), scale, p.image_hw, recipe
                )


def select_boxes(
    fc6: Tensor,
    logits: Tensor,
    proposals: Tensor,
    scale: float,
    image_hw: tuple[int, int],
    recipe: Boxes36Recipe,
) -> dict[str, Any]:
    """X-LXMERT's ``_process_feature_extraction`` for one image: softmax; for each foreground class the
    fork's NMS over the proposals in original pixels; ``max_conf`` = best kept probability (> 0);
    ``sort`` descending; the first ``num_boxes``."""
    scores = logits.softmax(dim=-1)
    dets = proposals / scale
    kept = nms_plus_one_masks(dets, scores[:, 1:].t().contiguous(), recipe.nms_thresh)
    max_conf = torch.where(kept, scores[:, 1:].t(), torch.zeros(())).amax(dim=0)
    sorted_conf, order = torch.sort(max_conf, descending=True)
    keep = order[: recipe.num_boxes]
    obj_conf, obj_id = torch.max(scores[keep, 1:], dim=1)
    h, w = image_hw
    return {
        "features": fc6[keep].numpy(),
        "obj_id": obj_id.numpy().astype(np.int64),
        "boxes": (proposals[keep] / scale).numpy(),
        "img_w": w,
        "img_h": h,
        "num_boxes": int((sorted_conf[: recipe.num_boxes] != 0).sum()),
        "obj_conf": obj_conf.numpy(),
        "max_conf": sorted_conf[: recipe.num_boxes].numpy(),
        "proposal_idx": keep.numpy(),
        "recipe": recipe.name,
    }


def load_x152(
    weights: str | Path = XLXMERT_WEIGHTS,
    config: str | Path | X152Config | None = None,
    *,
    arch: str = "full",
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    cache_dir: str | Path | None = None,
) -> X152Detector:
    """Build the detector and load ``weights`` (a spec: URL, gs://, local path or ``random:<seed>``).

    ``config``: None (the published model's values, :class:`X152Config`), an X152Config, or a spec of a
    ``detectron_config.yaml`` (e.g. :data:`XLXMERT_CONFIG`). ``arch="tiny"``: the small test variant
    (no config then).
    """
    if arch not in ("full", "tiny"):
        raise VlprepError(f"arch {arch!r}: use 'full' or 'tiny'")
    if arch == "tiny":
        if config is not None:
            raise VlprepError("arch='tiny' has its own sizes; pass no config with it")
        cfg = X152Config.tiny()
    elif isinstance(config, X152Config) or config is None:
        cfg = config or X152Config()
    else:
        resolved_cfg = wts.resolve(config, cache_dir=cache_dir)
        if resolved_cfg.is_random:
            raise VlprepError(f"{config}: a config is a yaml file spec, not random:<seed>")
        cfg = config_from_yaml(Path(resolved_cfg.path).read_text(encoding="utf-8"), str(resolved_cfg.path))
    model = X152Detector(cfg)
    resolved = wts.resolve(weights, cache_dir=cache_dir, model="x152")
    if resolved.is_random:
        checkpoints.init_random(model, resolved.seed or 0, _RANDOM_STDS)
        log.warning("X-152 detector uses RANDOM weights (%s): features are not meaningful", resolved.spec)
    else:
        arrays, layout = wts.load_checkpoint(resolved.path)
        load_state(model, arrays, source=str(resolved.path))
        log.info("X-152 weights from %s (%s layout)", resolved.describe(), layout)
    model.weights = resolved
    return model.configure(device=device, autocast_dtype=autocast_dtype, channels_last=channels_last)


def load_state(model: X152Detector, arrays: dict[str, Any], source: str = "checkpoint") -> None:
    """Load maskrcnn-benchmark names (``module.`` prefix or not) into ``model`` strictly, and check that
    any stored anchors equal the model's (else the checkpoint belongs to another anchor config)."""
    what = f"X-LXMERT FPN detector ({model.cfg.num_classes} classes, {sum(model.cfg.stage_blocks)} blocks)"
    skipped = checkpoints.load_state(model, arrays, checkpoints.MB_KEYS, source=source, what=what)
    ours = model.rpn.cells  # per level, the [A,4] anchors at cell (0, 0)
    for name, stored in skipped.items():
        name = name.removeprefix("module.")
        if not name.startswith(checkpoints.MB_ANCHORS):
            continue
        level = int(name.rsplit(".", 1)[-1])
        if level >= len(ours) or not torch.equal(stored, ours[level]):
            raise VlprepError(
                f"{source}: stored anchors {name} differ from the config's (sizes {model.cfg.anchor_sizes}, "
                f"strides {model.cfg.anchor_strides}, ratios {model.cfg.anchor_ratios}); pass the matching config"
            )
