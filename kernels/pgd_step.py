"""Multi-peer PGD step, in place: l_inf, l2 and l1 (steepest ascent + l1-ball projection).

Tensors are [B, C, H, W] or [P, B, C, H, W] (a row is always the last three dims flattened); with a peer
dim, ``x`` may also be [B, C, H, W] (clean images shared by the peers). ``eps`` / ``step`` are floats, 0-d tensors, or tensors whose shape is a
prefix of the leading dims ([P]: one value per peer). One launch updates every peer.

Semantics (DESIGN.md section 3), all in fp32 registers whatever the storage dtype (fp64 for fp64 tensors,
so fp64 l_inf is bit-exact with the fp64 torch sequence too):

* linf: ``t = x_adv + step*sign(grad)`` (sign(0) = 0); ``t = min(max(t, x - eps), x + eps)``;
  ``x_adv = min(max(t, 0), 1)``. Same op order as the torch sequence, so bit-exact with it in fp32
  (eps/step are rounded to fp32 first, as torch does for a fp32 tensor and a Python scalar).
  bf16/fp16: fp32 math, one rounding at the store (torch rounds after every op, so fastcollab.ops
  sends reduced-precision images to the reference instead).
* l2 (one program per row): ``g = grad / (||grad||_2 + 1e-12)``; ``t = x_adv + step*g``; ``d = t - x``;
  ``d *= min(1, eps / (||d||_2 + 1e-12))``; ``x_adv = clamp(x + d, 0, 1)``.
* l1 (Maini et al., steepest ascent; one program per row): coordinates masked as their code does (within
  one step of an edge and moving towards it: x_adv <= step with grad < 0, x_adv >= 1 - step with grad > 0;
  or on an edge: x_adv <= 0 or x_adv >= 1); the k largest |grad| among the movable coordinates
  are selected by k rounds of (row max, first index reaching it, knock out); each moves
  ``step*20/k*sign(grad)``; then d = x_adv - x is projected onto the l1 ball of radius eps (see
  project_l1.py; only rows with ||d||_1 > eps change) and ``x_adv = clamp(x + d, 0, 1)``.
  k per row comes from ``l1_k`` (int, or integer tensor [B] / [P, B] / []) or is
  drawn uniformly from 5..20 on the device with torch.randint (default generator) when None.
  Ties in |grad| select the lowest index (torch.topk may pick another tied index).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, per_group_param, row_block, row_warps
from .project_l1 import N_BISECT, N_REFINE, _l1_project_row, _upcast

LINF_BLOCK = 1024


@triton.jit
def _sign(g):
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))


@triton.jit
def _pgd_linf_kernel(xa_ptr, g_ptr, x_ptr, eps_ptr, step_ptr, row_len, rows_per_group, x_rows,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    grp = row // rows_per_group
    eps = tl.load(eps_ptr + grp)
    step = tl.load(step_ptr + grp)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_len
    base = row.to(tl.int64) * row_len
    xbase = (row % x_rows).to(tl.int64) * row_len
    xa = _upcast(tl.load(xa_ptr + base + offs, mask=mask, other=0.0))
    g = _upcast(tl.load(g_ptr + base + offs, mask=mask, other=0.0))
    x = _upcast(tl.load(x_ptr + xbase + offs, mask=mask, other=0.0))
    t = xa + step * _sign(g)
    t = tl.minimum(tl.maximum(t, x - eps), x + eps)
    t = tl.minimum(tl.maximum(t, 0.0), 1.0)
    tl.store(xa_ptr + base + offs, t.to(xa_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_l2_kernel(xa_ptr, g_ptr, x_ptr, eps_ptr, step_ptr, row_len, rows_per_group, x_rows,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    grp = row // rows_per_group
    eps = tl.load(eps_ptr + grp)
    step = tl.load(step_ptr + grp)
    offs = tl.arange(0, BLOCK)
    mask = offs < row_len
    base = row.to(tl.int64) * row_len
    xbase = (row % x_rows).to(tl.int64) * row_len
    xa = _upcast(tl.load(xa_ptr + base + offs, mask=mask, other=0.0))
    g = _upcast(tl.load(g_ptr + base + offs, mask=mask, other=0.0))
    x = _upcast(tl.load(x_ptr + xbase + offs, mask=mask, other=0.0))
    gnorm = tl.sqrt(tl.sum(g * g, axis=0))
    t = xa + step * (g / (gnorm + 1e-12))
    d = t - x
    dnorm = tl.sqrt(tl.sum(d * d, axis=0))
    d = d * tl.minimum(1.0, eps / (dnorm + 1e-12))
    out = tl.minimum(tl.maximum(x + d, 0.0), 1.0)
    tl.store(xa_ptr + base + offs, out.to(xa_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_l1_kernel(xa_ptr, g_ptr, x_ptr, eps_ptr, step_ptr, k_ptr, row_len, rows_per_group, x_rows,
                   BLOCK: tl.constexpr, N_BISECT: tl.constexpr, N_REFINE: tl.constexpr):
    row = tl.program_id(0)
    grp = row // rows_per_group
    eps = tl.load(eps_ptr + grp)
    step = tl.load(step_ptr + grp)
    k = tl.maximum(tl.load(k_ptr + row).to(tl.int32), 1)
    offs = tl.arange(0, BLOCK)
    mask = offs < row_len
    base = row.to(tl.int64) * row_len
    xbase = (row % x_rows).to(tl.int64) * row_len
    xa = _upcast(tl.load(xa_ptr + base + offs, mask=mask, other=0.0))
    g = _upcast(tl.load(g_ptr + base + offs, mask=mask, other=0.0))
    x = _upcast(tl.load(x_ptr + xbase + offs, mask=mask, other=0.0))

    # Maini et al.'s mask (robust_union, l1_dir_topk, gap = step)
    stuck = ((xa <= step) & (g < 0.0)) | ((xa >= 1.0 - step) & (g > 0.0)) | (xa <= 0.0) | (xa >= 1.0)
    movable = mask & (~stuck)
    # candidates: |g| on movable lanes, -1 elsewhere (never selected: guarded by a >= 0 below)
    a = tl.where(movable, tl.abs(g), -1.0)
    sel = offs < 0
    for _ in range(k):
        m = tl.max(a, axis=0)
        idx = tl.min(tl.where(a == m, offs, BLOCK), axis=0)
        hit = offs == idx
        sel = sel | (hit & (a >= 0.0))
        a = tl.where(hit, -2.0, a)
    mv = step * 20.0 / k.to(xa.dtype)
    xa1 = tl.where(sel, xa + mv * _sign(g), xa)
    d = tl.where(mask, xa1 - x, 0.0)
    d, _outside = _l1_project_row(d, eps, N_BISECT, N_REFINE)
    out = tl.minimum(tl.maximum(x + d, 0.0), 1.0)
    tl.store(xa_ptr + base + offs, out.to(xa_ptr.dtype.element_ty), mask=mask)


def _check(x_adv, grad, x):
    if x_adv.dim() not in (4, 5):
        raise ValueError(
            f"fastcollab.kernels.pgd_step_: x_adv must be [B,C,H,W] or [P,B,C,H,W], got {list(x_adv.shape)}."
        )
    for name, t in (("grad", grad), ("x", x)):
        if t.shape != x_adv.shape and not (name == "x" and x_adv.dim() == 5 and t.shape == x_adv.shape[1:]):
            raise ValueError(
                f"fastcollab.kernels.pgd_step_: {name} has shape {list(t.shape)}, x_adv has {list(x_adv.shape)}; "
                "they must match (x may also be [B,C,H,W] shared by the peers)."
            )
        if t.device != x_adv.device:
            raise ValueError(f"fastcollab.kernels.pgd_step_: {name} is on {t.device}, x_adv on {x_adv.device}.")
    if not x_adv.is_floating_point():
        raise ValueError("fastcollab.kernels.pgd_step_: x_adv must be a floating-point tensor.")


def pgd_step_(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps, step, norm: str,
              l1_k: torch.Tensor | None = None) -> torch.Tensor:
    """One PGD step for every peer and example, in place on ``x_adv``; returns ``x_adv``."""
    _check(x_adv, grad, x)
    lead = tuple(x_adv.shape[:-3])
    row_len = x_adv.shape[-1] * x_adv.shape[-2] * x_adv.shape[-3]
    n_rows = x_adv.numel() // max(row_len, 1)
    if n_rows == 0 or row_len == 0:
        return x_adv
    dev = x_adv.device
    cdt = compute_dtype(x_adv)
    eps_t, rpg_e = per_group_param(eps, lead, dev, "eps", cdt)
    step_t, rpg_s = per_group_param(step, lead, dev, "step", cdt)
    # one rows_per_group for both: if they differ, expand the coarser one to per-row values
    if rpg_e != rpg_s:
        eps_t = eps_t.reshape(-1, 1).expand(-1, rpg_e).contiguous().reshape(-1)  # per row, no host sync
        step_t = step_t.reshape(-1, 1).expand(-1, rpg_s).contiguous().reshape(-1)
        rpg_e = rpg_s = 1
    work = x_adv.contiguous()
    g = grad.contiguous()
    xc = x.contiguous()
    x_rows = xc.numel() // row_len  # n_rows, or B when x is shared by the peers
    if norm in ("linf", "l_inf", "inf"):
        grid = (n_rows, triton.cdiv(row_len, LINF_BLOCK))
        _pgd_linf_kernel[grid](work, g, xc, eps_t, step_t, row_len, rpg_e, x_rows, BLOCK=LINF_BLOCK, num_warps=4)
    elif norm in ("l2", "2"):
        block = row_block(row_len)
        _pgd_l2_kernel[(n_rows,)](work, g, xc, eps_t, step_t, row_len, rpg_e, x_rows, BLOCK=block,
                                  num_warps=row_warps(block))
    elif norm in ("l1", "1"):
        block = row_block(row_len)
        if l1_k is None:
            k = torch.randint(5, 21, lead, device=dev, dtype=torch.int64)
        else:
            if isinstance(l1_k, int):
                l1_k = torch.full(lead, l1_k, device=dev, dtype=torch.int64)
            if not isinstance(l1_k, torch.Tensor) or tuple(l1_k.shape) not in (lead, lead[-1:], ()):
                raise ValueError(
                    f"fastcollab.kernels.pgd_step_: l1_k must be an integer tensor of shape {list(lead)} "
                    f"(or {list(lead[-1:])}, shared by the peers), got "
                    f"{list(l1_k.shape) if isinstance(l1_k, torch.Tensor) else type(l1_k).__name__}."
                )
            k = l1_k.to(device=dev, dtype=torch.int64).expand(lead)
        k = k.contiguous().reshape(-1)
        _pgd_l1_kernel[(n_rows,)](work, g, xc, eps_t, step_t, k, row_len, rpg_e, x_rows, BLOCK=block,
                                  N_BISECT=N_BISECT, N_REFINE=N_REFINE,
                                  num_warps=row_warps(block))
    else:
        raise ValueError(f"fastcollab.kernels.pgd_step_: norm={norm!r}; expected 'linf', 'l2' or 'l1'.")
    if work.data_ptr() != x_adv.data_ptr():
        x_adv.copy_(work)
    return x_adv
