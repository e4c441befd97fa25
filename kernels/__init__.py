"""fastcollab Triton kernels (installed as ``fastcollab.kernels``; also importable as top-level ``kernels``).

GPU kernels; on a CPU-only machine they run under ``TRITON_INTERPRET=1`` (set before importing triton).
Only relative imports are used inside this package. API:

    pgd_step_(x_adv, grad, x, eps, step, norm, l1_k=None) -> x_adv          (in place)
    project_l1_(delta, eps) -> delta                                          (in place)
    kl_div_fwd(student, teacher, T, reduction, teacher_grad) -> (loss, dstudent, dteacher | None)
    boosted_ce_fwd(logits, y, reduction) -> (loss, dlogits)
    trades_kl_fwd(clean, adv, reduction) -> (loss, dclean, dadv)
    logit_mse_fwd(a, b, reduction) -> (loss, da, db)
    triangle_huber_fwd(s_nat, s_adv, t_nat, t_adv, y, delta, use_probs, reduction="mean")
        -> (loss, ds_nat, ds_adv)
    mart_loss_fwd(clean, adv, y, beta) -> (loss, dclean, dadv)
"""
from .boosted_ce import boosted_ce_fwd
from .kl_div import kl_div_fwd
from .logit_mse import logit_mse_fwd
from .mart_loss import mart_loss_fwd
from .pgd_step import pgd_step_
from .project_l1 import project_l1_
from .trades_kl import trades_kl_fwd
from .triangle_huber import triangle_huber_fwd

__all__ = [
    "pgd_step_",
    "project_l1_",
    "kl_div_fwd",
    "boosted_ce_fwd",
    "trades_kl_fwd",
    "logit_mse_fwd",
    "triangle_huber_fwd",
    "mart_loss_fwd",
]
