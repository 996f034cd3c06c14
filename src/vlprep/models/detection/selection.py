"""Box-selection recipes for the BUTD detector: which regions an image gets, per upstream.

Every recipe reads the RoI-head outputs of one image (:class:`RoIOutputs`: all 300 RPN proposals,
or caller-given boxes) and returns one result dict. They differ only in how regions are chosen:

=================  ===========  ==========================================================================
name               fixture key  upstream and rule
=================  ===========  ==========================================================================
caffe10-100        (none)       BUTD ``generate_tsv.py``: proposals scaled to original pixels; per
                                foreground class NMS 0.3 on its probability, ``max_conf`` = best kept
                                probability; keep ``max_conf >= 0.2`` in proposal order; fewer than 10 or
                                more than 100 -> top by ``max_conf`` (descending, stable). Boxes are the
                                **unregressed** proposals.
caffe36            fix36_       the same with min = max = 36: VOLTA ``extract_coco_image.py``
                                (exactly 36 survivors stay in proposal order).
d2-nb36            nb36_        PB ``demo_feature_extraction_attr.ipynb``: regressed class boxes clipped
                                to the resized image, score > 0.2 per (box, class), per-class NMS at
                                0.5, 0.6, ... 0.9 until exactly 36 (else 0.9), top 36 by score. One
                                proposal may appear twice with two classes.
d2-maxnms36        maxnms36_    PB ``detectron2_mscoco_proposal_maxnms.py`` (LXMERT obj36): each
                                proposal's argmax-foreground class and its regressed box, class-agnostic
                                NMS by that score (no score threshold) from ``nms_start`` (0.3) in 0.1
                                steps until >= 36, top 36. Sizes 600/1000.
d2-maxnms36-volta  -            VOLTA ``features_extraction/detectron2_proposal_maxnms.py``: the same with
                                ``nms_start`` 0.5 and detectron2's default sizes 800/1333. VOLTA skips
                                images that still have fewer than 36 (``num_boxes < 36``): the caller
                                decides.
given-boxes        grid_        PB ``demo_feature_extraction_attr_given_box.ipynb``: caller-given boxes
                                (original pixels), no RPN; without boxes, a ``grid`` x ``grid`` grid
                                (:func:`vlprep.models.detection.boxes.grid_boxes`).
=================  ===========  ==========================================================================

The d2 recipes map boxes back with ``detector_postprocess``: scale by (W/w, H/h), clip to the original
image, drop empty boxes. Their features are those of the unregressed proposal, so box and feature cover
slightly different regions, as upstream (PB README, issues #1/#15). All recipes run on the detectron2
port's model and preprocessing (Pillow bilinear resize, ``min_size``/``max_size`` per recipe): the caffe
recipes reproduce the Caffe selection rule, not the Caffe network's cv2-resized numbers.

Result keys (numpy), format-neutral (the model's own column order): ``boxes`` float32 [N,4] (x0,y0,x1,y1,
original pixels), ``obj_ids`` int64 and ``obj_conf`` float32 (foreground class among 1600, 0-based; its
probability under the softmax over all 1601 logits), ``features`` float32 [N,2048], ``num_boxes``,
``image_h``, ``image_w``, ``cls_prob`` float32 [N,1601] (the 1601-way softmax, background LAST), and
for a model with attributes ``attr_ids`` int64 / ``attr_conf`` float32 (argmax/max of the softmax over
the 400 attribute logits without no-attribute, as in PB: not the Caffe value) and ``attr_prob`` float32
[N,401] (the 401-way softmax over all attribute logits, no-attribute LAST). So
``obj_conf == cls_prob[:, :-1].max(1)`` and ``obj_ids == cls_prob[:, :-1].argmax(1)`` (except d2-nb36,
whose class is the detected one), while ``attr_conf`` is renormalised over 400 and differs from
``attr_prob[:, :-1].max(1)``. VOLTA's TSV wants background / no-attribute FIRST (the Caffe convention):
:func:`vlprep.formats.volta_tsv.volta_record` reorders.
Also: ``proposal_idx`` int64 (row among the RoIs), ``recipe``, and per recipe ``select_branch``
(caffe: in_range / min_clamp / max_clamp), ``nms_thresh_used`` and ``num_dropped_empty`` (d2).

Every recipe has ``exif`` (the image orientation policy: rotate by the EXIF orientation tag before
detection or not) and ``box_range`` (fewest, most boxes per image).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from vlprep import VlprepError
from vlprep.models.detection.boxes import clip_boxes, grid_boxes, nonempty, scale_boxes
from vlprep.models.detection.outputs import RoIOutputs


def _result(
    out: RoIOutputs, idx: Tensor, boxes: Tensor, obj_ids: Tensor, obj_conf: Tensor, **extra: Any
) -> dict:
    """One image's result dict (see the module docstring) for RoI rows ``idx``."""
    idx = idx.long()
    h, w = out.image_hw
    res = {
        "boxes": boxes.float().numpy().reshape(-1, 4),
        "obj_ids": obj_ids.long().numpy(),
        "obj_conf": obj_conf.float().numpy(),
        "features": out.features[idx].numpy().reshape(len(idx), -1),
        "num_boxes": len(idx),
        "image_h": int(h),
        "image_w": int(w),
        "cls_prob": out.cls_prob[idx].numpy(),
        "proposal_idx": idx.numpy(),
    }
    if out.attr_logits is not None:
        attr_conf, attr_ids = out.attr_conf_ids
        res["attr_ids"] = attr_ids[idx].long().numpy()
        res["attr_conf"] = attr_conf[idx].float().numpy()
        res["attr_prob"] = out.attr_logits[idx].softmax(dim=-1).numpy()
    res.update(extra)
    return res


