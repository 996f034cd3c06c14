"""Frozen batch norm (two upstream formulas) and a bias-free conv followed by one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """detectron2's frozen BN: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_shift(self, dtype) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` [1,C,1,1] in ``dtype`` such that the norm is ``x * scale + shift``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale.to(dtype).view(1, -1, 1, 1), shift.to(dtype).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:  # autocast: fold into a scale and shift in the input's dtype
            scale, shift = self.scale_shift(x.dtype)
            return x * scale + shift
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """maskrcnn-benchmark's frozen BN: ``x * (w / sqrt(var)) + (b - mean * w / sqrt(var))``, no eps."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=0.0)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift(x.dtype)
        return x * scale + shift


class Conv2dNorm(nn.Conv2d):
    """Bias-free conv followed by a frozen BN in ``.norm`` (detectron2's ``Conv2d(norm=...)`` naming)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        norm: type[FrozenBatchNorm2d] = FrozenBatchNorm2d,
    ):
        super().__init__(
            cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False
        )
        self.norm = norm(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))
