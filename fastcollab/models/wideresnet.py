"""Wide ResNets (Zagoruyko & Komodakis, 2016): ``wrn-{depth}-{width}``, depth = 6n + 4.

16-channel 3x3 stem, three groups of n pre-activation basic blocks with 16k / 32k / 64k channels (k = width)
and strides 1 / 2 / 2, a final BN-ReLU, global average pooling, a linear layer; no dropout. This is the
WRN of the TRADES / MART / MAT code (a 1x1 projection shortcut on the pre-activated input when the shape
changes). WRN-34-10: 46.2 M parameters, 6.66 GMAC (13.3 GFLOP) per 32x32 image; WRN-28-10: 36.5 M,
5.24 GMAC (10.5 GFLOP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcollab.errors import FastcollabError
from fastcollab.models.preact_resnet import PreActBlock
from fastcollab.models.registry import Normalize, init_weights, register_model, register_model_pattern


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, width: int = 10, num_classes: int = 10):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise FastcollabError(
                f"WideResNet depth {depth!r} is not 6n+4 with n >= 1; use a depth such as 10, 16, 22, 28, 34 or 40"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise FastcollabError(f"WideResNet width {width!r} must be an integer >= 1; use e.g. wrn-28-10")
        n = (depth - 4) // 6
        self.depth, self.width = depth, width
        self.normalize = Normalize()
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        groups, c_in = [], 16
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(c_in, w, (1 if i == 0 else 2) if j == 0 else 1))
                c_in = w
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("wrn-34-10")
def wrn_34_10(num_classes: int = 10) -> WideResNet:
    return WideResNet(34, 10, num_classes)


@register_model("wrn-28-10")
def wrn_28_10(num_classes: int = 10) -> WideResNet:
    return WideResNet(28, 10, num_classes)


@register_model_pattern(r"wrn-(\d+)-(\d+)", "wrn-{depth}-{width} (depth = 6n+4)")
def _wrn_from_name(match, num_classes: int) -> WideResNet:
    return WideResNet(int(match.group(1)), int(match.group(2)), num_classes)
