"""Batched projection onto the l1 ball (Duchi et al., 2008), in place, one Triton program per row.

Row = the last three dims flattened (C*H*W); every leading dim is a batch dim ([B,C,H,W] or
[P,B,C,H,W]). ``eps`` is a float, a 0-d tensor, or a tensor whose shape is a prefix of the leading dims
(e.g. [P]: one radius per peer).

Math (fp32; fp64 for fp64 tensors): for a row d with ||d||_1 > eps, find theta >= 0 with
sum_i max(|d_i| - theta, 0) = eps and set d <- sign(d) * max(|d| - theta, 0). Rows with ||d||_1 <= eps are not written at all (bit-exact).

Instead of Duchi's sort (awkward in registers) theta is bracketed by bisection on the monotone function
f(theta) = sum max(|d| - theta, 0) (N_BISECT halvings of [0, max|d|], each a register reduction), then
made exact by the Michelot/Condat fixed-point step theta <- (sum_{|d|>theta} |d| - eps) / #{|d|>theta},
which, started below theta*, increases monotonically and lands on Duchi's theta as soon as the support
is right (after the bisection it is, up to elements within one fp32 ulp of theta*, which do not change
the value). The result equals Duchi's closed form up to fp32 rounding of the sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, per_group_param, row_block, row_warps

N_BISECT = 40
N_REFINE = 3


@triton.jit
def _upcast(v):
    """fp32 registers for fp32/bf16/fp16 storage, fp64 for fp64 (static branch on the dtype)."""
    if v.dtype == tl.float64:
        return v
    else:
        return v.to(tl.float32)


@triton.jit
def _l1_theta(ad, eps, N_BISECT: tl.constexpr, N_REFINE: tl.constexpr):
    """theta for the l1-ball projection of a row with magnitudes ``ad`` (0 on masked lanes)."""
    lo = tl.max(ad, axis=0) * 0.0
    hi = tl.max(ad, axis=0)
    for _ in range(N_BISECT):
        mid = 0.5 * (lo + hi)
        f = tl.sum(tl.maximum(ad - mid, 0.0), axis=0)
        go = f > eps
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    theta = lo
    for _ in range(N_REFINE):
        supp = ad > theta
        cnt = tl.sum(supp.to(tl.float32), axis=0)
        tot = tl.sum(tl.where(supp, ad, 0.0), axis=0)
        theta = tl.maximum(theta, (tot - eps) / tl.maximum(cnt, 1.0))
    return theta


@triton.jit
def _l1_project_row(d, eps, N_BISECT: tl.constexpr, N_REFINE: tl.constexpr):
    """(projected row, outside-ball flag). ``d`` must be 0 on masked lanes."""
    ad = tl.abs(d)
    outside = tl.sum(ad, axis=0) > eps
    theta = _l1_theta(ad, eps, N_BISECT, N_REFINE)
    mag = tl.maximum(ad - theta, 0.0)
    proj = tl.where(d < 0, -mag, mag)
    return tl.where(outside, proj, d), outside


@triton.jit
def _project_l1_kernel(d_ptr, eps_ptr, row_len, rows_per_group,
                       BLOCK: tl.constexpr, N_BISECT: tl.constexpr, N_REFINE: tl.constexpr):
    row = tl.program_id(0)
    eps = tl.load(eps_ptr + row // rows_per_group)
    offs = tl.arange(0, BLOCK)
    mask = offs < row_len
    ptrs = d_ptr + row.to(tl.int64) * row_len + offs
    d = _upcast(tl.load(ptrs, mask=mask, other=0.0))
    out, outside = _l1_project_row(d, eps, N_BISECT, N_REFINE)
    # rows inside the ball are not written at all: bit-exact by construction
    store_mask = tl.where(outside, mask, offs < 0)
    tl.store(ptrs, out.to(d_ptr.dtype.element_ty), mask=store_mask)


def project_l1_(delta: torch.Tensor, eps) -> torch.Tensor:
    """Project every row of ``delta`` onto the l1 ball of radius ``eps``, in place; returns ``delta``."""
    if delta.dim() < 3:
        raise ValueError(
            f"fastcollab.kernels.project_l1_: delta must have >= 3 dims ([..., C, H, W]), got {list(delta.shape)}."
        )
    if not delta.is_floating_point():
        raise ValueError("fastcollab.kernels.project_l1_: delta must be a floating-point tensor.")
    lead = tuple(delta.shape[:-3])
    row_len = delta.shape[-1] * delta.shape[-2] * delta.shape[-3]
    n_rows = delta.numel() // max(row_len, 1)
    if n_rows == 0 or row_len == 0:
        return delta
    cdt = compute_dtype(delta)
    eps_t, rpg = per_group_param(eps, lead, delta.device, "eps", cdt)
    block = row_block(row_len)
    work = delta.contiguous()
    _project_l1_kernel[(n_rows,)](
        work, eps_t, row_len, rpg, BLOCK=block, N_BISECT=N_BISECT, N_REFINE=N_REFINE,
        num_warps=row_warps(block),
    )
    if work.data_ptr() != delta.data_ptr():
        delta.copy_(work)
    return delta
