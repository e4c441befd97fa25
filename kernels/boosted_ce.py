"""MART's boosted cross-entropy, fused with its gradient; one Triton program per row.

    BCE_i = -log p_y - log(1.0001 - q),   q = max_{k != y} p_k,   p = softmax(logits_i)

(the formula of DESIGN.md; MART's released code adds 1e-12 inside the second log, which is below fp32
resolution next to 1.0001 - q >= 1e-4 and is not added here).

1.0001 - q, 1 - p_m and p_y - 1 are evaluated from sums of the other probabilities (exact in real
arithmetic, no cancellation in fp32 for confident rows).

Gradient (m = argmax_{k != y} p_k, lowest index on ties):
    d BCE_i / d z = (p - e_y) + q / (1.0001 - q) * (e_m - p)
Reductions "mean" (sum / B), "sum", "none". Labels are int64 class indices in [0, C); C >= 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_CLASS_BLOCK, as_rows, check_reduction, class_warps, finish_loss, row_block
from ._rowmath import _softmax_row

REDUCTIONS = ("mean", "sum", "none")
BCE_MARGIN = 1.0001


@triton.jit
def _bce_row(z, is_y, offs, mask, BLOCK: tl.constexpr):
    """(loss, dloss/dz, p, logp) of boosted CE for one row."""
    p, logp = _softmax_row(z, mask)
    lpy = tl.sum(tl.where(is_y, logp, 0.0), axis=0)
    cand = tl.where(mask & (~is_y), p, -1.0)
    q = tl.max(cand, axis=0)
    idx = tl.min(tl.where(cand == q, offs, BLOCK), axis=0)
    is_m = offs == idx
    # 1 - p_m and 1 - p_y as sums of the other probabilities: no cancellation when they approach 1
    # (the factor q / (1.0001 - q) amplifies the error of a plain 1.0001 - q by up to 1e4)
    s_m = tl.sum(tl.where(is_m, 0.0, p), axis=0)
    s_y = tl.sum(tl.where(is_y, 0.0, p), axis=0)
    one_m_q = 0.0001 + s_m
    loss = -lpy - tl.log(one_m_q)
    p_minus_ey = tl.where(is_y, -s_y, p)
    em_minus_p = tl.where(is_m, s_m, -p)
    grad = p_minus_ey + (q / one_m_q) * em_minus_p
    grad = tl.where(mask, grad, 0.0)
    return loss, grad, p, logp


@triton.jit
def _boosted_ce_kernel(z_ptr, y_ptr, loss_ptr, dz_ptr, C, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row.to(tl.int64) * C
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row).to(tl.int32)
    is_y = offs == y
    loss, grad, _p, _lp = _bce_row(z, is_y, offs, mask, BLOCK)
    tl.store(loss_ptr + row, loss * scale)
    tl.store(dz_ptr + base + offs, (grad * scale).to(dz_ptr.dtype.element_ty), mask=mask)


def _check_labels(y: torch.Tensor, B: int, device) -> torch.Tensor:
    if y.dim() != 1 or y.shape[0] != B:
        raise ValueError(f"fastcollab.kernels: labels must be a [B] = [{B}] integer tensor, got {list(y.shape)}.")
    if y.is_floating_point():
        raise ValueError("fastcollab.kernels: labels must be integer class indices.")
    return y.to(device=device, dtype=torch.int64).contiguous()


def boosted_ce_fwd(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """-> (loss, d loss/d logits)."""
    check_reduction(reduction, REDUCTIONS)
    z = as_rows(logits, "logits")
    B, C = z.shape
    if C < 2:
        raise ValueError("fastcollab.kernels.boosted_ce_fwd: needs at least 2 classes.")
    yy = _check_labels(y, B, z.device)
    scale = 1.0 / max(B, 1) if reduction == "mean" else 1.0
    row_loss = torch.empty(B, device=z.device, dtype=torch.float32)
    dz = torch.empty_like(z)
    if B > 0:
        block = row_block(C, MAX_CLASS_BLOCK, "class")
        _boosted_ce_kernel[(B,)](z, yy, row_loss, dz, C, scale, BLOCK=block,
                                 num_warps=class_warps(block))
    return finish_loss(row_loss, reduction), dz
