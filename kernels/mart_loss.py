"""MART's outer loss fused with the gradients to clean and adversarial logits; one program per row.

    loss = mean_i BCE(adv_i, y_i) + beta * mean_i [ KL(p(clean_i) || p(adv_i)) * (1 - p_y(clean_i)) ]

(DESIGN.md 2.1; MART's code writes 1.0000001 - p_y and log(p + 1e-12), below fp32 resolution here.)
The weight w_i = 1 - p_y(clean_i) is NOT detached. With KL_i = sum_c p_c (log p_c - log p_a):
    d/d adv   = [dBCE_i/dz + beta * w_i * (p_a - p_c)] / B
    d/d clean = beta / B * [ w_i * p_c * ((log p_c - log p_a) - KL_i)  -  KL_i * p_c,y * (e_y - p_c) ]
Returns the scalar loss (fp32); gradients in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_CLASS_BLOCK, as_rows, class_warps, row_block
from ._rowmath import _softmax_row
from .boosted_ce import _bce_row, _check_labels


@triton.jit
def _mart_kernel(c_ptr, a_ptr, y_ptr, loss_ptr, dc_ptr, da_ptr, C, beta, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row.to(tl.int64) * C
    zc = tl.load(c_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    za = tl.load(a_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row).to(tl.int32)
    is_y = offs == y

    bce, gbce, pa, lpa = _bce_row(za, is_y, offs, mask, BLOCK)
    pc, lpc = _softmax_row(zc, mask)
    diff = lpc - lpa
    kl = tl.sum(pc * diff, axis=0)
    pcy = tl.sum(tl.where(is_y, pc, 0.0), axis=0)
    w = tl.sum(tl.where(is_y, 0.0, pc), axis=0)  # 1 - p_y(clean) without cancellation
    tl.store(loss_ptr + row, (bce + beta * kl * w) * scale)
    da = (gbce + beta * w * (pa - pc)) * scale
    dc = beta * scale * (w * pc * (diff - kl) - kl * pcy * tl.where(is_y, w, -pc))
    tl.store(da_ptr + base + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(dc_ptr + base + offs, dc.to(dc_ptr.dtype.element_ty), mask=mask)


def mart_loss_fwd(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, beta: float = 6.0):
    """-> (loss, d loss/d clean, d loss/d adv)."""
    zc = as_rows(clean, "clean")
    za = as_rows(adv, "adv")
    if zc.shape != za.shape:
        raise ValueError(f"fastcollab.kernels.mart_loss_fwd: clean {list(zc.shape)} and adv {list(za.shape)} differ.")
    B, C = zc.shape
    if C < 2:
        raise ValueError("fastcollab.kernels.mart_loss_fwd: needs at least 2 classes.")
    yy = _check_labels(y, B, zc.device)
    row_loss = torch.empty(B, device=zc.device, dtype=torch.float32)
    dc = torch.empty_like(zc)
    da = torch.empty_like(za)
    if B > 0:
        block = row_block(C, MAX_CLASS_BLOCK, "class")
        _mart_kernel[(B,)](zc, za, yy, row_loss, dc, da, C, float(beta), 1.0 / B, BLOCK=block,
                           num_warps=class_warps(block))
    return row_loss.sum(), dc, da
