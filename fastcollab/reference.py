"""Plain-PyTorch reference implementations of the fused ops (DESIGN §3, §4).

Everything here is autograd-native and written for clarity: it is the truth that the C++ (``csrc/``)
and Triton (``kernels/``) backends are tested against.  No function here synchronises with the host
(no ``.item()``, no data-dependent Python branching), so all of them can run under ``torch.compile``
and CUDA-graph capture.

Conventions
-----------
* Images are ``[B, C, H, W]`` or, with a leading peer dimension, ``[P, B, C, H, W]``.  A *row* (one
  example) is the last three dimensions flattened.
* ``eps`` / ``step`` are Python floats, 0-d tensors, or tensors of shape ``[P]`` (one value per peer,
  only with the peer dimension).  Tensor values are cast to the image dtype first.
* Losses upcast logits to fp32 (fp64 stays fp64) and return an fp32 (fp64) loss.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

Scalar = Union[float, int, torch.Tensor]

_NORM_EPS = 1e-12  # added to norms before dividing (DESIGN §3)
L1_K_MIN, L1_K_MAX = 5, 20  # l1 steepest ascent: k ~ U{5..20} (Maini et al. 2020)
_REDUCTIONS = ("batchmean", "mean", "sum", "none")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _per_row(value: Scalar, ref: torch.Tensor, dtype: torch.dtype) -> Union[float, torch.Tensor]:
    """Broadcastable form of a float / 0-d / per-peer ``[P]`` tensor against ``ref`` (image tensor).

    The result broadcasts against ``ref`` itself ([P,1,1,1,1] / [] shapes)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    v = value.to(device=ref.device, dtype=dtype)
    if v.dim() == 0:
        return v
    return v.reshape((v.shape[0],) + (1,) * (ref.dim() - 1))


def _per_row_flat(value: Scalar, lead_shape: torch.Size, dtype: torch.dtype, device) -> Union[float, torch.Tensor]:
    """Like :func:`_per_row` but for a ``[*lead, D]`` view of the images (per-peer value -> [P, 1, 1])."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    v = value.to(device=device, dtype=dtype)
    if v.dim() == 0:
        return v
    return v.reshape((v.shape[0],) + (1,) * len(lead_shape))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., C, H, W]`` -> ``[..., C*H*W]`` view (or copy if not viewable)."""
    return t.reshape(t.shape[:-3] + (-1,))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# l1 projection
# ---------------------------------------------------------------------------------------------
def project_l1_(delta: torch.Tensor, eps: Scalar) -> torch.Tensor:
    """Project every row of ``delta`` onto the l1 ball of radius ``eps``, in place; returns ``delta``.

    Duchi, Shalev-Shwartz, Singer & Chandra (2008), "Efficient projections onto the l1-ball", Fig. 1:
    ``mu = sort(|d|)`` descending, ``rho = max{j : mu_j > (sum_{r<=j} mu_r - eps) / j}``,
    ``theta = (sum_{r<=rho} mu_r - eps) / rho``, ``d <- sign(d) * max(|d| - theta, 0)``.

    Rows are the last three dims flattened; leading dims are batch (``[B,C,H,W]`` or ``[P,B,C,H,W]``).
    Only rows with ``||d||_1 > eps`` are changed: rows inside the ball are left bit-for-bit untouched.
    Math in fp32 (bf16/fp16 upcast; fp64 stays fp64).
    """
    cdt = _compute_dtype(delta)
    lead = delta.shape[:-3]
    d = _rows(delta).to(cdt)  # [*lead, D]
    D = d.shape[-1]
    e = _per_row_flat(eps, lead, cdt, delta.device)
    if isinstance(e, torch.Tensor) and e.dim() > 0:
        e_row = e.squeeze(-1)  # [P, 1] against the [*lead] l1 norms
    else:
        e_row = e
    a = d.abs()
    l1 = a.sum(-1)  # [*lead]
    outside = l1 > e_row
    mu = torch.sort(a, dim=-1, descending=True).values
    cs = torch.cumsum(mu, dim=-1)
    j = torch.arange(1, D + 1, device=delta.device, dtype=cdt)
    cond = mu * j > (cs - e)  # mu_j > (cs_j - eps) / j, multiplied through by j > 0
    rho = (cond.to(cdt) * j).amax(dim=-1, keepdim=True).clamp_min(1.0)  # >= 1 (eps = 0 edge case)
    cs_rho = torch.gather(cs, -1, (rho - 1).long())
    theta = (cs_rho - e) / rho
    proj = torch.sign(d) * (a - theta).clamp_min(0.0)
    src = _rows(delta)
    new = torch.where(outside.unsqueeze(-1), proj.to(delta.dtype), src)
    delta.copy_(new.reshape(delta.shape))
    return delta


