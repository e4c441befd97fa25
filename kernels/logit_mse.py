"""Mean squared error between two logit tensors (ALP, ADT/AODT), fused with both gradients.

    "mean": sum_{i,c} (a - b)^2 / (B*C)     "sum": sum_{i,c} (a - b)^2
    "batchmean": sum / B                    "none": [B] per-row sums sum_c (a_ic - b_ic)^2
    d/da = 2 (a - b) * scale,  d/db = -d/da
One Triton program per row; per-row partial losses are summed by torch (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_CLASS_BLOCK, as_rows, check_reduction, class_warps, finish_loss, row_block

REDUCTIONS = ("mean", "sum", "batchmean", "none")


@triton.jit
def _logit_mse_kernel(a_ptr, b_ptr, loss_ptr, da_ptr, db_ptr, C, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row.to(tl.int64) * C
    a = tl.load(a_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    d = a - b
    tl.store(loss_ptr + row, tl.sum(d * d, axis=0) * scale)
    g = 2.0 * d * scale
    tl.store(da_ptr + base + offs, g.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + base + offs, (-g).to(db_ptr.dtype.element_ty), mask=mask)


def logit_mse_fwd(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean"):
    """-> (loss, d loss/d a, d loss/d b)."""
    check_reduction(reduction, REDUCTIONS)
    aa = as_rows(a, "a")
    bb = as_rows(b, "b")
    if aa.shape != bb.shape:
        raise ValueError(f"fastcollab.kernels.logit_mse_fwd: shapes {list(aa.shape)} and {list(bb.shape)} differ.")
    B, C = aa.shape
    scale = {"mean": 1.0 / max(B * C, 1), "sum": 1.0, "batchmean": 1.0 / max(B, 1), "none": 1.0}[reduction]
    row_loss = torch.empty(B, device=aa.device, dtype=torch.float32)
    da = torch.empty_like(aa)
    db = torch.empty_like(bb)
    if B > 0:
        block = row_block(C, MAX_CLASS_BLOCK, "class")
        _logit_mse_kernel[(B,)](aa, bb, row_loss, da, db, C, scale, BLOCK=block,
                                num_warps=class_warps(block))
    return finish_loss(row_loss, reduction), da, db
