"""ResNet / ResNeXt parts: stems, bottleneck blocks and stages, and a body returning chosen stages.

Module names follow detectron2 (``stem.conv1``, ``res2.0.conv1``, ``.norm``, ``.shortcut``);
:mod:`.checkpoints` maps maskrcnn-benchmark names (``layer1.0.bn1``, ``downsample``) onto them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from vlprep.models.detection.layers import Conv2dNorm, FrozenBatchNorm2d


@dataclass(frozen=True)
class BlockStyle:
    """How bottlenecks are built: ``groups`` in the 3x3 conv (ResNeXt), where the stride goes
    (the 1x1 conv: MSRA / Caffe ResNets; the 3x3 conv: fb.torch / Caffe2 ResNeXts), which frozen BN."""

    groups: int = 1
    stride_in_1x1: bool = True
    norm: type[FrozenBatchNorm2d] = FrozenBatchNorm2d


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1, plus a projection shortcut when shapes change."""

    def __init__(
        self, cin: int, width: int, cout: int, *, stride: int = 1, dilation: int = 1, style: BlockStyle
    ):
        super().__init__()
        s1, s3 = (stride, 1) if style.stride_in_1x1 else (1, stride)
        norm = style.norm
        self.shortcut = (
            Conv2dNorm(cin, cout, 1, stride=stride, norm=norm) if (cin != cout or stride != 1) else None
        )
        self.conv1 = Conv2dNorm(cin, width, 1, stride=s1, norm=norm)
        self.conv2 = Conv2dNorm(
            width, width, 3, stride=s3, padding=dilation, dilation=dilation, groups=style.groups, norm=norm
        )
        self.conv3 = Conv2dNorm(width, cout, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def make_stage(
    blocks: int, cin: int, width: int, cout: int, *, stride: int, dilation: int = 1, style: BlockStyle
) -> nn.Sequential:
    """``blocks`` bottlenecks; the first one carries the stride and the projection."""
    layers = [Bottleneck(cin, width, cout, stride=stride, dilation=dilation, style=style)]
    layers += [Bottleneck(cout, width, cout, dilation=dilation, style=style) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def make_stages(
    cin: int, blocks: Sequence[int], width: int, cout: int, style: BlockStyle
) -> list[nn.Sequential]:
    """Stages res2, res3, ...: widths and outputs double per stage, stride 1 in res2 and 2 after."""
    stages = []
    for i, n in enumerate(blocks):
        stages.append(make_stage(n, cin, width << i, cout << i, stride=1 if i == 0 else 2, style=style))
        cin = cout << i
    return stages


class Stem(nn.Module):
    """7x7/2 conv + frozen BN + ReLU + 3x3/2 max-pool.

    ``caffe_pool``: Caffe's pool (no padding, ``ceil_mode``), as the BUTD model; otherwise the MSRA /
    torchvision pool (padding 1, floor), as maskrcnn-benchmark.
    """

    def __init__(self, channels: int, *, caffe_pool: bool, norm: type[FrozenBatchNorm2d] = FrozenBatchNorm2d):
        super().__init__()
        self.caffe_pool = caffe_pool
        self.conv1 = Conv2dNorm(3, channels, 7, stride=2, padding=3, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.conv1(x))
        if self.caffe_pool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """A stem and stages ``res2``, ``res3``, ...; returns the outputs of the last ``num_outputs`` stages."""

    def __init__(self, stem: Stem, stages: Sequence[nn.Module], num_outputs: int = 1):
        super().__init__()
        self.stem = stem
        self.stage_names = [f"res{i + 2}" for i in range(len(stages))]
        for name, stage in zip(self.stage_names, stages, strict=True):
            self.add_module(name, stage)
        self.num_outputs = num_outputs

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs[-self.num_outputs :]
