"""Feature pyramid (maskrcnn-benchmark variant): P2..P5 top-down with nearest x2 upsampling, P6 by pooling.

Not ``torchvision.ops.FeaturePyramidNetwork``: that one upsamples to the lateral's size, which equals
``scale_factor=2`` only when every level is exactly twice the next (inputs divisible by 32, as all
X-LXMERT inputs are), names its convs ``inner_blocks.i.0``, and has no P6-by-max-pool extra block
with this exact ``max_pool2d(P5, 1, 2, 0)``. The fork's sum order (lateral + top-down) is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """1x1 lateral convs (``lateral.i``) and 3x3 output convs (``output.i``), both with bias."""

    def __init__(self, in_channels: Sequence[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2..P6], highest resolution first."""
        inner = self.lateral[-1](feats[-1])
        results = [self.output[-1](inner)]
        for k in range(len(feats) - 2, -1, -1):
            inner = self.lateral[k](feats[k]) + F.interpolate(inner, scale_factor=2, mode="nearest")
            results.insert(0, self.output[k](inner))
        results.append(F.max_pool2d(results[-1], 1, 2, 0))
        return results
