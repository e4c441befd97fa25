"""``nn.Module`` twins of the fused losses (DESIGN §4), with the signatures of the torch modules they
replace; each forward calls the functional op in :mod:`fastcollab.ops` (backend chosen per call)."""
from __future__ import annotations

import torch
from torch import nn

from . import ops

__all__ = [
    "KLDivLoss",
    "BoostedCrossEntropyLoss",
    "TradesKLLoss",
    "MARTLoss",
    "LogitMSELoss",
    "TriangleHuberLoss",
]


class KLDivLoss(nn.Module):
    """Distillation KL ``sum_c p_t^T (log p_t^T - log p_s^T)``; takes *logits* (unlike ``nn.KLDivLoss``).

    ``forward(student_logits, teacher_logits)``; reduction ``batchmean`` | ``mean`` (sum/(B*C)) | ``sum`` |
    ``none``; no T**2 factor; the teacher is detached unless ``detach_teacher=False``."""

    def __init__(self, reduction: str = "batchmean", T: float = 1.0, detach_teacher: bool = True):
        super().__init__()
        self.reduction, self.T, self.detach_teacher = reduction, T, detach_teacher

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return ops.kl_div(student_logits, teacher_logits, self.T, self.reduction, self.detach_teacher)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, T={self.T}, detach_teacher={self.detach_teacher}"


class BoostedCrossEntropyLoss(nn.Module):
    """MART boosted CE, drop-in for ``nn.CrossEntropyLoss(reduction=...)``: ``forward(logits, target)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return ops.boosted_ce(input, target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class TradesKLLoss(nn.Module):
    """TRADES ``KL(p(clean) || p(adv))``: ``forward(clean_logits, adv_logits)``, gradients to both."""

    def __init__(self, reduction: str = "batchmean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
        return ops.trades_kl(clean_logits, adv_logits, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class MARTLoss(nn.Module):
    """MART objective: ``forward(clean_logits, adv_logits, target)`` -> scalar."""

    def __init__(self, beta: float = 6.0):
        super().__init__()
        self.beta = beta

    def forward(self, clean_logits: torch.Tensor, adv_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.mart_loss(clean_logits, adv_logits, target, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class LogitMSELoss(nn.Module):
    """ALP logit pairing, like ``nn.MSELoss(reduction=...)``: ``forward(input, target)``; gradients flow
    to both arguments; ``none`` gives the per-example sum."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return ops.logit_mse(input, target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class TriangleHuberLoss(nn.Module):
    """MMARD triangular-relationship Huber loss: ``forward(s_nat, s_adv, t_nat, t_adv, target)``."""

    def __init__(self, delta: float = 1.0, use_probs: bool = True, reduction: str = "mean"):
        super().__init__()
        self.delta, self.use_probs, self.reduction = delta, use_probs, reduction

    def forward(self, s_nat, s_adv, t_nat, t_adv, target) -> torch.Tensor:
        return ops.triangle_huber(s_nat, s_adv, t_nat, t_adv, target, self.delta, self.use_probs, self.reduction)

    def extra_repr(self) -> str:
        return f"delta={self.delta}, use_probs={self.use_probs}, reduction={self.reduction!r}"
