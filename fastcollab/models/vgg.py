"""VGG-16 with BatchNorm (Simonyan & Zisserman, 2015), CIFAR form.

13 3x3 conv-BN-ReLU layers in five stages (64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3), 2x2 max-pooling
after each stage, global average pooling (1x1 at 32x32 input, so any size >= 32 works) and one linear layer
512 -> classes. About 14.7 M parameters, ~0.31 GMAC (0.63 GFLOP) per 32x32 image.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcollab.models.registry import Normalize, init_weights, register_model

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg=_VGG16, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        layers, c_in = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("vgg16")
def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm."""
    return VGG(_VGG16, num_classes)
