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
    - ``cosine``: ``0.5·(1 + cos(π·t/epochs))`` (MMARD's schedule).
    """

    def __init__(self, kind: str, base_lr: float, epochs: int, drops: Sequence[float] = (), gamma: float = 0.1):
        if kind not in SCHEDULES:
            raise FastcollabError(f"unknown lr schedule {kind!r}: use {' or '.join(SCHEDULES)}")
        if not base_lr > 0:
            raise FastcollabError(f"--lr must be > 0, got {base_lr}")
        if epochs < 1:
            raise FastcollabError(f"--epochs must be >= 1, got {epochs}")
        self.kind, self.base_lr, self.epochs, self.gamma = kind, base_lr, epochs, gamma
        self.drops = sorted(float(d) for d in drops)

    def __call__(self, t: float) -> float:
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(t, self.epochs) / self.epochs))
        return self.base_lr * self.gamma ** sum(t >= d for d in self.drops)
