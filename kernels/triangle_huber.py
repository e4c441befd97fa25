"""MMARD's triangle term, fused with the student's gradients; one Triton program per row.

For M in {S (student), T (teacher, constant)}, with one-hot y and f = softmax (use_probs) or identity:
    u = f(M(x)) - e_y,  v = f(M(x')) - e_y
    psi_M = <u, v> / (max(||u||, 1e-12) * max(||v||, 1e-12))          (cosine at the vertex y)
    r_i = psi_S,i - psi_T,i;  loss = mean_i Huber_delta(r_i),
    Huber_delta(r) = 0.5 r^2 if |r| <= delta else delta (|r| - 0.5 delta)
Gradients (h = Huber'(r) * scale; n_u = max(||u||, 1e-12), the second term only where ||u|| > 1e-12):
    d psi/d u = v / (n_u n_v) - psi u / n_u^2,   d psi/d v symmetric
    use_probs: d/dz = p * (g - <g, p>) (softmax Jacobian), else d/dz = g
Reductions "mean" (default, the paper's), "sum", "none". With probabilities, u_y = p_y - 1 is evaluated
as -sum_{k != y} p_k (no cancellation for confident predictions).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_CLASS_BLOCK, as_rows, check_reduction, class_warps, finish_loss, row_block
from ._rowmath import _sign, _softmax_row
from .boosted_ce import _check_labels

REDUCTIONS = ("mean", "sum", "none")
NORM_EPS = 1e-12


@triton.jit
def _vertex_vec(z, onehot, mask, USE_PROBS: tl.constexpr):
    if USE_PROBS:
        p, _lp = _softmax_row(z, mask)
        # p_y - 1 = -sum_{k != y} p_k: no cancellation when the prediction is confident
        not_y = tl.where(onehot > 0.0, 0.0, p)
        u = tl.where(onehot > 0.0, -tl.sum(not_y, axis=0), not_y)
    else:
        p = z
        u = tl.where(mask, z - onehot, 0.0)
    return u, p


@triton.jit
def _triangle_huber_kernel(sn_ptr, sa_ptr, tn_ptr, ta_ptr, y_ptr, loss_ptr, dsn_ptr, dsa_ptr,
                           C, delta, scale, USE_PROBS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row.to(tl.int64) * C
    y = tl.load(y_ptr + row).to(tl.int32)
    onehot = (offs == y).to(tl.float32)
    sn = tl.load(sn_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    sa = tl.load(sa_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tn = tl.load(tn_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    ta = tl.load(ta_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)

    u, pu = _vertex_vec(sn, onehot, mask, USE_PROBS)
    v, pv = _vertex_vec(sa, onehot, mask, USE_PROBS)
    nu_raw = tl.sqrt(tl.sum(u * u, axis=0))
    nv_raw = tl.sqrt(tl.sum(v * v, axis=0))
    nu = tl.maximum(nu_raw, 1e-12)
    nv = tl.maximum(nv_raw, 1e-12)
    psi = tl.sum(u * v, axis=0) / (nu * nv)

    tu, _pt = _vertex_vec(tn, onehot, mask, USE_PROBS)
    tv, _pt2 = _vertex_vec(ta, onehot, mask, USE_PROBS)
    tnu = tl.maximum(tl.sqrt(tl.sum(tu * tu, axis=0)), 1e-12)
    tnv = tl.maximum(tl.sqrt(tl.sum(tv * tv, axis=0)), 1e-12)
    psi_t = tl.sum(tu * tv, axis=0) / (tnu * tnv)

    r = psi - psi_t
    ar = tl.abs(r)
    small = ar <= delta
    hub = tl.where(small, 0.5 * r * r, delta * (ar - 0.5 * delta))
    tl.store(loss_ptr + row, hub * scale)
    h = tl.where(small, r, delta * _sign(r)) * scale

    cu = tl.where(nu_raw > 1e-12, psi / (nu * nu), 0.0)
    cv = tl.where(nv_raw > 1e-12, psi / (nv * nv), 0.0)
    gu = h * (v / (nu * nv) - cu * u)
    gv = h * (u / (nu * nv) - cv * v)
    if USE_PROBS:
        gu = pu * (gu - tl.sum(gu * pu, axis=0))
        gv = pv * (gv - tl.sum(gv * pv, axis=0))
    tl.store(dsn_ptr + base + offs, gu.to(dsn_ptr.dtype.element_ty), mask=mask)
    tl.store(dsa_ptr + base + offs, gv.to(dsa_ptr.dtype.element_ty), mask=mask)


def triangle_huber_fwd(s_nat: torch.Tensor, s_adv: torch.Tensor, t_nat: torch.Tensor, t_adv: torch.Tensor,
                       y: torch.Tensor, delta: float = 1.0, use_probs: bool = True, reduction: str = "mean"):
    """-> (loss, d loss/d s_nat, d loss/d s_adv). The teacher logits get no gradient."""
    check_reduction(reduction, REDUCTIONS)
    sn = as_rows(s_nat, "s_nat")
    sa = as_rows(s_adv, "s_adv")
    tn = as_rows(t_nat, "t_nat")
    ta = as_rows(t_adv, "t_adv")
    for name, t in (("s_adv", sa), ("t_nat", tn), ("t_adv", ta)):
        if t.shape != sn.shape:
            raise ValueError(
                f"fastcollab.kernels.triangle_huber_fwd: {name} has shape {list(t.shape)}, s_nat {list(sn.shape)}."
            )
    B, C = sn.shape
    yy = _check_labels(y, B, sn.device)
    scale = 1.0 / max(B, 1) if reduction == "mean" else 1.0
    row_loss = torch.empty(B, device=sn.device, dtype=torch.float32)
    dsn = torch.empty_like(sn)
    dsa = torch.empty_like(sa)
    if B > 0:
        block = row_block(C, MAX_CLASS_BLOCK, "class")
        _triangle_huber_kernel[(B,)](sn, sa, tn, ta, yy, row_loss, dsn, dsa, C, float(delta), scale,
                                     USE_PROBS=bool(use_probs), BLOCK=block,
                                     num_warps=class_warps(block))
    return finish_loss(row_loss, reduction), dsn, dsa
