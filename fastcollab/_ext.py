"""Loads the compiled extension ``fastcollab._C`` (C++ CPU kernels, CUDA kernels when built with CUDA).

Never builds anything at import: if the extension is missing (``FASTCOLLAB_NO_EXT=1`` at install, a
failed compile, a source checkout without ``pip install -e .``), fastcollab still imports and the ops
use the Triton / reference backends; this is said once, with the fix and the import error's text.
:func:`report` (``python -m fastcollab._ext``) says which backends this process has and why one is missing.
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


def cuda_kernels_missing_reason() -> str | None:
    """Why ``_C``'s CUDA kernels are absent (None when they are there)."""
    if _C is None:
        return f"fastcollab._C is not loaded ({type(EXT_ERROR).__name__}: {EXT_ERROR})"
    if has_cuda_kernels():
        return None
    if not torch.version.cuda:
        return f"this torch ({torch.__version__}) has no CUDA, so _C was built with its CPU kernels only"
    return ("_C was built without its CUDA kernels (nvcc not found at install time?): reinstall with "
            "FASTCOLLAB_REQUIRE_EXT=1 pip install -e . --no-build-isolation to see why")


def report() -> str:
    """Which op backends this process has, and for each missing one why (lines)."""
    from . import ops

    have = ops.available_backends()
    lines = [f"fastcollab backends available: {', '.join(have)}"]
    lines.append("cpp CPU kernels: " + ("yes" if _C is not None else f"NO ({type(EXT_ERROR).__name__}: {EXT_ERROR})"))
    why_cuda = cuda_kernels_missing_reason()
    lines.append("cpp CUDA kernels: " + ("yes" if why_cuda is None else f"no ({why_cuda})"))
    if "triton" not in have:
        ops._triton()
        why = (f"fastcollab.kernels does not import ({ops._triton_err})" if ops._triton() is None
               else "no CUDA device (and TRITON_INTERPRET is not 1)")
        lines.append(f"triton: no ({why})")
    else:
        lines.append("triton: yes")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
