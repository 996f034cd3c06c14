"""Checkpoint names -> model names (detectron2, maskrcnn-benchmark), strict loading with a report,
and deterministic random init (``random:<seed>`` weights for offline tests and demos)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlprep import VlprepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyMap:
    """Name translation between a checkpoint and a model: ``to_model`` (None: a name to skip, such
    as a derived buffer) and its inverse ``to_checkpoint`` (for messages and conversions)."""

    to_model: Callable[[str], str | None]
    to_checkpoint: Callable[[str], str]
    convention: str  # how checkpoint names look, for error messages


# ---------------------------------------------------------------- detectron2 (BUTD)

_D2_PREFIXES = (("proposal_generator.rpn_head.", "rpn.head."),)
_D2_IGNORED = ("proposal_generator.anchor_generator.cell_anchors.",)


def _d2_to_model(name: str) -> str | None:
    if name.startswith(_D2_IGNORED):
        return None
    for d2, ours in _D2_PREFIXES:
        if name.startswith(d2):
            return ours + name[len(d2) :]
    return name


def _model_to_d2(name: str) -> str:
    for d2, ours in _D2_PREFIXES:
        if name.startswith(ours):
            return d2 + name[len(ours) :]
    return name


D2_KEYS = KeyMap(
    _d2_to_model,
    _model_to_d2,
    "detectron2 names such as backbone.res4.0.conv1.weight (Caffe2/Detectron blob names are not converted)",
)
"""``proposal_generator.rpn_head.X`` <-> ``rpn.head.X``; the anchor buffers are skipped; every other
name (``backbone.*``, ``roi_heads.res5.*``, ``roi_heads.box_predictor.*``) is the model's own."""


# ---------------------------------------------------------------- maskrcnn-benchmark (X-152 FPN)

# (checkpoint regex, model template, model regex, checkpoint template); stage numbers shift by one
# (layer1 = res2), conv k's BN is bn{k} there and conv{k}.norm here.
_MB_RULES = (
    (r"backbone\.body\.stem\.conv1\.(weight)$", "backbone.stem.conv1.{0}",
     r"backbone\.stem\.conv1\.(weight)$", "backbone.body.stem.conv1.{0}"),
    (r"backbone\.body\.stem\.bn1\.(\w+)$", "backbone.stem.conv1.norm.{0}",
     r"backbone\.stem\.conv1\.norm\.(\w+)$", "backbone.body.stem.bn1.{0}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight$", "backbone.res{0+}.{1}.conv{2}.weight",
     r"backbone\.res(\d)\.(\d+)\.conv(\d)\.weight$", "backbone.body.layer{0-}.{1}.conv{2}.weight"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)$", "backbone.res{0+}.{1}.conv{2}.norm.{3}",
     r"backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$", "backbone.body.layer{0-}.{1}.bn{2}.{3}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight$", "backbone.res{0+}.{1}.shortcut.weight",
     r"backbone\.res(\d)\.(\d+)\.shortcut\.weight$", "backbone.body.layer{0-}.{1}.downsample.0.weight"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)$", "backbone.res{0+}.{1}.shortcut.norm.{2}",
     r"backbone\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$", "backbone.body.layer{0-}.{1}.downsample.1.{2}"),
    (r"backbone\.fpn\.fpn_inner(\d)\.(\w+)$", "fpn.lateral.{0-}.{1}",
     r"fpn\.lateral\.(\d)\.(\w+)$", "backbone.fpn.fpn_inner{0+}.{1}"),
    (r"backbone\.fpn\.fpn_layer(\d)\.(\w+)$", "fpn.output.{0-}.{1}",
     r"fpn\.output\.(\d)\.(\w+)$", "backbone.fpn.fpn_layer{0+}.{1}"),
    (r"rpn\.head\.conv\.(\w+)$", "rpn.head.conv.{0}", r"rpn\.head\.conv\.(\w+)$", "rpn.head.conv.{0}"),
    (r"rpn\.head\.cls_logits\.(\w+)$", "rpn.head.objectness_logits.{0}",
     r"rpn\.head\.objectness_logits\.(\w+)$", "rpn.head.cls_logits.{0}"),
    (r"rpn\.head\.bbox_pred\.(\w+)$", "rpn.head.anchor_deltas.{0}",
     r"rpn\.head\.anchor_deltas\.(\w+)$", "rpn.head.bbox_pred.{0}"),
    (r"roi_heads\.box\.feature_extractor\.(fc[67])\.(\w+)$", "roi_heads.{0}.{1}",
     r"roi_heads\.(fc[67])\.(\w+)$", "roi_heads.box.feature_extractor.{0}.{1}"),
    (r"roi_heads\.box\.predictor\.cls_score\.(\w+)$", "roi_heads.cls_score.{0}",
     r"roi_heads\.cls_score\.(\w+)$", "roi_heads.box.predictor.cls_score.{0}"),
)  # fmt: skip
# Skipped: the anchor buffers (derived from the config; checked against ours by the loader) and the
# class-specific box regressor, which no X-LXMERT recipe uses.
MB_ANCHORS = "rpn.anchor_generator.cell_anchors."
_MB_SKIPPED = (MB_ANCHORS, "roi_heads.box.predictor.bbox_pred.")