def _postprocess(out: RoIOutputs, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """detectron2 ``detector_postprocess``: to original pixels, clip, and a mask of non-empty boxes."""
    boxes = clip_boxes(scale_boxes(boxes, *out.to_original), out.image_hw)
    return boxes, nonempty(boxes)


def _thresholds(start: float, stop: float = 1.0, step: float = 0.1) -> list[float]:
    """NMS thresholds exactly as upstream's ``np.arange(start, 1.0, 0.1)``."""
    return [float(t) for t in np.arange(start, stop, step)]


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named box-selection rule; ``prefix`` is its key prefix in the golden fixtures.

    ``exif``: apply the EXIF orientation before detection. True for every BUTD recipe: the detectron2
    port (PB, VOLTA ``features_extraction``) reads images with ``cv2.imread``, which applies the EXIF
    orientation since OpenCV 3.1. Which OpenCV the original Caffe features were made with is unknown.
    """

    name: str
    prefix: str
    min_size: int = 600  # shortest-edge resize
    max_size: int = 1000  # long-side cap
    exif: bool = True
    skip_short: bool = False  # upstream skips (and lists) an image with fewer boxes than box_range's minimum
    uses_given_boxes: ClassVar[bool] = False

    @property
    def box_range(self) -> tuple[int, int]:
        """(fewest, most) boxes an image gets."""
        raise NotImplementedError

    def select(self, out: RoIOutputs) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class CaffeRecipe(Recipe):
    """BUTD ``generate_tsv.py``: unregressed proposals ranked by per-class-NMS max confidence."""

    min_boxes: int = 10
    max_boxes: int = 100
    conf_thresh: float = 0.2
    nms_thresh: float = 0.3

    @property
    def box_range(self) -> tuple[int, int]:
        return self.min_boxes, self.max_boxes

    def max_conf(self, out: RoIOutputs) -> Tensor:
        """Per RoI, its best probability over the classes whose NMS keeps it (0 if none)."""
        key = ("caffe_max_conf", self.nms_thresh)
        if key not in out.memo:
            fg = out.cls_prob[:, :-1]
            boxes = scale_boxes(out.boxes, *out.to_original)
            max_conf = torch.zeros(len(boxes))
            for c in range(fg.shape[1]):
                scores = fg[:, c].contiguous()
                keep = nms(boxes, scores, self.nms_thresh)
                max_conf[keep] = torch.maximum(max_conf[keep], scores[keep])
            out.memo[key] = max_conf
        return out.memo[key]

    def select(self, out: RoIOutputs) -> dict[str, Any]:
        fg = out.cls_prob[:, :-1]
        boxes = scale_boxes(out.boxes, *out.to_original)
        max_conf = self.max_conf(out)
        keep = torch.nonzero(max_conf >= self.conf_thresh).flatten()
        branch = "in_range"
        if len(keep) < self.min_boxes or len(keep) > self.max_boxes:
            limit = self.min_boxes if len(keep) < self.min_boxes else self.max_boxes
            branch = "min_clamp" if len(keep) < self.min_boxes else "max_clamp"
            keep = torch.sort(max_conf, descending=True, stable=True).indices[:limit]
        obj_conf, obj_ids = fg[keep].max(dim=1)
        return _result(out, keep, boxes[keep], obj_ids, obj_conf, recipe=self.name, select_branch=branch)


@dataclass(frozen=True, kw_only=True)
class NotebookRecipe(Recipe):
    """PB attribute notebook: detectron2 ``fast_rcnn_inference`` on regressed boxes, NMS sweep."""

    num_objects: int = 36
    score_thresh: float = 0.2
    nms_start: float = 0.5

    @property
    def box_range(self) -> tuple[int, int]:
        return self.num_objects, self.num_objects

    def select(self, out: RoIOutputs) -> dict[str, Any]:
        fg = out.cls_prob[:, :-1]
        num_classes = fg.shape[1]
        boxes = clip_boxes(out.pred_boxes.reshape(-1, 4), out.resized_hw).view(-1, num_classes, 4)
        mask = fg > self.score_thresh
        pairs = mask.nonzero()  # (proposal, class), row-major
        cand_boxes, cand_scores = boxes[mask], fg[mask]
        for t in _thresholds(self.nms_start):
            keep = batched_nms(cand_boxes, cand_scores, pairs[:, 1], t)[: self.num_objects]
            if len(keep) == self.num_objects:
                break
        final, nonempty = _postprocess(out, cand_boxes[keep])
        keep = keep[nonempty]
        return _result(
            out,
            pairs[keep, 0],
            final[nonempty],
            pairs[keep, 1],
            cand_scores[keep],
            recipe=self.name,
            nms_thresh_used=t,
            num_dropped_empty=int((~nonempty).sum()),
        )


@dataclass(frozen=True, kw_only=True)
class MaxNMSRecipe(Recipe):
    """PB / VOLTA max-NMS: argmax class's regressed box per proposal, class-agnostic NMS sweep."""

    num_objects: int = 36
    nms_start: float = 0.3

    @property
    def box_range(self) -> tuple[int, int]:
        return self.num_objects, self.num_objects

    def select(self, out: RoIOutputs) -> dict[str, Any]:
        fg = out.cls_prob[:, :-1]
        num_classes = fg.shape[1]
        boxes = clip_boxes(out.pred_boxes.reshape(-1, 4), out.resized_hw)
        max_scores, max_classes = fg.max(dim=1)
        max_boxes = boxes[torch.arange(len(fg)) * num_classes + max_classes]
        for t in _thresholds(self.nms_start):
            keep = nms(max_boxes, max_scores, t)[: self.num_objects]
            if len(keep) >= self.num_objects:
                break
        final, nonempty = _postprocess(out, max_boxes[keep])
        keep = keep[nonempty]
        return _result(
            out,
            keep,
            final[nonempty],
            max_classes[keep],
            max_scores[keep],
            recipe=self.name,
            nms_thresh_used=t,
            num_dropped_empty=int((~nonempty).sum()),
        )


@dataclass(frozen=True, kw_only=True)
class GivenBoxesRecipe(Recipe):
    """Features for caller-given boxes (original pixels), in the given order; ``grid`` when none are given."""

    grid: int | None = 8
    uses_given_boxes: ClassVar[bool] = True

    @property
    def box_range(self) -> tuple[int, int]:
        """The grid's cell count (8x8 when no grid is set: a naming convention, as the boxes are the
        caller's then)."""
        n = (self.grid or 8) ** 2
        return n, n

    def default_boxes(self, h: int, w: int) -> np.ndarray:
        if self.grid is None:
            raise VlprepError(
                f"recipe {self.name}: no boxes given and no grid set; pass boxes=[...] per image"
            )
        return grid_boxes(h, w, self.grid)

    def select(self, out: RoIOutputs) -> dict[str, Any]:
        idx = torch.arange(len(out.boxes))
        obj_conf, obj_ids = out.cls_prob[:, :-1].max(dim=1)
        boxes = out.given_boxes if out.given_boxes is not None else scale_boxes(out.boxes, *out.to_original)
        return _result(out, idx, boxes, obj_ids, obj_conf, recipe=self.name)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        CaffeRecipe(name="caffe10-100", prefix="", min_boxes=10, max_boxes=100),
        CaffeRecipe(name="caffe36", prefix="fix36_", min_boxes=36, max_boxes=36),
        NotebookRecipe(name="d2-nb36", prefix="nb36_"),
        MaxNMSRecipe(name="d2-maxnms36", prefix="maxnms36_"),
        MaxNMSRecipe(
            name="d2-maxnms36-volta", prefix="maxnms36_", nms_start=0.5, min_size=800, max_size=1333,
            skip_short=True,
        ),
        GivenBoxesRecipe(name="given-boxes", prefix="grid_"),
    )
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A recipe by name, with fields overridden (e.g. ``get_recipe("d2-maxnms36", nms_start=0.5)``)."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise VlprepError(f"unknown BUTD recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
    if not overrides:
        return recipe
    _check_override_types(recipe, overrides)
    try:
        recipe = dataclasses.replace(recipe, **overrides)
    except TypeError as e:
        raise VlprepError(f"recipe {name}: {e}") from None
    lo, hi = recipe.box_range
    if not 0 <= lo <= hi:
        raise VlprepError(f"recipe {name}: {lo} to {hi} boxes per image; give 0 <= min_boxes <= max_boxes")
    return recipe


_OVERRIDE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "int | None": (int, type(None))}


def _check_override_types(recipe: Recipe, overrides: dict) -> None:
    """Each override has its field's type (JSON gives ``"high"`` as easily as ``0.3``); numbers are >= 0."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(recipe)}
    for key, value in overrides.items():
        wanted = _OVERRIDE_TYPES.get(kinds.get(key, ""))
        if wanted is None:
            continue  # unknown keys are refused by dataclasses.replace with their name
        is_bool_for_number = isinstance(value, bool) and bool not in wanted
        if not isinstance(value, wanted) or is_bool_for_number:
            raise VlprepError(f"recipe {recipe.name}: {key}={value!r} must be {kinds[key]}, e.g. "
                              f"{getattr(recipe, key)!r}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise VlprepError(f"recipe {recipe.name}: {key}={value!r} must be >= 0")
