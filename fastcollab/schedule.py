"""Learning-rate schedules, evaluated at fractional epochs so that they step every iteration."""
from __future__ import annotations

import math
from typing import Sequence

from .errors import FastcollabError

SCHEDULES = ("piecewise", "cosine")


def scaled_drops(paper_drops: Sequence[float], paper_epochs: int, epochs: int) -> list[float]:
    """The paper's drop epochs moved proportionally to a run of ``epochs`` (a 12-epoch run of a 120-epoch
    recipe with drops at 75/90/100 drops at 7.5/9/10)."""
    return [d * epochs / paper_epochs for d in paper_drops]


class LRSchedule:
    """``lr(t) = base · factor(t)`` with ``t`` in epochs (float).

    - ``piecewise``: ×``gamma`` at each epoch in ``drops``;
    - ``cosine``: ``0.5·(1 + cos(π·t/epochs))`` (MMARD's schedule);
    - a constant warm-up first: ``factor = warmup_factor`` while ``t < warmup_epochs`` (a method declares it
      in its defaults as ``lr_warmup_epochs`` / ``lr_warmup_factor``: AODT, after LBGAT's first epoch at 0.02).
    """

    def __init__(self, kind: str, base_lr: float, epochs: int, drops: Sequence[float] = (), gamma: float = 0.1,
                 warmup_epochs: float = 0.0, warmup_factor: float = 1.0):
        if kind not in SCHEDULES:
            raise FastcollabError(f"unknown lr schedule {kind!r}: use {' or '.join(SCHEDULES)}")
        if not base_lr > 0:
            raise FastcollabError(f"--lr must be > 0, got {base_lr}")
        if epochs < 1:
            raise FastcollabError(f"--epochs must be >= 1, got {epochs}")
        if not warmup_epochs >= 0 or not warmup_factor > 0:
            raise FastcollabError(f"the lr warm-up needs epochs >= 0 and a factor > 0, got {warmup_epochs} and "
                                  f"{warmup_factor}: pass e.g. --lr-warmup-epochs 1 --lr-warmup-factor 0.2")
        self.kind, self.base_lr, self.epochs, self.gamma = kind, base_lr, epochs, gamma
        self.drops = sorted(float(d) for d in drops)
        self.warmup_epochs, self.warmup_factor = float(warmup_epochs), float(warmup_factor)

    @classmethod
    def from_config(cls, config) -> "LRSchedule":
        """The schedule a resolved run configuration asks for (warm-up only where the method declares one)."""
        return cls(config["schedule"], config["lr"], config["epochs"], config["lr_drops"],
                   warmup_epochs=config.get("lr_warmup_epochs", 0.0), warmup_factor=config.get("lr_warmup_factor", 1.0))

    def __call__(self, t: float) -> float:
        if t < self.warmup_epochs:
            return self.base_lr * self.warmup_factor
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(t, self.epochs) / self.epochs))
        return self.base_lr * self.gamma ** sum(t >= d for d in self.drops)