# ---------------------------------------------------------------------------------------------
# PGD step
# ---------------------------------------------------------------------------------------------
def draw_l1_k(lead_shape, device) -> torch.Tensor:
    """Per-example k ~ U{5..20} for the l1 steepest-ascent step (int64, on ``device``, no host sync)."""
    return torch.randint(L1_K_MIN, L1_K_MAX + 1, tuple(lead_shape), device=device, dtype=torch.int64)


def _pgd_linf_(x_adv, grad, x, eps, step):
    dt = x_adv.dtype
    e = _per_row(eps, x_adv, dt)
    s = _per_row(step, x_adv, dt)
    t = x_adv + torch.sign(grad) * s
    t = torch.minimum(torch.maximum(t, x - e), x + e)
    return x_adv.copy_(torch.clamp(t, 0.0, 1.0))


def _pgd_l2_(x_adv, grad, x, eps, step):
    cdt = _compute_dtype(x_adv)
    e = _per_row(eps, x_adv, cdt)
    s = _per_row(step, x_adv, cdt)
    g = grad.to(cdt)
    gn = _rows(g).norm(dim=-1)[(...,) + (None,) * 3]
    t = x_adv.to(cdt) + s * (g / (gn + _NORM_EPS))
    xc = x.to(cdt)
    d = t - xc
    dn = _rows(d).norm(dim=-1)[(...,) + (None,) * 3]
    d = d * torch.clamp(e / (dn + _NORM_EPS), max=1.0)
    return x_adv.copy_(torch.clamp(xc + d, 0.0, 1.0))


def _pgd_l1_(x_adv, grad, x, eps, step, l1_k):
    cdt = _compute_dtype(x_adv)
    lead = x_adv.shape[:-3]
    if l1_k is None:
        l1_k = draw_l1_k(lead, x_adv.device)
    elif not isinstance(l1_k, torch.Tensor):
        l1_k = torch.full(tuple(lead), int(l1_k), dtype=torch.int64, device=x_adv.device)
    k = l1_k.to(device=x_adv.device, dtype=torch.int64).expand(lead)
    xa = _rows(x_adv).to(cdt)  # [*lead, D]
    g = _rows(grad).to(cdt)
    D = xa.shape[-1]
    s = _per_row_flat(step, lead, cdt, x_adv.device)
    # Maini et al.'s mask (robust_union, l1_dir_topk with gap = step): within one step of an edge and moving
    # towards it, or on / past an edge whatever the gradient
    gap = torch.as_tensor(s, dtype=cdt, device=x_adv.device)  # 1 - gap in the compute dtype, as the kernels
    stuck = ((xa <= gap) & (g < 0)) | ((xa >= 1 - gap) & (g > 0)) | (xa <= 0) | (xa >= 1)
    score = torch.where(stuck, torch.zeros_like(g), g.abs())
    kk = min(L1_K_MAX, D)
    idx = torch.topk(score, kk, dim=-1).indices  # [*lead, kk]
    ranks = torch.arange(kk, device=x_adv.device)
    keep = ranks < k.unsqueeze(-1)
    mag = s * float(L1_K_MAX) / k.to(cdt).unsqueeze(-1)  # step * 20 / k, [*lead, 1]
    gsel = torch.gather(g, -1, idx)
    movable = ~torch.gather(stuck, -1, idx)
    upd = torch.where(keep & movable, mag * torch.sign(gsel), torch.zeros_like(gsel))
    step_vec = torch.zeros_like(xa).scatter_(-1, idx, upd)
    xc = _rows(x.expand_as(x_adv)).to(cdt)
    d = (xa + step_vec) - xc
    d = project_l1_(d.reshape(x_adv.shape), eps)
    x_adv.copy_(torch.clamp(xc.reshape(x_adv.shape) + d, 0.0, 1.0))
    return x_adv


