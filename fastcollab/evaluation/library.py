"""Adapters from evaluation attack names to the attacks that run a whole cohort at once: fastcollab's own
APGD (:mod:`fastcollab.apgd`: ``apgd-ce``, ``apgd-t``, ``aa-fast``) and the standard AutoAttack of the
optional extra (:mod:`fastcollab.aa_standard`: ``aa``, ``aa-lite``; Square for the black-box check).

Every adapter returns ``{"robust": {peer: bool[B]}, "x_adv": {peer: tensor or None}, "meta": {...}}`` where
``meta`` holds every hyper-parameter (and, for AutoAttack, the library version, its warnings and the seed).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import FastcollabError
from .core import EvalAttack


def check_applicable(attacks: list[EvalAttack], num_classes: int) -> None:
    """Bad input before any attack runs: DLR needs 3 classes, targeted DLR 4; AutoAttack needs the extra."""
    from ..apgd import APGDSpec, check_aa_applicable

    names = [a.kind for a in attacks]
    check_aa_applicable(num_classes, names)
    for a in attacks:
        if a.kind in ("apgd-ce", "apgd-t", "aa-fast"):
            APGDSpec(norm=a.norm, eps=a.eps)          # its own one-line errors (l1, eps)
    standard = [k for k in names if k in ("aa", "aa-lite")]
    if standard:
        from ..aa_standard import INSTALL_HINT, autoattack_available

        if not autoattack_available():
            raise FastcollabError(f"attack {standard[0]} is the standard AutoAttack of the optional extra, which is "
                                  f"not installed: {INSTALL_HINT} (or use aa-fast, fastcollab's own APGD pair)")


def _targets(num_classes: int) -> int:
    return min(9, num_classes - 1)


def run_library_attack(attack: EvalAttack, models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                       seed: int = 0, batch_size: int = 256) -> dict:
    from ..apgd import APGDSpec, aa_fast, apgd_cohort

    with torch.no_grad():
        num_classes = next(iter(models.values()))(x[:1]).shape[1]
    if attack.kind in ("apgd-ce", "apgd-t"):
        spec = APGDSpec(norm=attack.norm, eps=attack.eps, seed=seed,
                        loss="ce" if attack.kind == "apgd-ce" else "dlr-targeted",
                        n_target_classes=_targets(num_classes) if attack.kind == "apgd-t" else 9)
        out = apgd_cohort(models, x, y, spec)
        return {"robust": {n: r for n, (r, _) in out.items()}, "x_adv": {n: xa for n, (_, xa) in out.items()},
                "meta": spec.describe()}
    if attack.kind == "aa-fast":
        robust = aa_fast(models, x, y, norm=attack.norm, eps=attack.eps, seed=seed)
        meta = {"attacks": [APGDSpec(norm=attack.norm, eps=attack.eps, seed=seed, loss="ce").describe(),
                            APGDSpec(norm=attack.norm, eps=attack.eps, seed=seed, loss="dlr-targeted",
                                     n_target_classes=_targets(num_classes)).describe()]}
        return {"robust": robust, "x_adv": {n: None for n in robust}, "meta": meta}
    if attack.kind in ("aa", "aa-lite"):
        from ..aa_standard import run_standard_autoattack

        robust, x_adv, meta = {}, {}, {}
        for name, model in models.items():
            r = run_standard_autoattack(model, x, y, norm=attack.norm, eps=attack.eps,
                                        version="standard" if attack.kind == "aa" else "lite", seed=seed,
                                        batch_size=batch_size)
            robust[name], x_adv[name], meta[name] = r["robust"], r["x_adv"], r["meta"]
        return {"robust": robust, "x_adv": x_adv, "meta": meta}
    raise ValueError(f"not a library attack: {attack.name}")


def square_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, queries: int,
                  seed: int) -> torch.Tensor | None:
    """Per-example robustness (bool[B]) to the Square attack of the AutoAttack extra (Andriushchenko et al.
    2020; margin loss, p_init 0.8, AutoAttack's settings but ``queries`` queries), or None when the extra is
    not installed or the norm is not l_inf / l2."""
    try:
        from pyautoattack.square import SquareAttack
    except ImportError:
        return None
    if norm not in ("linf", "l2"):
        return None
    attack = SquareAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], n_queries=queries, eps=eps, p_init=0.8,
                          n_restarts=1, seed=seed, loss="margin", resc_schedule=True, device=x.device)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        x_adv = attack.perturb(x, y)
        return model(x_adv).argmax(1) == y
