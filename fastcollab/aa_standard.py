"""The standard AutoAttack (Croce & Hein 2020) through the optional extra ``fastcollab[autoattack]``.

The attack code is the authors' own, from the registry package ``pyautoattack==0.2.0`` (the code of
fra31/auto-attack: APGD-CE, APGD-T, FAB-T and Square with the standard hyper-parameters). This module only
prepares the call and records what was run beside the number:

* ``version="standard"``: ``AutoAttack(..., version="standard")`` — APGD-CE, APGD-T, FAB-T, Square;
* ``version="lite"``: the same object with only APGD-CE and APGD-T run (``version="custom"`` with
  ``attacks_to_run``), keeping the hyper-parameters that the standard version set on them (for l_inf / l2:
  1 restart, 100 iterations, 9 target classes; for l1: 5 restarts, 5 target classes, the large-eps schedule).

Every run is fp32, in eval mode, with a fixed seed, and leaves the caller's global random state untouched.
AutoAttack's own log lines (the ``auto-attack`` logger) and Python warnings are captured into the result;
its ``state_path`` resume is never used (broken in 0.2.0).
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Sequence

import torch
from torch import nn

from .apgd import check_aa_applicable
from .errors import FastcollabError

PINNED_VERSION = "0.2.0"
INSTALL_HINT = 'pip install "fastcollab[autoattack]"'
#: fastcollab's norm names and AutoAttack's
AA_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "lite": ("apgd-ce", "apgd-t")}
_RECORDED = {  # attribute names of pyautoattack's attack objects recorded per attack
    "apgd-ce": ("apgd", ("n_iter", "n_restarts", "eot_iter", "thr_decr", "use_largereps", "seed")),
    "apgd-t": ("apgd_targeted", ("n_iter", "n_restarts", "n_target_classes", "eot_iter", "thr_decr",
                                 "use_largereps", "loss", "seed")),
    "fab-t": ("fab", ("n_iter", "n_target_classes", "alpha_max", "eta", "beta", "seed")),
    "square": ("square", ("n_queries", "p_init", "n_restarts", "loss", "rescale_schedule", "seed")),
}


def autoattack_available() -> bool:
    """Is the optional extra (``pyautoattack``) importable?"""
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        return False
    return True


def _library():
    try:
        import pyautoattack
    except ImportError:
        raise FastcollabError(f"the standard AutoAttack needs the optional extra: {INSTALL_HINT} "
                              f"(installs pyautoattack=={PINNED_VERSION}, Croce & Hein's code)") from None
    version = getattr(pyautoattack, "__version__", "unknown")
    if version != PINNED_VERSION:
        raise FastcollabError(f"pyautoattack {version} is installed but fastcollab drives the API of "
                              f"{PINNED_VERSION}: {INSTALL_HINT} (or pip install pyautoattack=={PINNED_VERSION})")
    return pyautoattack


def aa_norm(norm: str) -> str:
    """AutoAttack's spelling of a norm (``linf`` / ``Linf`` -> ``Linf``), or one clear error."""
    key = str(norm).lower()
    if key not in AA_NORMS:
        raise FastcollabError(f"unknown AutoAttack norm {norm!r}: use Linf, L2 or L1")
    return AA_NORMS[key]


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str, seed: int,
           batch_size: int) -> None:
    if version not in VERSIONS:
        raise FastcollabError(f"unknown AutoAttack version {version!r}: use standard or lite")
    if not (isinstance(eps, (int, float)) and 0 < eps < float("inf")):
        raise FastcollabError(f"AutoAttack eps must be a number > 0, got {eps!r}: pass e.g. eps=8/255")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FastcollabError(f"AutoAttack seed must be an integer, got {seed!r} (a fixed seed makes it reproducible)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FastcollabError(f"AutoAttack batch_size must be a whole number >= 1, got {batch_size!r}")
    if model.training:
        raise FastcollabError("AutoAttack needs the model in eval mode: call model.eval() first "
                              "(BatchNorm statistics would change during the attack)")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes - {torch.float32}:
        raise FastcollabError(f"AutoAttack runs in fp32 but the model has {sorted(map(str, dtypes))} parameters: "
                              "call model.float() first")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32 or not len(x):
        raise FastcollabError("AutoAttack images must be a non-empty fp32 tensor [B, C, H, W] in [0, 1]: "
                              "convert uint8 images with x.float() / 255")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise FastcollabError(f"AutoAttack images must lie in [0, 1], got [{float(x.min()):.3g}, "
                              f"{float(x.max()):.3g}]: pass un-normalised images (the model normalises inside)")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.dtype != torch.long:
        raise FastcollabError(f"AutoAttack labels must be an int64 tensor [B] matching the {len(x)} images: "
                              "pass y.long()")


class _Capture(logging.Handler):
    """Collects the ``auto-attack`` logger's records for the duration of a run."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _hyperparameters(adversary, attacks: Sequence[str]) -> dict:
    out = {}
    for attack in attacks:
        obj_name, fields = _RECORDED[attack]
        obj = getattr(adversary, obj_name)
        out[attack] = {f: getattr(obj, f) for f in fields}
        if attack == "apgd-ce":
            out[attack]["loss"] = "ce"
        if attack == "fab-t":   # AutoAttack sets these on the FAB object when it runs FAB-T
            out[attack].update(targeted=True, n_restarts=1)
    return out


def run_standard_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "Linf",
                            eps: float, version: str = "standard", seed: int = 0, batch_size: int = 256,
                            device: str | torch.device | None = None) -> dict:
    """Run AutoAttack (``pyautoattack``) on ``model`` (eval mode, fp32) and images ``x`` in [0, 1].

    Returns ``{"robust": bool [B], "x_adv": [B, C, H, W], "meta": {...}}``: ``robust`` per example (clean
    and surviving every attack), the adversarial images (``x`` where no attack succeeded), and ``meta``
    with the library and its version, the attacks, every hyper-parameter, the norm, eps, seed, batch size,
    device, AutoAttack's warnings (its ``auto-attack`` logger at WARNING and Python warnings), its full
    log and the wall time. Bad input (including DLR on < 3 classes, targeted on < 4) raises one
    :class:`FastcollabError` before any attack runs; so does a missing extra (the message names
    ``pip install "fastcollab[autoattack]"``).
    """
    norm_aa = aa_norm(norm)
    _check(model, x, y, eps, version, seed, batch_size)
    lib = _library()
    params = list(model.parameters())
    device = torch.device(device) if device is not None else (params[0].device if params else x.device)
    attacks = list(VERSIONS[version])
    with torch.no_grad():
        num_classes = model(x[:1].to(device)).shape[1]
    check_aa_applicable(num_classes, attacks)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise FastcollabError(f"AutoAttack labels must be in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")

    logger = logging.getLogger("auto-attack")
    capture = _Capture()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    rng_devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught, torch.random.fork_rng(devices=rng_devices):
            warnings.simplefilter("always")
            adversary = lib.AutoAttack(model, device=device, eps=float(eps), norm=norm_aa, seed=seed,
                                       version="standard")
            if version == "lite":
                adversary.attacks_to_run = attacks
                adversary.version = "custom"
            # read before the run: l1's large-eps schedule overwrites apgd.n_iter while it runs
            hyperparameters = _hyperparameters(adversary, attacks)
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    elapsed = time.perf_counter() - start
    robust = (y_adv.to(y.device) == y).cpu()
    meta = {
        "library": "pyautoattack", "version": lib.__version__, "aa_version": version, "attacks": attacks,
        "norm": norm_aa, "eps": float(eps), "seed": seed, "batch_size": batch_size, "device": str(device),
        "dtype": "float32", "eval_mode": True, "num_classes": num_classes,
        "hyperparameters": hyperparameters,
        "warnings": [r.getMessage() for r in capture.records if r.levelno >= logging.WARNING]
        + [str(w.message) for w in caught],
        "log": [r.getMessage() for r in capture.records],
        "robust_accuracy": 100.0 * float(robust.float().mean()),
        "time_s": elapsed,
    }
    return {"robust": robust, "x_adv": x_adv.detach(), "meta": meta}