def pgd_step_(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    eps: Scalar,
    step: Scalar,
    norm: str = "linf",
    l1_k: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """One PGD ascent step, in place on ``x_adv`` (returned).  DESIGN §3.

    * ``linf``: ``t = x_adv + step*sign(grad)`` (sign(0)=0), ``t = min(max(t, x-eps), x+eps)``,
      ``clamp(t, 0, 1)`` -- all in the tensor dtype (this op order is what the fused kernels match
      bit-for-bit in fp32).
    * ``l2``: ``g = grad/(||grad||+1e-12)`` per example, ``d = x_adv + step*g - x``,
      ``d *= min(1, eps/(||d||+1e-12))``, ``x_adv = clamp(x + d, 0, 1)`` (math in fp32 or better).
    * ``l1``: steepest ascent of Maini, Wong & Kolter (2020), "Adversarial robustness against the union
      of multiple perturbation models": coordinates that should not move are masked, as their code does
      (``l1_dir_topk`` with ``gap = step``): ``x_adv <= step`` with grad<0, ``x_adv >= 1-step`` with
      grad>0, and ``x_adv <= 0`` or ``x_adv >= 1`` whatever the gradient; per example the top-k movable
      coordinates by |grad| move by ``step*20/k*sign(grad)``, k ~ U{5..20} drawn per example per call (or ``l1_k``); then
      ``d = x_adv - x`` is projected on the l1 ball (:func:`project_l1_`) and ``x+d`` clamped to [0,1].

    ``x`` may be ``[B,C,H,W]`` while ``x_adv`` is ``[P,B,C,H,W]`` (clean images shared by the peers).
    """
    if norm == "linf":
        return _pgd_linf_(x_adv, grad, x, eps, step)
    if norm == "l2":
        return _pgd_l2_(x_adv, grad, x, eps, step)
    if norm == "l1":
        return _pgd_l1_(x_adv, grad, x, eps, step, l1_k)
    raise ValueError(f"unknown norm {norm!r}; use 'linf', 'l2' or 'l1'")


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(_compute_dtype(t))


def _reduce(per: torch.Tensor, reduction: str, n_classes: int) -> torch.Tensor:
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "batchmean":
        return per.sum() / per.shape[0]
    if reduction == "mean":
        return per.sum() / (per.shape[0] * n_classes)
    raise ValueError(f"unknown reduction {reduction!r}; use one of {_REDUCTIONS}")


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log q_c) per row, with 0*log0 = 0."""
    p = log_p.exp()
    term = p * (log_p - log_q)
    return torch.where(p > 0, term, torch.zeros_like(term)).sum(-1)


def kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    T: float = 1.0,
    reduction: str = "batchmean",
    detach_teacher: bool = True,
) -> torch.Tensor:
    """Distillation KL, per example ``sum_c p_t^T (log p_t^T - log p_s^T)`` with ``p^T = softmax(z/T)``.

    Hinton et al. (2015) temperature KD as used by ARD (Goldblum et al. 2020) / RSLAD and the MAT paper
    (shared/papers/mat_*, Eq. 2: ``L_KD = D_KL(p_peer(x) || p_self(x_adv))``).  Reductions:
    ``batchmean`` = sum/B, ``mean`` = sum/(B*C) (the factor C of ARD/RSLAD's original code), ``sum``,
    ``none`` ([B]).  No ``T**2`` factor inside: callers multiply.  The teacher is detached unless
    ``detach_teacher=False``.
    """
    s = _up(student_logits)
    t = _up(teacher_logits)
    if detach_teacher:
        t = t.detach()
    ls = F.log_softmax(s / T, dim=-1)
    lt = F.log_softmax(t / T, dim=-1)
    return _reduce(_kl_rows(lt, ls), reduction, s.shape[-1])


def _bce_rows(logits_up: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp = F.log_softmax(logits_up, dim=-1)
    p = lp.exp()
    yi = y.long().unsqueeze(-1)
    nll = -torch.gather(lp, -1, yi).squeeze(-1)
    other = torch.scatter(p, -1, yi, torch.zeros_like(p[..., :1])).amax(-1)
    return nll - torch.log(1.0001 - other)


def boosted_ce(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Boosted cross entropy, MART (Wang et al. 2020) Eq. 8 / MAT paper (shared/papers/mat_*) L_C:
    ``-log p_y - log(1.0001 - max_{k != y} p_k)``.  Reduction ``mean`` (over B), ``sum`` or ``none``."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    per = _bce_rows(_up(logits), y)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """TRADES robust term, Zhang et al. (2019) Eq. 5 with the KL surrogate of their code:
    ``KL(p(clean) || p(adv))`` per example; gradients flow to BOTH inputs.  Reductions as :func:`kl_div`."""
    c = _up(clean_logits)
    a = _up(adv_logits)
    return _reduce(_kl_rows(F.log_softmax(c, -1), F.log_softmax(a, -1)), reduction, c.shape[-1])


def mart_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float = 6.0) -> torch.Tensor:
    """MART objective, Wang et al. (2020) (Eq. 8 BCE plus the weighted KL regulariser):
    ``mean_i BCE(p(adv_i), y_i) + beta * mean_i[ KL(p(clean_i) || p(adv_i)) * (1 - p_{y_i}(clean_i)) ]``.

    As in the authors' code, gradients flow to both inputs, including through the ``1 - p_y(clean)``
    weight."""
    c = _up(clean_logits)
    a = _up(adv_logits)
    bce = _bce_rows(a, y)
    lc = F.log_softmax(c, -1)
    kl = _kl_rows(lc, F.log_softmax(a, -1))
    py = torch.gather(lc.exp(), -1, y.long().unsqueeze(-1)).squeeze(-1)
    return bce.mean() + beta * (kl * (1.0 - py)).mean()


def logit_mse(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Logit pairing, ALP (Kannan et al. 2018): squared error ``(a - b)^2``.  ``mean`` over all elements
    (like ``nn.MSELoss``), ``sum``, or ``none`` = per-example sum ([B]).  Gradients to both inputs."""
    d = _up(a) - _up(b)
    sq = d * d
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    if reduction == "none":
        return sq.reshape(sq.shape[0], -1).sum(-1)
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    ar = r.abs()
    return torch.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _triangle_cos(nat: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, use_probs: bool) -> torch.Tensor:
    if use_probs:
        nat = torch.softmax(nat, -1)
        adv = torch.softmax(adv, -1)
    oh = F.one_hot(y.long(), nat.shape[-1]).to(nat.dtype)
    u = nat - oh
    v = adv - oh
    un = u.norm(dim=-1).clamp_min(_NORM_EPS)
    vn = v.norm(dim=-1).clamp_min(_NORM_EPS)
    return (u * v).sum(-1) / (un * vn)


def triangle_huber(
    s_nat: torch.Tensor,
    s_adv: torch.Tensor,
    t_nat: torch.Tensor,
    t_adv: torch.Tensor,
    y: torch.Tensor,
    delta: float = 1.0,
    use_probs: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triangular relationship distillation, MMARD (shared/papers/mmard_*, Eq. 5 and Eq. 6).

    For a model M: ``u = p_M(x) - onehot(y)``, ``v = p_M(x') - onehot(y)``,
    ``psi_M = <u, v> / (max(||u||, 1e-12) * max(||v||, 1e-12))`` (Eq. 5: cosine of the angle at the
    label vertex, between the natural and the adversarial prediction); per example
    ``loss_i = Huber_delta(psi_S - psi_T)`` (Eq. 6, ``l_delta`` = Huber).  We follow the paper's
    ``T(x)`` = predicted distribution, i.e. softmax (``use_probs=True``); ``use_probs=False`` uses raw
    logits.  Eq. 6 sums over examples; ``reduction='mean'`` (default) divides by B, ``'sum'``, ``'none'``.
    Teacher inputs are constants (detached).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    ps = _triangle_cos(_up(s_nat), _up(s_adv), y, use_probs)
    pt = _triangle_cos(_up(t_nat).detach(), _up(t_adv).detach(), y, use_probs)
    per = _huber(ps - pt, delta)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


__all__ = [
    "pgd_step_",
    "project_l1_",
    "draw_l1_k",
    "kl_div",
    "boosted_ce",
    "trades_kl",
    "mart_loss",
    "logit_mse",
    "triangle_huber",
]
