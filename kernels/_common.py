"""Shared host-side helpers for the fastcollab Triton kernels.

Everything here is shape/layout bookkeeping only: no host<->device synchronisation, no ``.item()``,
no Python control flow that depends on tensor *values* (so callers can be captured in CUDA graphs).
"""
from __future__ import annotations

import torch

# Largest per-row block a "one program per row, everything in registers" kernel accepts.
# 3x32x32 = 3072 -> 4096 and 3x64x64 = 12288 -> 16384 fit; ImageNet-size rows do not (use the C++ /
# reference backend for those).
MAX_ROW_BLOCK = 16384
# Largest class count a fused-loss kernel accepts (one row of logits lives in registers).
MAX_CLASS_BLOCK = 65536


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_block(row_len: int, limit: int = MAX_ROW_BLOCK, what: str = "row") -> int:
    block = max(16, next_pow2(row_len))
    if block > limit:
        raise ValueError(
            f"fastcollab.kernels: {what} length {row_len} needs a block of {block} > {limit}; "
            "this Triton kernel keeps one row in registers. Use the 'cpp' or 'reference' backend for "
            "such shapes."
        )
    return block


def row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: ~16-32 fp32 values per thread per live row vector."""
    return max(4, min(16, block // 512))


def class_warps(block: int) -> int:
    """Warps for a one-row-of-logits-per-program loss kernel (10-1000 classes: launch-bound; one warp
    covers up to 256 classes)."""
    return max(1, min(8, block // 256))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the image kernels compute in (and get eps/step in): fp64 for fp64 storage, else fp32
    (bf16/fp16 are upcast in registers)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def per_group_param(value, lead_shape, device, name: str,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Turn a float / 0-d tensor / tensor whose shape is a *prefix* of ``lead_shape`` into a flat
    ``dtype`` tensor (fp32; fp64 for fp64 images) of G values plus ``rows_per_group`` such that row r
    uses value[r // rows_per_group].

    E.g. x_adv [P, B, C, H, W] (lead_shape (P, B)) with eps of shape [P] -> G = P, rows_per_group = B.
    Left-aligned (per peer), unlike torch broadcasting. Never reads the values on the host.
    """
    n_rows = 1
    for s in lead_shape:
        n_rows *= int(s)
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device=device, dtype=dtype)
        shp = tuple(t.shape)
        if t.numel() == 1 and (len(shp) == 0 or shp == (1,)):
            return t.reshape(1).contiguous(), max(n_rows, 1)
        if len(shp) > len(lead_shape) or tuple(lead_shape[: len(shp)]) != shp:
            raise ValueError(
                f"fastcollab.kernels: {name} has shape {list(shp)}; expected a float, a 0-d tensor or a "
                f"tensor whose shape is a prefix of the leading dims {list(lead_shape)} (e.g. [P] per peer)."
            )
        g = t.numel()
        return t.reshape(-1).contiguous(), max(n_rows // max(g, 1), 1)
    return torch.full((1,), float(value), device=device, dtype=dtype), max(n_rows, 1)


def check_reduction(reduction: str, allowed) -> None:
    if reduction not in allowed:
        raise ValueError(f"fastcollab.kernels: reduction={reduction!r}; expected one of {list(allowed)}.")


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """Logits as a contiguous 2-D [B, C] tensor."""
    if t.dim() != 2:
        raise ValueError(f"fastcollab.kernels: {name} must be [B, C] logits, got shape {list(t.shape)}.")
    return t.contiguous()


def finish_loss(row_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row (already scaled) losses -> the reduced loss. Deterministic (torch sum, no atomics)."""
    if reduction == "none":
        return row_loss
    return row_loss.sum()
