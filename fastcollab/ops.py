"""Public fused ops (DESIGN §4), dispatched per device to a backend.

Backends
--------
* ``reference``: plain PyTorch (:mod:`fastcollab.reference`), autograd-native; always available.
* ``cpp``: the compiled extension ``fastcollab._C`` (C++ CPU kernels; CUDA kernels for ``pgd_step_`` /
  ``project_l1_`` when built against a CUDA torch).
* ``triton``: :mod:`fastcollab.kernels` (CUDA; on CPU only under ``TRITON_INTERPRET=1``).

Choice: ``set_backend(name)`` or the environment variable ``FASTCOLLAB_BACKEND=reference|cpp|triton``
(read at every call; ``set_backend`` wins).  Default: CUDA tensors -> triton if available, CPU tensors
-> cpp if the extension is built, else reference.  A requested backend that cannot run a given op on a
given device/dtype (say the Triton module lacks that loss, or the C++ kernels get fp16 images) falls back
to that default, and :func:`backend_report` says so.

Every op is a ``torch.library`` custom op (``fastcollab::pgd_step``, ``fastcollab::project_l1``,
``fastcollab::<loss>_fwd``) with a fake (meta) implementation and, for the losses, a registered
autograd formula: the fused forward returns the loss *and* d loss / d logits computed in the same pass;
backward only scales the saved gradient by grad_output.  Nothing here synchronises with the host (no
``.item()``, no data-dependent Python branching), so the ops work under ``torch.compile`` and CUDA-graph
capture.  Input validation looks only at shapes, dtypes, devices and Python numbers.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Optional, Sequence, Union

import torch

from . import _ext
from . import reference
from .errors import FastcollabError

log = logging.getLogger("fastcollab")

BACKENDS = ("reference", "cpp", "triton")
NORMS = ("linf", "l2", "l1")
_KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")
_SIMPLE_REDUCTIONS = ("mean", "sum", "none")

# op name -> (function name in fastcollab.kernels, has a C++ CPU kernel)
_OPS = {
    "pgd_step_": "pgd_step_",
    "project_l1_": "project_l1_",
    "kl_div": "kl_div_fwd",
    "boosted_ce": "boosted_ce_fwd",
    "trades_kl": "trades_kl_fwd",
    "mart_loss": "mart_loss_fwd",
    "logit_mse": "logit_mse_fwd",
    "triangle_huber": "triangle_huber_fwd",
}

Scalar = Union[float, int, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------
_override: Optional[str] = None
_triton_mod = None
_triton_err: Optional[BaseException] = None
_triton_tried = False
_reported = False
_warned: set = set()


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every op (``None`` goes back to ``FASTCOLLAB_BACKEND`` / the default)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise FastcollabError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)} (or None for the default)")
    _override = name


def get_backend() -> Optional[str]:
    """The requested backend (``set_backend`` or ``FASTCOLLAB_BACKEND``), or None for the default."""
    if _override is not None:
        return _override
    env = os.environ.get("FASTCOLLAB_BACKEND", "").strip().lower()
    if not env:
        return None
    if env not in BACKENDS:
        raise FastcollabError(
            f"FASTCOLLAB_BACKEND={env!r} is not a backend; set it to one of {', '.join(BACKENDS)} or unset it"
        )
    return env


def _triton():
    """fastcollab.kernels, or None (import guarded: Triton may be missing or have no usable target)."""
    global _triton_mod, _triton_err, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            from fastcollab import kernels as km  # type: ignore[attr-defined]

            _triton_mod = km
        except Exception as e:  # noqa: BLE001 - triton missing, no GPU driver, kernels/ absent...
            try:
                import kernels as km  # type: ignore[no-redef]  # source checkout, not installed

                if hasattr(km, "pgd_step_"):
                    _triton_mod = km
                else:
                    _triton_err = e
            except Exception:  # noqa: BLE001
                _triton_err = e
    return _triton_mod


def _triton_usable_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list:
    """Backends that work in this process: ``reference`` always; ``cpp`` when fastcollab._C loaded;
    ``triton`` when fastcollab.kernels imports and there is a GPU (or ``TRITON_INTERPRET=1``)."""
    out = ["reference"]
    if _ext.available():
        out.append("cpp")
    if _triton() is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        out.append("triton")
    return out


def _supports(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> bool:
    if backend == "reference":
        return True
    if backend == "cpp":
        if not _ext.available():
            return False
        if op in ("pgd_step_", "project_l1_"):
            if dtype not in (torch.float32, torch.float64):
                return False
            return device.type == "cpu" or (device.type == "cuda" and _ext.has_cuda_kernels())
        return device.type == "cpu"  # losses upcast to fp32 before the kernel
    if backend == "triton":
        km = _triton()
        if op in ("pgd_step_", "project_l1_") and dtype not in (torch.float32, torch.float64):
            # the kernels round once (fp32 math); the reference rounds after every bf16/fp16 op
            return False
        return km is not None and hasattr(km, _OPS[op]) and _triton_usable_on(device)
    return False


def _default(op: str, device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        for b in ("triton", "cpp"):
            if _supports(b, op, device, dtype):
                return b
        return "reference"
    if _supports("cpp", op, device, dtype):
        return "cpp"
    return "reference"


def resolve(op: str, device: Union[torch.device, str] = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The backend that ``op`` uses for tensors on ``device`` with ``dtype`` (no side effects)."""
    device = torch.device(device)
    req = get_backend()
    if req is not None and _supports(req, op, device, dtype):
        return req
    return _default(op, device, dtype)


