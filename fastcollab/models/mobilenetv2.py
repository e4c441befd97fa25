"""MobileNetV2 (Sandler et al., 2018), CIFAR variant.

For 32x32 inputs the stem is a stride-1 3x3 conv (32 channels) and the second stage (24 channels) keeps
stride 1, so the feature map is 4x4 before pooling (ImageNet strides would leave 1x1). Inverted residual
blocks (expand 1x1 - depthwise 3x3 - project 1x1, ReLU6, linear bottleneck), a 1x1 conv to 1280 channels,
global average pooling, a linear layer. About 2.2 M parameters, ~88 MMAC (176 MFLOP) per 32x32 image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcollab.models.registry import Normalize, init_weights, register_model

# (expansion t, output channels c, repeats n, first stride s) -- CIFAR strides.
_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int):
        super().__init__()
        hidden = c_in * expansion
        self.use_res = stride == 1 and c_in == c_out
        self.expand = None
        if expansion != 1:
            self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden))
        self.dw = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden)
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.expand(x)) if self.expand is not None else x
        out = self.project(F.relu6(self.dw(out)))
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        blocks, c_in = [], 32
        for t, c, n, s in _CFG:
            for j in range(n):
                blocks.append(InvertedResidual(c_in, c, t, s if j == 0 else 1))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c_in, 1280, 1, bias=False), nn.BatchNorm2d(1280))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(self.normalize(x)))
        x = F.relu6(self.head(self.blocks(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes)
