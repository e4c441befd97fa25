"""TRADES robust loss KL(p(clean) || p(adv)) fused with its gradients to both inputs.

It is kl_div with student = adv, teacher = clean, T = 1 and the teacher gradient on (TRADES
back-propagates through p(clean) in the outer loss). Reductions as kl_div ("batchmean" is TRADES' own:
sum over classes, mean over the batch).
"""
from __future__ import annotations

import torch

from .kl_div import _launch_kl


def trades_kl_fwd(clean: torch.Tensor, adv: torch.Tensor, reduction: str = "batchmean"):
    """-> (loss, d loss/d clean, d loss/d adv)."""
    loss, dadv, dclean = _launch_kl(adv, clean, 1.0, reduction, True)
    return loss, dclean, dadv