def _pick(op: str, t: torch.Tensor) -> str:
    global _reported
    if not _reported:
        _reported = True
        log.info(backend_report(t.device))
    b = resolve(op, t.device, t.dtype)
    req = get_backend()
    if req is not None and b != req and (op, req, t.device.type) not in _warned:
        _warned.add((op, req, t.device.type))
        why = "" if req != "triton" or _triton_err is None else f" (fastcollab.kernels: {_triton_err})"
        warnings.warn(
            f"fastcollab: backend {req!r} cannot run {op} on {t.device.type} {t.dtype}{why}; using {b!r} instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return b


def backend_report(device: Union[torch.device, str, None] = None) -> str:
    """One line: which backend each op uses on ``device`` (default: cuda if available, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    req = get_backend()
    parts = " ".join(f"{op}={resolve(op, device)}" for op in _OPS)
    extra = [] if _ext.available() else ["fastcollab._C not built"]
    if _triton() is None:
        extra.append("triton unavailable")
    tail = f" [{'; '.join(extra)}]" if extra else ""
    return f"fastcollab ops on {device.type} (requested: {req or 'default'}): {parts}{tail}"


# ---------------------------------------------------------------------------------------------
# validation (shapes, dtypes, devices, Python numbers only: no host sync)
# ---------------------------------------------------------------------------------------------
def _err(op: str, msg: str) -> FastcollabError:
    return FastcollabError(f"fastcollab.ops.{op}: {msg}")


def _check_scalar(op: str, name: str, v, ref: torch.Tensor, positive: bool) -> None:
    if isinstance(v, torch.Tensor):
        if v.is_complex() or v.dtype == torch.bool:
            raise _err(op, f"{name} must be a float or a real tensor, got dtype {v.dtype}")
        if v.dim() == 0:
            if v.device != ref.device and v.device.type != "cpu":
                raise _err(op, f"{name} is on {v.device} but the images are on {ref.device}; move {name} there")
            if v.device != ref.device:
                raise _err(op, f"{name} is a CPU tensor but the images are on {ref.device}; pass a float or a tensor on {ref.device}")
            return
        if v.dim() != 1:
            raise _err(op, f"{name} must be a float, a 0-d tensor or a per-peer tensor [P], got shape {list(v.shape)}")
        if ref.dim() != 5 or v.shape[0] != ref.shape[0]:
            raise _err(
                op,
                f"per-peer {name} of shape {list(v.shape)} needs images [P, B, C, H, W] with P == {v.shape[0]}, "
                f"got {list(ref.shape)}; pass one value per peer or a float",
            )
        if v.device != ref.device:
            raise _err(op, f"{name} is on {v.device} but the images are on {ref.device}; move {name} there")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(op, f"{name} must be a float or a tensor, got {type(v).__name__}")
    v = float(v)
    if v != v:
        raise _err(op, f"{name} is NaN; pass a finite number")
    if positive and not v > 0:
        raise _err(op, f"{name} must be > 0, got {v}; pass a positive step size")
    if not positive and v < 0:
        raise _err(op, f"{name} must be >= 0, got {v}; pass a non-negative radius")


def _check_images(op: str, x_adv: torch.Tensor) -> None:
    if not isinstance(x_adv, torch.Tensor):
        raise _err(op, f"expected a tensor, got {type(x_adv).__name__}")
    if x_adv.dim() not in (4, 5):
        raise _err(op, f"images must be [B, C, H, W] or [P, B, C, H, W], got shape {list(x_adv.shape)}")
    if not x_adv.is_floating_point():
        raise _err(op, f"images must be floating point, got {x_adv.dtype}; convert with .float()")


def _check_pgd(x_adv, grad, x, eps, step, norm, l1_k) -> None:
    op = "pgd_step_"
    if norm not in NORMS:
        raise _err(op, f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    _check_images(op, x_adv)
    for name, t in (("grad", grad), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise _err(op, f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != x_adv.device:
            raise _err(op, f"{name} is on {t.device} but x_adv is on {x_adv.device}; put all three on one device")
        if t.dtype != x_adv.dtype:
            raise _err(op, f"{name} has dtype {t.dtype} but x_adv has {x_adv.dtype}; cast them to one dtype")
    if grad.shape != x_adv.shape:
        raise _err(op, f"grad has shape {list(grad.shape)} but x_adv has {list(x_adv.shape)}; they must match")
    if x.shape != x_adv.shape and not (x_adv.dim() == 5 and x.shape == x_adv.shape[1:]):
        raise _err(
            op,
            f"x has shape {list(x.shape)} but x_adv has {list(x_adv.shape)}; x must match x_adv "
            "(or be [B, C, H, W], shared by the peers of a [P, B, C, H, W] x_adv)",
        )
    if x_adv.requires_grad:
        raise _err(op, "x_adv requires grad; the step is in place: pass x_adv.detach() (or run under torch.no_grad())")
    _check_scalar(op, "eps", eps, x_adv, positive=False)
    _check_scalar(op, "step", step, x_adv, positive=True)
    if l1_k is not None:
        if isinstance(l1_k, torch.Tensor):
            lead = tuple(x_adv.shape[:-3])
            if l1_k.dtype.is_floating_point or l1_k.dtype == torch.bool or l1_k.is_complex():
                raise _err(op, f"l1_k must be an integer tensor, got {l1_k.dtype}; use .long()")
            if tuple(l1_k.shape) not in (lead, lead[-1:]):
                raise _err(op, f"l1_k must have shape {list(lead)} (or {list(lead[-1:])}), got {list(l1_k.shape)}")
            if l1_k.device != x_adv.device:
                raise _err(op, f"l1_k is on {l1_k.device} but x_adv is on {x_adv.device}; move it there")
        elif isinstance(l1_k, bool) or not isinstance(l1_k, int) or l1_k < 1:
            raise _err(op, f"l1_k must be a positive int or an integer tensor, got {l1_k!r}")


def _check_logits(op: str, **tensors) -> torch.Tensor:
    first = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise _err(op, f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise _err(op, f"{name} must be logits [B, num_classes], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise _err(op, f"{name} must be floating point, got {t.dtype}; convert with .float()")
        if first is None:
            first = (name, t)
            continue
        n0, t0 = first
        if t.shape != t0.shape:
            raise _err(op, f"{name} has shape {list(t.shape)} but {n0} has {list(t0.shape)}; they must match")
        if t.device != t0.device:
            raise _err(op, f"{name} is on {t.device} but {n0} is on {t0.device}; put them on one device")
        if t.dtype != t0.dtype:
            raise _err(op, f"{name} has dtype {t.dtype} but {n0} has {t0.dtype}; cast them to one dtype")
    return first[1]


def _check_labels(op: str, y, ref: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor):
        raise _err(op, f"y must be a tensor of class indices, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise _err(op, f"y must hold integer class indices, got {y.dtype}; use .long()")
    if y.shape != ref.shape[:1]:
        raise _err(op, f"y must have shape [{ref.shape[0]}] (one label per row), got {list(y.shape)}")
    if y.device != ref.device:
        raise _err(op, f"y is on {y.device} but the logits are on {ref.device}; move it there")


def _check_reduction(op: str, reduction, allowed: Sequence[str]) -> None:
    if reduction not in allowed:
        raise _err(op, f"unknown reduction {reduction!r}; use one of {', '.join(allowed)}")


def _split(v: Scalar):
    """(float, tensor-or-None) for a custom-op schema: a tensor travels as is (no .item())."""
    if isinstance(v, torch.Tensor):
        return 0.0, v
    return float(v), None


def _up(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


# ---------------------------------------------------------------------------------------------
# custom ops: pgd_step / project_l1 (in place)
# ---------------------------------------------------------------------------------------------
def _run_inplace(target: torch.Tensor, fn) -> None:
    work = target if target.is_contiguous() else target.contiguous()
    fn(work)
    if work is not target:
        target.copy_(work)


@torch.library.custom_op("fastcollab::pgd_step", mutates_args=("x_adv",))
def _pgd_step_op(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    step: float,
    eps_t: Optional[torch.Tensor],
    step_t: Optional[torch.Tensor],
    norm: str,
    l1_k: Optional[torch.Tensor],
    backend: str,
) -> None:
    e = eps_t if eps_t is not None else eps
    s = step_t if step_t is not None else step
    if backend == "cpp" and _supports("cpp", "pgd_step_", x_adv.device, x_adv.dtype):
        g, xc = grad.contiguous(), x.contiguous()
        _run_inplace(x_adv, lambda w: torch.ops.fastcollab.native_pgd_step_(w, g, xc, eps, step, eps_t, step_t, norm, l1_k))
    elif backend == "triton" and _supports("triton", "pgd_step_", x_adv.device, x_adv.dtype):
        # x may be [B, C, H, W] shared by the peers: the kernel indexes it per row (no P-fold copy)
        k = l1_k if norm == "l1" else None
        _run_inplace(x_adv, lambda w: _triton().pgd_step_(w, grad, x, e, s, norm, k))
    else:
        reference.pgd_step_(x_adv, grad, x, e, s, norm, l1_k)


@_pgd_step_op.register_fake
def _(x_adv, grad, x, eps, step, eps_t, step_t, norm, l1_k, backend) -> None:
    return None


@torch.library.custom_op("fastcollab::project_l1", mutates_args=("delta",))
def _project_l1_op(delta: torch.Tensor, eps: float, eps_t: Optional[torch.Tensor], backend: str) -> None:
    e = eps_t if eps_t is not None else eps
    if backend == "cpp" and _supports("cpp", "project_l1_", delta.device, delta.dtype):
        _run_inplace(delta, lambda w: torch.ops.fastcollab.native_project_l1_(w, eps, eps_t))
    elif backend == "triton" and _supports("triton", "project_l1_", delta.device, delta.dtype):
        _run_inplace(delta, lambda w: _triton().project_l1_(w, e))
    else:
        reference.project_l1_(delta, e)


@_project_l1_op.register_fake
def _(delta, eps, eps_t, backend) -> None:
    return None


def pgd_step_(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    eps: Scalar,
    step: Scalar,
    norm: str = "linf",
    l1_k: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """One PGD step in place on ``x_adv`` (returned); semantics of :func:`fastcollab.reference.pgd_step_`.

    ``x_adv``/``grad``: ``[B,C,H,W]`` or ``[P,B,C,H,W]``; ``x`` like ``x_adv`` or ``[B,C,H,W]`` shared by
    the peers; ``eps``/``step``: float, 0-d tensor or per-peer ``[P]`` tensor (on the images' device);
    ``norm``: ``linf`` | ``l2`` | ``l1``; ``l1_k``: per-example k for l1 (int or integer tensor
    ``[B]``/``[P,B]``), drawn from U{5..20} on the device at each call when None.
    """
    _check_pgd(x_adv, grad, x, eps, step, norm, l1_k)
    backend = _pick("pgd_step_", x_adv)
    if norm == "l1":
        lead = tuple(x_adv.shape[:-3])
        if l1_k is None:
            l1_k = reference.draw_l1_k(lead, x_adv.device)
        elif isinstance(l1_k, int):
            l1_k = torch.full(lead, l1_k, dtype=torch.int64, device=x_adv.device)
        else:
            l1_k = l1_k.to(torch.int64).expand(lead)
    else:
        l1_k = None
    if backend == "reference":
        return reference.pgd_step_(x_adv, grad, x, eps, step, norm, l1_k)
    ef, et = _split(eps)
    sf, st = _split(step)
    torch.ops.fastcollab.pgd_step(x_adv, grad, x, ef, sf, et, st, norm, l1_k, backend)
    return x_adv


def project_l1_(delta: torch.Tensor, eps: Scalar) -> torch.Tensor:
    """Batched l1-ball projection in place (rows = last three dims); see :func:`fastcollab.reference.project_l1_`."""
    _check_images("project_l1_", delta)
    _check_scalar("project_l1_", "eps", eps, delta, positive=False)
    if delta.requires_grad:
        raise _err("project_l1_", "delta requires grad; the projection is in place: pass delta.detach()")
    backend = _pick("project_l1_", delta)
    if backend == "reference":
        return reference.project_l1_(delta, eps)
    ef, et = _split(eps)
    torch.ops.fastcollab.project_l1(delta, ef, et, backend)
    return delta


# ---------------------------------------------------------------------------------------------
# custom ops: fused losses (forward writes the gradient; backward scales it)
# ---------------------------------------------------------------------------------------------
def _ref_fwd(fn, tensors, needs):
    """Loss and d loss / d inputs of a reference loss (fallback for a fused backend that lacks it).

    A custom op's implementation runs below the autograd dispatch keys; the autograd key of the tensors'
    device (AutogradCPU, AutogradCUDA, ...) is re-enabled here so the reference's autograd graph can be built
    (and differentiated) inside the op."""
    dev = tensors[0].device.type
    autograd_key = getattr(torch._C.DispatchKey, f"Autograd{dev.upper()}", torch._C.DispatchKey.AutogradOther)
    exc = torch._C._dispatch_tls_local_exclude_set()
    exc = exc.remove(autograd_key).remove(torch._C.DispatchKey.ADInplaceOrView)
    inc = torch._C._dispatch_tls_local_include_set()
    with torch.enable_grad(), torch._C._ForceDispatchKeyGuard(inc, exc):
        leaves = [t.detach().requires_grad_(bool(n)) if t.is_floating_point() else t for t, n in zip(tensors, needs)]
        loss = fn(*leaves)
        want = [l for l, n in zip(leaves, needs) if n]
        grads = torch.autograd.grad(loss.sum(), want, allow_unused=True) if want else []
    out = [loss.detach()]
    it = iter(grads)
    for t, n in zip(tensors, needs):
        if n:
            g = next(it)
            out.append(torch.zeros_like(t) if g is None else g)
    return out


def _scale(g_loss: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if g_loss.dim() == 1:
        return g_loss.unsqueeze(-1) * d
    return g_loss * d


def _as(t, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype) if t.dtype != like.dtype else t


def _fused(backend: str, op: str, dev: torch.Tensor):
    """The kernel module/namespace for a fused backend, or None (-> reference fallback)."""
    if backend == "cpp" and _supports("cpp", op, dev.device, dev.dtype):
        return "cpp"
    if backend == "triton" and _supports("triton", op, dev.device, dev.dtype):
        return "triton"
    return None


# --- kl_div ----------------------------------------------------------------------------------
@torch.library.custom_op("fastcollab::kl_div_fwd", mutates_args=())
def _kl_div_fwd(
    student: torch.Tensor, teacher: torch.Tensor, T: float, reduction: str, teacher_grad: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _fused(backend, "kl_div", student)
    if k == "cpp":
        loss, ds, dt = torch.ops.fastcollab.native_kl_div_fwd(student.contiguous(), teacher.contiguous(), T, reduction, teacher_grad)
    elif k == "triton":
        loss, ds, dt = _triton().kl_div_fwd(student, teacher, T, reduction, teacher_grad)
        dt = teacher.new_empty(0) if dt is None else dt
    else:
        res = _ref_fwd(
            lambda s, t: reference.kl_div(s, t, T, reduction, detach_teacher=not teacher_grad),
            (student, teacher),
            (True, teacher_grad),
        )
        loss, ds = res[0], res[1]
        dt = res[2] if teacher_grad else teacher.new_empty(0)
    return _as(loss, student), _as(ds, student), _as(dt, teacher)


@_kl_div_fwd.register_fake
def _(student, teacher, T, reduction, teacher_grad, backend):
    loss = student.new_empty((student.shape[0],) if reduction == "none" else ())
    dt = torch.empty_like(teacher) if teacher_grad else teacher.new_empty(0)
    return loss, torch.empty_like(student), dt


def _kl_setup(ctx, inputs, output):
    ctx.teacher_grad = inputs[4]
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _kl_backward(ctx, g, _g1, _g2):
    ds, dt = ctx.saved_tensors
    return _scale(g, ds), (_scale(g, dt) if ctx.teacher_grad else None), None, None, None, None


_kl_div_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


def kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    T: float = 1.0,
    reduction: str = "batchmean",
    detach_teacher: bool = True,
) -> torch.Tensor:
    """Distillation KL (see :func:`fastcollab.reference.kl_div`): no T**2 factor; teacher detached unless asked."""
    _check_logits("kl_div", student_logits=student_logits, teacher_logits=teacher_logits)
    _check_reduction("kl_div", reduction, _KL_REDUCTIONS)
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0:
        raise _err("kl_div", f"temperature T must be a positive float, got {T!r}")
    backend = _pick("kl_div", student_logits)
    if backend == "reference":
        return reference.kl_div(student_logits, teacher_logits, T, reduction, detach_teacher)
    s, t = _up(student_logits), _up(teacher_logits)
    if detach_teacher:
        t = t.detach()
    tg = (not detach_teacher) and t.requires_grad
    return torch.ops.fastcollab.kl_div_fwd(s, t, float(T), reduction, tg, backend)[0]


# --- two-input losses with gradients to both (trades_kl, logit_mse) ----------------------------
def _two_grad_backward(ctx, g, _g1, _g2):
    da, db = ctx.saved_tensors
    return _scale(g, da), _scale(g, db), None, None


def _two_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


@torch.library.custom_op("fastcollab::trades_kl_fwd", mutates_args=())
def _trades_kl_fwd(
    clean: torch.Tensor, adv: torch.Tensor, reduction: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _fused(backend, "trades_kl", clean)
    if k == "cpp":
        loss, dc, da = torch.ops.fastcollab.native_trades_kl_fwd(clean.contiguous(), adv.contiguous(), reduction)
    elif k == "triton":
        loss, dc, da = _triton().trades_kl_fwd(clean, adv, reduction)
    else:
        loss, dc, da = _ref_fwd(lambda c, a: reference.trades_kl(c, a, reduction), (clean, adv), (True, True))
    return _as(loss, clean), _as(dc, clean), _as(da, adv)


@_trades_kl_fwd.register_fake
def _(clean, adv, reduction, backend):
    loss = clean.new_empty((clean.shape[0],) if reduction == "none" else ())
    return loss, torch.empty_like(clean), torch.empty_like(adv)


_trades_kl_fwd.register_autograd(_two_grad_backward, setup_context=_two_grad_setup)


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """TRADES KL(p(clean) || p(adv)), gradients to both (see :func:`fastcollab.reference.trades_kl`)."""
    _check_logits("trades_kl", clean_logits=clean_logits, adv_logits=adv_logits)
    _check_reduction("trades_kl", reduction, _KL_REDUCTIONS)
    backend = _pick("trades_kl", clean_logits)
    if backend == "reference":
        return reference.trades_kl(clean_logits, adv_logits, reduction)
    return torch.ops.fastcollab.trades_kl_fwd(_up(clean_logits), _up(adv_logits), reduction, backend)[0]


@torch.library.custom_op("fastcollab::logit_mse_fwd", mutates_args=())
def _logit_mse_fwd(
    a: torch.Tensor, b: torch.Tensor, reduction: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _fused(backend, "logit_mse", a)
    if k == "cpp":
        loss, da, db = torch.ops.fastcollab.native_logit_mse_fwd(a.contiguous(), b.contiguous(), reduction)
    elif k == "triton":
        loss, da, db = _triton().logit_mse_fwd(a, b, reduction)
    else:
        loss, da, db = _ref_fwd(lambda p, q: reference.logit_mse(p, q, reduction), (a, b), (True, True))
    return _as(loss, a), _as(da, a), _as(db, b)


@_logit_mse_fwd.register_fake
def _(a, b, reduction, backend):
    loss = a.new_empty((a.shape[0],) if reduction == "none" else ())
    return loss, torch.empty_like(a), torch.empty_like(b)


_logit_mse_fwd.register_autograd(_two_grad_backward, setup_context=_two_grad_setup)


def logit_mse(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """ALP logit pairing (a-b)^2: ``mean`` over all elements, ``sum``, or ``none`` (per-example sum)."""
    _check_logits("logit_mse", a=a, b=b)
    _check_reduction("logit_mse", reduction, _SIMPLE_REDUCTIONS)
    backend = _pick("logit_mse", a)
    if backend == "reference":
        return reference.logit_mse(a, b, reduction)
    return torch.ops.fastcollab.logit_mse_fwd(_up(a), _up(b), reduction, backend)[0]


# --- boosted_ce ------------------------------------------------------------------------------
@torch.library.custom_op("fastcollab::boosted_ce_fwd", mutates_args=())
def _boosted_ce_fwd(logits: torch.Tensor, y: torch.Tensor, reduction: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    k = _fused(backend, "boosted_ce", logits)
    if k == "cpp":
        loss, dz = torch.ops.fastcollab.native_boosted_ce_fwd(logits.contiguous(), y, reduction)
    elif k == "triton":
        loss, dz = _triton().boosted_ce_fwd(logits, y, reduction)
    else:
        loss, dz = _ref_fwd(lambda z, yy: reference.boosted_ce(z, yy, reduction), (logits, y), (True, False))
    return _as(loss, logits), _as(dz, logits)


@_boosted_ce_fwd.register_fake
def _(logits, y, reduction, backend):
    return logits.new_empty((logits.shape[0],) if reduction == "none" else ()), torch.empty_like(logits)


def _bce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _bce_backward(ctx, g, _g1):
    (dz,) = ctx.saved_tensors
    return _scale(g, dz), None, None, None


_boosted_ce_fwd.register_autograd(_bce_backward, setup_context=_bce_setup)


def boosted_ce(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MART boosted CE ``-log p_y - log(1.0001 - max_{k!=y} p_k)`` (labels are not range-checked: no sync)."""
    _check_logits("boosted_ce", logits=logits)
    _check_labels("boosted_ce", y, logits)
    _check_reduction("boosted_ce", reduction, _SIMPLE_REDUCTIONS)
    backend = _pick("boosted_ce", logits)
    if backend == "reference":
        return reference.boosted_ce(logits, y, reduction)
    return torch.ops.fastcollab.boosted_ce_fwd(_up(logits), y, reduction, backend)[0]


# --- mart_loss -------------------------------------------------------------------------------
@torch.library.custom_op("fastcollab::mart_loss_fwd", mutates_args=())
def _mart_loss_fwd(
    clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, beta: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _fused(backend, "mart_loss", clean)
    if k == "cpp":
        loss, dc, da = torch.ops.fastcollab.native_mart_loss_fwd(clean.contiguous(), adv.contiguous(), y, beta)
    elif k == "triton":
        loss, dc, da = _triton().mart_loss_fwd(clean, adv, y, beta)
    else:
        loss, dc, da = _ref_fwd(lambda c, a, yy: reference.mart_loss(c, a, yy, beta), (clean, adv, y), (True, True, False))
    return _as(loss, clean), _as(dc, clean), _as(da, adv)


@_mart_loss_fwd.register_fake
def _(clean, adv, y, beta, backend):
    return clean.new_empty(()), torch.empty_like(clean), torch.empty_like(adv)


def _mart_backward(ctx, g, _g1, _g2):
    dc, da = ctx.saved_tensors
    return g * dc, g * da, None, None, None


_mart_loss_fwd.register_autograd(_mart_backward, setup_context=_two_grad_setup)


def mart_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float = 6.0) -> torch.Tensor:
    """MART objective (scalar): boosted CE on adv + beta * mean(KL(clean||adv) * (1 - p_y(clean)))."""
    _check_logits("mart_loss", clean_logits=clean_logits, adv_logits=adv_logits)
    _check_labels("mart_loss", y, clean_logits)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise _err("mart_loss", f"beta must be a float, got {type(beta).__name__}")
    backend = _pick("mart_loss", clean_logits)
    if backend == "reference":
        return reference.mart_loss(clean_logits, adv_logits, y, beta)
    return torch.ops.fastcollab.mart_loss_fwd(_up(clean_logits), _up(adv_logits), y, float(beta), backend)[0]


# --- triangle_huber --------------------------------------------------------------------------
@torch.library.custom_op("fastcollab::triangle_huber_fwd", mutates_args=())
def _triangle_huber_fwd(
    s_nat: torch.Tensor,
    s_adv: torch.Tensor,
    t_nat: torch.Tensor,
    t_adv: torch.Tensor,
    y: torch.Tensor,
    delta: float,
    use_probs: bool,
    reduction: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _fused(backend, "triangle_huber", s_nat)
    if k is None:
        return tuple(
            _as(r, s_nat)
            for r in _ref_fwd(
                lambda a, b, c, d, yy: reference.triangle_huber(a, b, c, d, yy, delta, use_probs, reduction),
                (s_nat, s_adv, t_nat, t_adv, y),
                (True, True, False, False, False),
            )
        )
    args = (s_nat.contiguous(), s_adv.contiguous(), t_nat.contiguous(), t_adv.contiguous(), y, delta, use_probs)
    if k == "triton":  # the Triton kernel takes the reduction itself
        loss, dn, da = _triton().triangle_huber_fwd(*args, reduction)
        return _as(loss, s_nat), _as(dn, s_nat), _as(da, s_adv)
    loss, dn, da = torch.ops.fastcollab.native_triangle_huber_fwd(*args)
    # the C++ kernel returns per-example losses and per-row gradients; reduce here
    if reduction == "mean":
        inv = 1.0 / max(s_nat.shape[0], 1)
        loss, dn, da = loss.mean(), dn * inv, da * inv
    elif reduction == "sum":
        loss = loss.sum()
    return _as(loss, s_nat), _as(dn, s_nat), _as(da, s_adv)


@_triangle_huber_fwd.register_fake
def _(s_nat, s_adv, t_nat, t_adv, y, delta, use_probs, reduction, backend):
    loss = s_nat.new_empty((s_nat.shape[0],) if reduction == "none" else ())
    return loss, torch.empty_like(s_nat), torch.empty_like(s_adv)


def _tri_backward(ctx, g, _g1, _g2):
    dn, da = ctx.saved_tensors
    return _scale(g, dn), _scale(g, da), None, None, None, None, None, None, None


_triangle_huber_fwd.register_autograd(_tri_backward, setup_context=_two_grad_setup)


def triangle_huber(
    s_nat: torch.Tensor,
    s_adv: torch.Tensor,
    t_nat: torch.Tensor,
    t_adv: torch.Tensor,
    y: torch.Tensor,
    delta: float = 1.0,
    use_probs: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """MMARD triangular-relationship Huber loss (see :func:`fastcollab.reference.triangle_huber`)."""
    _check_logits("triangle_huber", s_nat=s_nat, s_adv=s_adv, t_nat=t_nat, t_adv=t_adv)
    _check_labels("triangle_huber", y, s_nat)
    _check_reduction("triangle_huber", reduction, _SIMPLE_REDUCTIONS)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
        raise _err("triangle_huber", f"delta must be a positive float, got {delta!r}")
    backend = _pick("triangle_huber", s_nat)
    if backend == "reference":
        return reference.triangle_huber(s_nat, s_adv, t_nat, t_adv, y, delta, use_probs, reduction)
    return torch.ops.fastcollab.triangle_huber_fwd(
        _up(s_nat), _up(s_adv), _up(t_nat).detach(), _up(t_adv).detach(), y, float(delta), bool(use_probs), reduction, backend
    )[0]


# fake (meta) kernels for the compiled fastcollab::native_* ops, so they trace under torch.compile too
if _ext.available():

    @torch.library.register_fake("fastcollab::native_pgd_step_")
    def _(x_adv, grad, x, eps, step, eps_t, step_t, norm, l1_k):
        return None

    @torch.library.register_fake("fastcollab::native_project_l1_")
    def _(delta, eps, eps_t):
        return None

    def _loss_like(a, reduction):
        return a.new_empty((a.shape[0],) if reduction == "none" else ())

    @torch.library.register_fake("fastcollab::native_kl_div_fwd")
    def _(student, teacher, T, reduction, teacher_grad):
        dt = torch.empty_like(teacher) if teacher_grad else teacher.new_empty(0)
        return _loss_like(student, reduction), torch.empty_like(student), dt

    @torch.library.register_fake("fastcollab::native_boosted_ce_fwd")
    def _(logits, y, reduction):
        return _loss_like(logits, reduction), torch.empty_like(logits)

    @torch.library.register_fake("fastcollab::native_trades_kl_fwd")
    def _(clean, adv, reduction):
        return _loss_like(clean, reduction), torch.empty_like(clean), torch.empty_like(adv)

    @torch.library.register_fake("fastcollab::native_logit_mse_fwd")
    def _(a, b, reduction):
        return _loss_like(a, reduction), torch.empty_like(a), torch.empty_like(b)

    @torch.library.register_fake("fastcollab::native_mart_loss_fwd")
    def _(clean, adv, y, beta):
        return clean.new_empty(()), torch.empty_like(clean), torch.empty_like(adv)

    @torch.library.register_fake("fastcollab::native_triangle_huber_fwd")
    def _(s_nat, s_adv, t_nat, t_adv, y, delta, use_probs):
        return s_nat.new_empty((s_nat.shape[0],)), torch.empty_like(s_nat), torch.empty_like(s_adv)


__all__ = [
    "BACKENDS",
    "set_backend",
    "get_backend",
    "available_backends",
    "backend_report",
    "resolve",
    "pgd_step_",
    "project_l1_",
    "kl_div",
    "boosted_ce",
    "trades_kl",
    "mart_loss",
    "logit_mse",
    "triangle_huber",
]
