"""CIFAR ResNet-18 (He et al., 2016, in the common CIFAR form).

3x3 stride-1 stem (64 channels) without max-pooling, post-activation BasicBlocks [2, 2, 2, 2] with widths
64/128/256/512 and strides 1/2/2/2, global average pooling, one linear layer. About 0.56 GMAC
(1.11 GFLOP counted by torch.utils.flop_counter) per 32x32 image, 11.2 M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcollab.models.registry import Normalize, init_weights, register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c_in = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c_in, w, stride if j == 0 else 1))
                c_in = w
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet18")
def resnet18(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-18 (~0.56 GMAC / 1.11 GFLOP per 32x32 image)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)
