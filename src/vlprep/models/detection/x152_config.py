"""The X-LXMERT detector's architecture sizes, and reading them from a maskrcnn-benchmark yaml.

``detectron_config.yaml`` (published beside ``detectron_model.pth``) is a yacs file: values not in it
come from the fork's defaults, which are :class:`X152Config`'s defaults where a key is given below.
Only inference-relevant keys are read. Keys of training, datasets, the input pipeline (the X-LXMERT
scripts preprocess images themselves) and the box post-processor (unused: the recipes select from
the RPN proposals) are ignored; keys this implementation cannot honour are errors; unknown keys
are warnings.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, fields, replace
from typing import Any

import yaml

from vlprep import VlprepError

log = logging.getLogger(__name__)

STAGE_BLOCKS = {"R-50-FPN": (3, 4, 6, 3), "R-101-FPN": (3, 4, 23, 3), "R-152-FPN": (3, 8, 36, 3)}


@dataclass(frozen=True)
class X152Config:
    """VG Faster R-CNN ResNeXt-152 32x8d FPN, as vqa-maskrcnn-benchmark builds it from the yaml."""

    stage_blocks: tuple[int, ...] = STAGE_BLOCKS["R-152-FPN"]
    groups: int = 32
    width_per_group: int = 8
    stem_channels: int = 64
    res2_out_channels: int = 256
    fpn_channels: int = 512
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_topk: int = 1000  # per level
    rpn_post_nms_topk: int = 1000  # per level
    rpn_levels_topk: int = 1000  # over all levels, per image
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 0.0
    pooler_resolution: int = 7
    pooler_scales: tuple[float, ...] = (0.25, 0.125, 0.0625, 0.03125)
    sampling_ratio: int = 2
    mlp_dim: int = 2048
    num_classes: int = 1601  # background FIRST (index 0), as maskrcnn-benchmark
    size_divisibility: int = 32
    min_size: int = 800  # X-LXMERT's resize (its scripts' constants, not the yaml's INPUT.*)
    max_size: int = 1333

    @classmethod
    def tiny(cls, **overrides: Any) -> X152Config:
        """A small variant for fast tests: 1 block per stage, few channels, 21 classes, 160/256 resize."""
        small = dict(
            stage_blocks=(1, 1, 1, 1),
            groups=4,
            width_per_group=4,
            stem_channels=8,
            res2_out_channels=16,
            fpn_channels=16,
            rpn_pre_nms_topk=300,
            rpn_post_nms_topk=200,
            rpn_levels_topk=200,
            mlp_dim=32,
            num_classes=21,
            min_size=160,
            max_size=256,
        )
        return cls(**{**small, **overrides})


# yaml key -> X152Config field
_FIELDS = {
    "MODEL.RESNETS.NUM_GROUPS": "groups",
    "MODEL.RESNETS.WIDTH_PER_GROUP": "width_per_group",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": "stem_channels",
    "MODEL.RESNETS.RES2_OUT_CHANNELS": "res2_out_channels",
    "MODEL.BACKBONE.OUT_CHANNELS": "fpn_channels",
    "MODEL.RPN.ANCHOR_SIZES": "anchor_sizes",
    "MODEL.RPN.ANCHOR_STRIDE": "anchor_strides",
    "MODEL.RPN.ASPECT_RATIOS": "anchor_ratios",
    "MODEL.RPN.PRE_NMS_TOP_N_TEST": "rpn_pre_nms_topk",
    "MODEL.RPN.POST_NMS_TOP_N_TEST": "rpn_post_nms_topk",
    "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST": "rpn_levels_topk",
    "MODEL.RPN.NMS_THRESH": "rpn_nms_thresh",
    "MODEL.RPN.MIN_SIZE": "rpn_min_size",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": "pooler_resolution",
    "MODEL.ROI_BOX_HEAD.POOLER_SCALES": "pooler_scales",
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": "sampling_ratio",
    "MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM": "mlp_dim",
    "MODEL.ROI_BOX_HEAD.NUM_CLASSES": "num_classes",
    "DATALOADER.SIZE_DIVISIBILITY": "size_divisibility",
}
# yaml key -> the only value this implementation runs
_FIXED = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN_ONLY": False,
    "MODEL.MASK_ON": False,
    "MODEL.RPN.USE_FPN": True,
    "MODEL.RPN.RPN_HEAD": "SingleConvRPNHead",
    "MODEL.ROI_HEADS.USE_FPN": True,
    "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR": "FPN2MLPFeatureExtractor",
    "MODEL.ROI_BOX_HEAD.PREDICTOR": "FPNPredictor",
    "MODEL.ROI_BOX_HEAD.RETURN_FC_FEATS": True,
    "MODEL.ROI_BOX_HEAD.ATTR": False,
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.TRANS_FUNC": "BottleneckWithFixedBatchNorm",
    "MODEL.RESNETS.STEM_FUNC": "StemWithFixedBatchNorm",
}
# prefixes of keys that do not change X-LXMERT's features
_IGNORED = (
    "MODEL.WEIGHT", "MODEL.DEVICE", "MODEL.CLS_AGNOSTIC_BBOX_REG", "MODEL.BACKBONE.FREEZE_CONV_BODY_AT",
    "MODEL.RPN.PRE_NMS_TOP_N_TRAIN", "MODEL.RPN.POST_NMS_TOP_N_TRAIN", "MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "MODEL.RPN.POSITIVE_FRACTION", "MODEL.RPN.FG_IOU_THRESHOLD",
    "MODEL.RPN.BG_IOU_THRESHOLD", "MODEL.RPN.STRADDLE_THRESH",
    "MODEL.ROI_HEADS.", "INPUT.", "DATASETS.", "DATALOADER.NUM_WORKERS", "DATALOADER.ASPECT_RATIO_GROUPING",
    "SOLVER.", "TEST.", "OUTPUT_DIR", "PATHS_CATALOG",
)  # fmt: skip


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def _value(raw: Any) -> Any:
    """A yacs value: strings holding Python literals (``"(4, 8)"``) are decoded as yacs does."""
    if isinstance(raw, str):
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    return raw


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """``value`` in the type of the field's ``default`` (tuples element-wise), or a VlprepError."""
    try:
        if isinstance(default, tuple):
            if not isinstance(value, list | tuple) or not value:
                raise TypeError("not a non-empty sequence")
            return tuple(type(default[0])(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{type(value).__name__}, not a number")
        return type(default)(value)
    except (TypeError, ValueError) as e:
        raise VlprepError(f"{source}: {key}: {value!r} is not a valid value ({e})") from None


def config_from_yaml(text: str, source: str) -> X152Config:
    """X152Config from the text of a maskrcnn-benchmark yaml (see the module docstring)."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise VlprepError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise VlprepError(f"{source}: expected a mapping of config keys, got {type(doc).__name__}")
    defaults = {f.name: f.default for f in fields(X152Config)}
    values: dict[str, Any] = {}
    for key, raw in _flatten(doc).items():
        value = _value(raw)
        if key == "MODEL.BACKBONE.CONV_BODY":
            if value not in STAGE_BLOCKS:
                raise VlprepError(
                    f"{source}: {key} {value!r} is not supported; use one of {', '.join(STAGE_BLOCKS)}"
                )
            values["stage_blocks"] = STAGE_BLOCKS[value]
        elif key in _FIELDS:
            values[_FIELDS[key]] = _coerce(key, value, defaults[_FIELDS[key]], source)
        elif key in _FIXED:
            if value != _FIXED[key]:
                raise VlprepError(
                    f"{source}: {key}: {value!r} is not supported (only {_FIXED[key]!r}: the X-LXMERT detector)"
                )
        elif not key.startswith(_IGNORED):
            log.warning(
                "%s: unknown key %s ignored (not a maskrcnn-benchmark inference setting)", source, key
            )
    return check(replace(X152Config(), **values), source)


def check(cfg: X152Config, source: str = "config") -> X152Config:
    """``cfg`` if its values fit together, else a VlprepError naming the conflict."""
    levels = len(cfg.anchor_strides)
    if len(cfg.anchor_sizes) != levels:
        raise VlprepError(
            f"{source}: {len(cfg.anchor_sizes)} anchor sizes for {levels} anchor strides (FPN: one per level)"
        )
    if levels != len(cfg.pooler_scales) + 1 or len(cfg.pooler_scales) != len(cfg.stage_blocks):
        raise VlprepError(
            f"{source}: {len(cfg.pooler_scales)} pooler scales, {levels} RPN levels, {len(cfg.stage_blocks)} stages: "
            "FPN pools from P2..P5 (one scale per stage) and proposes on P2..P6"
        )
    expected = tuple(1.0 / s for s in cfg.anchor_strides[:-1])
    if any(abs(a - b) > 1e-9 for a, b in zip(cfg.pooler_scales, expected, strict=True)):
        raise VlprepError(
            f"{source}: pooler scales {cfg.pooler_scales} do not match anchor strides {cfg.anchor_strides}"
        )
    if cfg.size_divisibility % cfg.anchor_strides[-2]:
        raise VlprepError(
            f"{source}: size divisibility {cfg.size_divisibility} must be a multiple of the C5 stride"
        )
    return cfg
