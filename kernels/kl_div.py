"""Fused KL divergence with temperature: loss and gradients in one pass, one Triton program per row.

Per row i:  KL_i = sum_c p_t (log p_t - log p_s),  p_s = softmax(student/T), p_t = softmax(teacher/T).
Reductions: "batchmean" = sum_i KL_i / B, "mean" = sum_i KL_i / (B*C) (the factor C between them is what
ARD/RSLAD's original code has), "sum", "none" ([B] per-row losses).

Gradients (for upstream gradient 1; for "none" they are the per-row d KL_i / d logits_i):
    d/d student = (p_s - p_t) / T * scale
    d/d teacher = p_t * ((log p_t - log p_s) - KL_i) / T * scale      (softmax Jacobian of p_t)
The T^2 factor of Hinton-style distillation is NOT included (the op/method multiplies it in).
Losses are fp32; gradients have the dtype of their input. Math is fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_CLASS_BLOCK, as_rows, check_reduction, class_warps, finish_loss, row_block
from ._rowmath import _softmax_row

REDUCTIONS = ("batchmean", "mean", "sum", "none")


@triton.jit
def _kl_div_kernel(s_ptr, t_ptr, loss_ptr, ds_ptr, dt_ptr, C, T, scale,
                   TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row.to(tl.int64) * C
    s = tl.load(s_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) / T
    t = tl.load(t_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) / T
    ps, lps = _softmax_row(s, mask)
    pt, lpt = _softmax_row(t, mask)
    diff = lpt - lps
    kl = tl.sum(pt * diff, axis=0)
    tl.store(loss_ptr + row, kl * scale)
    ds = (ps - pt) / T * scale
    tl.store(ds_ptr + base + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        dt = pt * (diff - kl) / T * scale
        tl.store(dt_ptr + base + offs, dt.to(dt_ptr.dtype.element_ty), mask=mask)


def _launch_kl(student, teacher, T, reduction, teacher_grad):
    check_reduction(reduction, REDUCTIONS)
    s = as_rows(student, "student")
    t = as_rows(teacher, "teacher")
    if s.shape != t.shape:
        raise ValueError(f"fastcollab.kernels: student {list(s.shape)} and teacher {list(t.shape)} logits differ in shape.")
    B, C = s.shape
    scale = {"batchmean": 1.0 / max(B, 1), "mean": 1.0 / max(B * C, 1), "sum": 1.0, "none": 1.0}[reduction]
    row_loss = torch.empty(B, device=s.device, dtype=torch.float32)
    ds = torch.empty_like(s)
    dt = torch.empty_like(t) if teacher_grad else None
    if B > 0:
        block = row_block(C, MAX_CLASS_BLOCK, "class")
        _kl_div_kernel[(B,)](s, t, row_loss, ds, dt if teacher_grad else ds, C, float(T), scale,
                             TEACHER_GRAD=bool(teacher_grad), BLOCK=block,
                             num_warps=class_warps(block))
    return finish_loss(row_loss, reduction), ds, dt


def kl_div_fwd(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, reduction: str = "batchmean",
               teacher_grad: bool = False):
    """-> (loss, d loss/d student, d loss/d teacher or None). See the module docstring."""
    return _launch_kl(student, teacher, T, reduction, teacher_grad)
