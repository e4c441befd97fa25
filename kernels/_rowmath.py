"""Triton device helpers shared by the fused-loss kernels (one program = one row of logits)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softmax_row(z, mask):
    """Numerically stable softmax of one row held in registers (fp32).

    Returns (p, logp) with p = 0 and logp = 0 on masked lanes (so products stay finite).
    """
    zm = tl.where(mask, z, float("-inf"))
    m = tl.max(zm, axis=0)
    e = tl.where(mask, tl.exp(zm - m), 0.0)
    s = tl.sum(e, axis=0)
    p = e / s
    logp = tl.where(mask, z - m - tl.log(s), 0.0)
    return p, logp


@triton.jit
def _sign(r):
    return tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
