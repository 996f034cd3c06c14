"""What a box-selection recipe reads: the RoI-head outputs for every RoI of one image."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import Tensor


@dataclass
class RoIOutputs:
    """RoI-head outputs for every RoI of one image (CPU, float32)."""

    boxes: Tensor  # [R,4] RoIs in resized-image pixels (RPN proposals, best first, or given boxes)
    features: Tensor  # [R,D] the region features
    cls_logits: Tensor  # [R,C+1], background last
    pred_boxes: Tensor  # [R,C*4] class-specific regressed boxes, resized pixels, not clipped
    image_hw: tuple[int, int]  # original
    resized_hw: tuple[int, int]
    attr_logits: Tensor | None = None  # [R,A+1], no-attribute last; None for a model without attributes
    given_boxes: Tensor | None = None  # [R,4] the caller's boxes in original pixels, when given
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)  # shared work between recipes

    @cached_property
    def cls_prob(self) -> Tensor:
        """Softmax over all C+1 logits, background last."""
        return self.cls_logits.softmax(dim=-1)

    @cached_property
    def attr_conf_ids(self) -> tuple[Tensor, Tensor]:
        """(max, argmax) of the softmax over the A attribute logits without no-attribute (as PB)."""
        if self.attr_logits is None:
            raise ValueError("this model has no attribute head")
        return self.attr_logits[:, :-1].softmax(dim=-1).max(dim=1)

    @property
    def to_original(self) -> tuple[float, float]:
        """(scale_x, scale_y) from resized to original pixels."""
        (h, w), (nh, nw) = self.image_hw, self.resized_hw
        return w / nw, h / nh
