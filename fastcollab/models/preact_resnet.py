"""CIFAR pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", 2016).

3x3 stride-1 stem, PreActBlocks [2, 2, 2, 2] (BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut; the projection
shortcut, when the shape changes, is taken from the pre-activated input), a final BN-ReLU, global average
pooling and a linear layer. Same compute as ResNet-18 (~0.56 GMAC per 32x32 image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcollab.models.registry import Normalize, init_weights, register_model


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class PreActResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages, c_in = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(PreActBlock(c_in, w, stride if j == 0 else 1))
                c_in = w
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int = 10) -> PreActResNet:
    """CIFAR PreAct ResNet-18."""
    return PreActResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)
