"""Loads the compiled extension ``fastcollab._C`` (C++ CPU kernels, CUDA kernels when built with CUDA).

Never builds anything at import: if the extension is missing (``FASTCOLLAB_NO_EXT=1`` at install, a
failed compile, a source checkout without ``pip install -e .``), fastcollab still imports and the ops
use the Triton / reference backends; this is said once, with the fix.
"""
from __future__ import annotations

import warnings

import torch

_C = None
EXT_ERROR: Exception | None = None

try:  # pragma: no branch
    from fastcollab import _C  # noqa: F811  (registers the fastcollab::native_* operators)
except Exception as e:  # ImportError, or an ABI mismatch with this torch (OSError / undefined symbol)
    EXT_ERROR = e
    _C = None
    warnings.warn(
        "fastcollab: the compiled extension fastcollab._C is not available "
        f"({type(e).__name__}: {e}); the ops use the reference (or Triton) backend instead. "
        "To build it: `pip install -e . --no-build-isolation` (or `python setup.py build_ext --inplace`).",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    """True when fastcollab._C loaded (the C++ CPU kernels are there)."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when fastcollab._C was built with its CUDA kernels (pgd_step_ / project_l1_)."""
    if _C is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("fastcollab::native_pgd_step_", "CUDA"))
    except Exception:  # noqa: BLE001 - private API moved
        return False
