"""The cohort: the method's peers as models, their optimizers and learning-rate schedules."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .methods import Method
from .schedule import LRSchedule


@dataclass
class Cohort:
    method: Method
    models: dict[str, nn.Module]                 # every model the method names, frozen teachers included
    optimizers: dict[str, torch.optim.Optimizer]  # one per trainable peer
    schedules: dict[str, LRSchedule]              # one per trainable peer

    @property
    def trainable(self) -> list[str]:
        return list(self.optimizers)

    def set_epoch_time(self, t: float) -> None:
        """Set every optimizer's learning rate for fractional epoch ``t``."""
        for name, opt in self.optimizers.items():
            lr = self.schedules[name](t)
            for group in opt.param_groups:
                group["lr"] = lr

    def lr(self, name: str) -> float:
        return self.optimizers[name].param_groups[0]["lr"]

    def train_mode(self) -> None:
        for name, m in self.models.items():
            m.train(name in self.optimizers)


def sgd_for(model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = False):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


def freeze(model: nn.Module) -> nn.Module:
    """A frozen model: eval mode, no parameter gradients (teachers)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