def _fill(template: str, groups: tuple[str, ...]) -> str:
    def one(m: re.Match) -> str:
        value = groups[int(m.group(1))]
        shift = {"+": 1, "-": -1}.get(m.group(2), 0)
        return str(int(value) + shift) if shift else value

    return re.sub(r"\{(\d)([+-]?)\}", one, template)


def _mb_to_model(name: str) -> str | None:
    name = name.removeprefix("module.")  # saved from a DistributedDataParallel-wrapped model
    if name.startswith(_MB_SKIPPED):
        return None
    for ckpt, ours, _, _ in _MB_RULES:
        m = re.match(ckpt, name)
        if m:
            return _fill(ours, m.groups())
    return name  # the model's own name, or one the loader reports as unexpected


def _model_to_mb(name: str) -> str:
    for _, _, ours, ckpt in _MB_RULES:
        m = re.match(ours, name)
        if m:
            return _fill(ckpt, m.groups())
    return name


MB_KEYS = KeyMap(
    _mb_to_model,
    _model_to_mb,
    "maskrcnn-benchmark names such as backbone.body.layer3.0.conv1.weight (an optional module. prefix)",
)


# ---------------------------------------------------------------- strict loading


def _as_float_tensor(value: Any) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return t.to(torch.float32)


def load_state(
    model: nn.Module,
    arrays: Mapping[str, Any],
    keys: KeyMap,
    *,
    source: str,
    what: str,
    fill_bn_stats: bool = False,
) -> dict[str, Tensor]:
    """Copy name -> array/tensor into ``model`` strictly, cast to float32 (zoo pickles may be float16).

    Every model tensor must be given, every given name must map to one (``keys.to_model``; names
    mapped to None are skipped and returned, for the caller to check), shapes must agree; otherwise a
    VlprepError names ``source``, ``what`` was expected, and a few missing / unexpected / misshapen
    names in the checkpoint's convention. ``fill_bn_stats``: a frozen BN without running statistics
    gets mean 0 / var 1, as detectron2 does for converted Caffe models (logged).
    """
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    skipped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for name, value in arrays.items():
        key = keys.to_model(str(name))
        if key is None:
            skipped[str(name)] = _as_float_tensor(value)
        elif key in own:
            mapped[key] = _as_float_tensor(value)
        else:
            unexpected.append(str(name))
    missing = [k for k in own if k not in mapped]
    filled = [k for k in missing if fill_bn_stats and k.endswith((".norm.running_mean", ".norm.running_var"))]
    for k in filled:
        mapped[k] = torch.zeros_like(own[k]) if k.endswith("running_mean") else torch.ones_like(own[k])
    missing = [k for k in missing if k not in filled]
    bad_shape = [
        f"{keys.to_checkpoint(k)} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing (e.g. {', '.join(keys.to_checkpoint(k) for k in missing[:4])})"
        )
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} with wrong shapes (e.g. {'; '.join(bad_shape[:3])})")
    if problems:
        raise VlprepError(
            f"{source}: does not match the {what}: " + "; ".join(problems) + f". Expected {keys.convention}."
        )
    if filled:
        log.warning(
            "%s: no running statistics for %d FrozenBN layers; using mean 0, var 1", source, len(filled) // 2
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(mapped[k])
    return skipped


def init_random(model: nn.Module, seed: int, stds: Mapping[str, float]) -> None:
    """Deterministic random weights in the real architecture (for offline tests and demos, not a model).

    Tensors in state-dict order from one generator: frozen BN identity, except the last norm of each
    residual branch (weight 0.2) so activations stay bounded; biases zero; tensors under a prefix of
    ``stds`` normal with that std; every other weight He normal (fan out).
    """
    g = torch.Generator().manual_seed(int(seed))
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
                if std is None:
                    std = math.sqrt(2.0 / (t.shape[0] * t[0, 0].numel()))
                t.copy_(torch.randn(t.shape, generator=g) * std)
