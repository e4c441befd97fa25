"""Honest evaluation: clean accuracy and accuracy under white-box attacks, in fp32 and eval mode.

Attack names (the threat model is the evaluation's: l_inf eps 8/255 unless asked, whatever the training used):
``clean``, ``fgsm``, ``pgd{K}`` (CE-PGD, K steps, uniform start; ``pgd{K}x{R}``: R restarts), ``cw{K}`` (PGD
on the CW margin) in the evaluation's norm; ``apgd-ce``, ``apgd-t``, ``aa-fast`` (fastcollab's own APGD, the
whole cohort at once), ``aa`` and ``aa-lite`` (the standard AutoAttack of the optional extra). PGD keeps the
best iterate per example: an example counts as broken when ANY iterate misclassifies it.

Multiple perturbations (MAT-MP, Maini et al. 2020): ``linf-pgd{K}``, ``l2-pgd{K}``, ``l1-pgd{K}`` (and ``-cw{K}``)
at MAT-MP's budgets (:data:`MP_BUDGETS`: eps 0.03 / 0.5 / 12, step 0.003 / 0.05 / 0.05), ``msd{K}`` (the MSD
attack over the three). :func:`union_metrics` gives per-norm accuracy (an example counts as robust in a norm
when every attack of that norm fails on it), ``R_avg`` (the mean over the norms) and ``R_worst`` (robust to
every attack at once, per example). :func:`evaluate_cohort` adds the transfer matrix between peers (MAT
Table 4) and CAT's prediction discrepancy (CAT Eq. 7).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..attacks import NORMS, OBJECTIVES, AttackSpec, MSDSpec, bn_mode, msd_spec, random_init, run_attack
from ..errors import FastcollabError

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw20")
#: MAT-MP's evaluation budgets per norm (eps, step): shared/papers/mat_*, Sec. 3.3.1
MP_BUDGETS = {"linf": (0.03, 0.003), "l2": (0.5, 0.05), "l1": (12.0, 0.05)}
#: the evaluation's default budget per norm: RobustBench / AutoAttack's standard threat models
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
#: default PGD step as a fraction of eps per norm (l_inf 2/255 at 8/255; l2 and l1 as MAT-MP's 0.05)
STEP_FRACTION = {"linf": 1 / 4, "l2": 1 / 10, "l1": 1 / 240}
#: attacks run by a library over the whole cohort (fastcollab.apgd, or the AutoAttack extra)
LIBRARY_ATTACKS = ("apgd-ce", "apgd-t", "aa-fast", "aa", "aa-lite")
EXAMPLE_NAMES = ("clean", "fgsm", "pgd20", "pgd20x5", "cw20", "apgd-ce", "apgd-t", "aa-fast", "aa", "aa-lite",
                 "linf-pgd50", "l2-pgd50", "l1-pgd50", "linf-cw50", "l2-cw50", "l1-cw50", "msd50")


@dataclass(frozen=True)
class EvalAttack:
    """One evaluation attack: ``spec`` for fastcollab's PGD family (None for clean accuracy and for the
    library attacks of :data:`LIBRARY_ATTACKS`, which carry their own ``norm`` / ``eps``), ``restarts``
    random restarts (worst case per example)."""

    name: str
    spec: AttackSpec | None      # None: clean accuracy, or a library attack
    restarts: int = 1
    kind: str = "pgd"            # "clean", "pgd" (the PGD family incl. FGSM, CW, MSD) or a LIBRARY_ATTACKS name
    norm: str | None = None      # library attacks only
    eps: float | None = None     # library attacks only

    def describe(self) -> dict:
        if self.kind in LIBRARY_ATTACKS:
            return {"name": self.name, "attack": self.kind, "norm": self.norm, "eps": self.eps}
        out = {"name": self.name, **(self.spec.describe() if self.spec else {})}
        if self.restarts > 1:
            out["restarts"] = self.restarts
        return out


def eps_fits_norm(eps: float, norm: str, what: str = "--eps", dim: int | None = None) -> None:
    """Bad input: an eps that cannot belong to ``norm`` on [0, 1] images (e.g. ``8`` meant as 8/255)."""
    if norm not in NORMS:
        raise FastcollabError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise FastcollabError(f"{what} must be a finite number > 0 for the {norm} threat model, got {eps!r}: "
                              f"pass e.g. {what} {_eps_hint(norm)}")
    if norm == "linf" and eps > 1:
        raise FastcollabError(f"{what} {eps:g} does not fit l_inf on [0, 1] images (the whole box is eps 1): "
                              f"did you mean {eps:g}/255?")
    if dim is not None:
        box = {"linf": 1.0, "l2": math.sqrt(dim), "l1": float(dim)}[norm]
        if eps > box:
            raise FastcollabError(f"{what} {eps:g} does not fit {norm} on [0, 1] images of {dim} values (the "
                                  f"whole box has {norm} diameter {box:g}): pass e.g. {what} {_eps_hint(norm)}")


def _eps_hint(norm: str) -> str:
    return {"linf": "8/255", "l2": "0.5", "l1": "12"}[norm]


def _unknown(name: str) -> FastcollabError:
    close = difflib.get_close_matches(name, EXAMPLE_NAMES, n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return FastcollabError(f"unknown evaluation attack {name!r}: {hint}use clean, fgsm, pgdK, pgdKxR, cwK, "
                           f"apgd-ce, apgd-t, aa-fast, aa, aa-lite, linf-/l2-/l1-pgdK[xR] (or -cwK) or msdK")


def parse_attack(name: str, eps: float | None = None, step: float | None = None,
                 norm: str = "linf") -> EvalAttack:
    """An attack name in the evaluation's threat model (``norm``, ``eps``; default :data:`DEFAULT_EPS`) with
    PGD step ``step`` (default ``eps`` × :data:`STEP_FRACTION`)."""
    name = name.strip().lower()
    eps = DEFAULT_EPS.get(norm, 8 / 255) if eps is None else eps
    step = eps * STEP_FRACTION.get(norm, 1 / 4) if step is None else step
    if name == "clean":
        return EvalAttack(name, None, kind="clean")
    if name in LIBRARY_ATTACKS:
        return EvalAttack(name, None, kind=name, norm=norm, eps=eps)
    if name == "fgsm":
        return EvalAttack(name, AttackSpec(norm=norm, eps=eps, step=max(eps, 1e-12), steps=1, init="zero"))
    m = re.fullmatch(r"(linf|l2|l1)-(pgd|cw)(\d+)(?:x(\d+))?", name)
    if m:
        mp_norm, kind, steps = m.group(1), m.group(2), int(m.group(3))
        e, s = MP_BUDGETS[mp_norm]
        return EvalAttack(name, AttackSpec(norm=mp_norm, eps=e, step=s, steps=steps, init="uniform",
                                           objective="ce" if kind == "pgd" else "cw"),
                          restarts=_restarts(name, m.group(4)))
    m = re.fullmatch(r"msd(\d+)", name)
    if m:
        comps = [AttackSpec(norm=n, eps=e, step=s, steps=1, objective="ce") for n, (e, s) in MP_BUDGETS.items()]
        return EvalAttack(name, msd_spec(comps, int(m.group(1)), objective="ce"))
    m = re.fullmatch(r"(pgd|cw)(\d+)(?:x(\d+))?", name)
    if m:
        objective = "ce" if m.group(1) == "pgd" else "cw"
        return EvalAttack(name, AttackSpec(norm=norm, eps=eps, step=step, steps=int(m.group(2)), init="uniform",
                                           objective=objective), restarts=_restarts(name, m.group(3)))
    raise _unknown(name)


def _restarts(name: str, text: str | None) -> int:
    """R of an ``...KxR`` attack name (1 without the suffix)."""
    restarts = int(text or 1)
    if restarts < 1:
        raise FastcollabError(f"attack {name!r}: restarts must be >= 1, e.g. pgd20x5 or linf-pgd50x10")
    return restarts


def parse_attacks(names: str | list[str], eps: float | None = None, step: float | None = None,
                  norm: str = "linf") -> list[EvalAttack]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise FastcollabError("no evaluation attack given: pass e.g. --attacks clean,fgsm,pgd20,cw20")
    eps_fits_norm(DEFAULT_EPS.get(norm, 8 / 255) if eps is None else eps, norm)
    parsed = [parse_attack(n, eps, step, norm) for n in names]
    seen = set()
    for a in parsed:
        if a.name in seen:
            raise FastcollabError(f"evaluation attack {a.name!r} is listed twice: list each attack once")
        seen.add(a.name)
    return parsed


# ------------------------------------------------------------------------------ the PGD family, per example
def pgd_best_iterate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     spec: AttackSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(robust bool[B], x_adv)``: PGD (``spec``, eval-mode BN) where an example counts as broken as soon as
    ANY iterate (the start included) misclassifies it; ``x_adv`` is that first misclassified iterate (the
    last iterate for the survivors). Broken examples leave the batch (early exit). The step is the fused
    ``ops.pgd_step_``, as in :func:`fastcollab.attacks.pgd`."""
    objective = OBJECTIVES[spec.objective]
    x = x.detach()
    x_out = random_init(x, spec)
    robust = torch.ones(len(x), dtype=torch.bool, device=x.device)
    idx = torch.arange(len(x), device=x.device)
    x_adv, x0, ya = x_out.clone(), x, y
    with bn_mode([model], ["eval"]):
        for i in range(spec.steps + 1):
            last = i == spec.steps
            x_adv.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = model(x_adv).float()
            wrong = logits.argmax(1) != ya
            x_out[idx] = x_adv.detach()
            robust[idx[wrong]] = False
            if last:
                break
            loss = objective({"attacked": logits}, ya, {}).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            keep = ~wrong
            if not bool(keep.any()):
                break
            x_adv, grad, x0, ya, idx = x_adv.detach()[keep], grad[keep], x0[keep], ya[keep], idx[keep]
            ops.pgd_step_(x_adv, grad, x0, spec.eps, spec.step, spec.norm)
    return robust, x_out


def robust_under(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 attack: EvalAttack) -> tuple[torch.Tensor, torch.Tensor]:
    """``(robust bool[B], x_adv)`` for a clean / PGD-family attack (model in eval mode). Restarts: the worst
    case per example, each restart on the survivors only. MSD keeps its own best-loss point."""
    if attack.spec is None:
        with torch.no_grad():
            return model(x).argmax(1) == y, x
    if isinstance(attack.spec, MSDSpec):
        x_adv = run_attack(model, x, y, attack.spec)
        with torch.no_grad():
            return model(x_adv).argmax(1) == y, x_adv
    robust, x_adv = pgd_best_iterate(model, x, y, attack.spec)
    for _ in range(attack.restarts - 1):
        alive = robust.nonzero().squeeze(1)
        if len(alive) == 0:
            break
        r, xa = pgd_best_iterate(model, x[alive], y[alive], attack.spec)
        robust[alive] = r
        x_adv[alive] = xa
    return robust, x_adv


def correct_under(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: EvalAttack) -> torch.Tensor:
    """Per-example booleans: is ``model`` right on the attacked ``x``? (model must be in eval mode)"""
    if attack.kind in LIBRARY_ATTACKS:
        from .library import run_library_attack

        return run_library_attack(attack, {"m": model}, x, y)["robust"]["m"]
    return robust_under(model, x, y, attack)[0]


def _batches(x_all, y_all, batch_size, device):
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield x, y_all[start:start + batch_size].to(device)


def percent(correct: torch.Tensor) -> float:
    """Accuracy in % of per-example flags (0 for none)."""
    return 100.0 * float(correct.float().mean()) if len(correct) else 0.0


def per_example_correct(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, attacks: list[EvalAttack],
                        batch_size: int = 256, progress=None) -> dict[str, torch.Tensor]:
    """``{attack name: bool[N]}``: is ``model`` right on each (attacked) test image? (eval mode, fp32)"""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[torch.Tensor]] = {a.name: [] for a in attacks}
    try:
        for x, y in _batches(x_all, y_all, batch_size, device):
            for a in attacks:
                hits[a.name].append(correct_under(model, x, y, a).cpu())
            if progress is not None:
                progress.update(len(x))
    finally:
        model.train(was_training)
    return {k: (torch.cat(v) if v else torch.zeros(0, dtype=torch.bool)) for k, v in hits.items()}


def evaluate_model(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, attacks: list[EvalAttack],
                   batch_size: int = 256, progress=None) -> dict[str, float]:
    """Accuracy (%) of ``model`` under each attack on uint8-or-float images ``x_all``, batch by batch."""
    correct = per_example_correct(model, x_all, y_all, attacks, batch_size, progress)
    return {name: 100.0 * float(c.sum()) / max(len(x_all), 1) for name, c in correct.items()}


def attack_norm(attack: EvalAttack) -> str | None:
    """The threat model an attack belongs to for the union metrics (None: clean accuracy)."""
    if attack.kind in LIBRARY_ATTACKS:
        return attack.norm
    return None if attack.spec is None else attack.spec.norm


def union_metrics(correct: dict[str, torch.Tensor], attacks: list[EvalAttack]) -> dict[str, float]:
    """Per-norm robust accuracy (worst case per example over that norm's attacks), ``avg`` (R_avg: mean of
    the per-norm accuracies, l_inf / l2 / l1 only) and ``worst`` (R_worst: right under every attack, per
    example), all in %. MAT-MP Table 5 (shared/papers/mat_*, Sec. 3.3.2)."""
    by_norm: dict[str, torch.Tensor] = {}
    every = None
    for a in attacks:
        norm = attack_norm(a)
        if norm is None:
            continue
        c = correct[a.name]
        by_norm[norm] = c if norm not in by_norm else by_norm[norm] & c
        every = c if every is None else every & c
    if every is None:
        return {}
    pct = lambda c: 100.0 * float(c.sum()) / max(len(c), 1)  # noqa: E731
    out = {norm: pct(c) for norm, c in by_norm.items()}
    norms = [n for n in ("linf", "l2", "l1") if n in by_norm]
    out["avg"] = sum(out[n] for n in norms) / len(norms) if norms else pct(every)
    out["worst"] = pct(every)
    return out


def transfer_matrix(models: dict[str, nn.Module], x_all: torch.Tensor, y_all: torch.Tensor, attack: EvalAttack,
                    batch_size: int = 256) -> dict[str, dict[str, float]]:
    """``{source: {target: accuracy %}}``: adversarial examples crafted with ``attack`` on the source peer,
    classified by the target peer (MAT Table 4). The transferred image is PGD's last iterate, the point of
    highest source loss, which is what a standard PGD attack returns (MAT Table 4 transfers PGD examples and
    says no more); the first misclassifying iterate that the best-iterate scoring keeps sits barely across
    the source's boundary and transfers worse. So the diagonal is the last-iterate white-box accuracy, at or
    above the best-iterate number of the same attack."""
    names = list(models)
    hits = {s: {t: 0 for t in names} for s in names}
    was = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        device = next(next(iter(models.values())).parameters()).device
        for x, y in _batches(x_all, y_all, batch_size, device):
            for s in names:
                x_adv = run_attack(models[s], x, y, attack.spec)
                with torch.no_grad():
                    for t in names:
                        hits[s][t] += int((models[t](x_adv).argmax(1) == y).sum())
    finally:
        for n, m in models.items():
            m.train(was[n])
    n = max(len(x_all), 1)
    return {s: {t: 100.0 * h / n for t, h in row.items()} for s, row in hits.items()}


def prediction_discrepancy(models: dict[str, nn.Module], x_all: torch.Tensor,
                           batch_size: int = 256) -> dict[str, float]:
    """``{"i|j": %}``: CAT Eq. 7, ``1 − (1/N)·Σ_i 1[f(x_i) = g(x_i)]`` on clean test images, for every pair."""
    names = list(models)
    device = next(next(iter(models.values())).parameters()).device
    preds = {n: [] for n in names}
    was = {n: m.training for n, m in models.items()}
    try:
        with torch.no_grad():
            for x, _ in _batches(x_all, torch.zeros(len(x_all), dtype=torch.long), batch_size, device):
                for n in names:
                    preds[n].append(models[n].eval()(x).argmax(1).cpu())
    finally:
        for n, m in models.items():
            m.train(was[n])
    p = {n: torch.cat(v) for n, v in preds.items()}
    return {f"{a}|{b}": 100.0 * float((p[a] != p[b]).float().mean()) if len(x_all) else 0.0
            for i, a in enumerate(names) for b in names[i + 1:]}


def pick_transfer_attack(attacks: list[EvalAttack]) -> EvalAttack | None:
    """The attack the transfer matrix uses: the first iterative one (PGD/CW/MSD), else the first non-clean."""
    robust = [a for a in attacks if a.spec is not None]
    iterative = [a for a in robust if a.spec.steps > 1]
    return (iterative or robust or [None])[0]


def evaluate_cohort(models: dict[str, nn.Module], x_all: torch.Tensor, y_all: torch.Tensor,
                    attacks: list[EvalAttack], batch_size: int = 256, progress=None,
                    transfer: EvalAttack | None | str = "auto") -> dict:
    """Everything the final evaluation reports for a cohort: ``peers`` (accuracy % per attack), ``union``
    (per-norm, R_avg, R_worst per peer), and for two or more peers ``transfer`` (source → target accuracy
    under ``transfer``, default :func:`pick_transfer_attack`) and ``discrepancy`` (CAT Eq. 7, %)."""
    peers, union = {}, {}
    for name, model in models.items():
        correct = per_example_correct(model, x_all, y_all, attacks, batch_size, progress)
        peers[name] = {k: 100.0 * float(c.sum()) / max(len(x_all), 1) for k, c in correct.items()}
        u = union_metrics(correct, attacks)
        if u:
            union[name] = u
    out = {"peers": peers, "union": union}
    if len(models) > 1:
        attack = pick_transfer_attack(attacks) if transfer == "auto" else transfer
        if attack is not None:
            out["transfer"] = {"attack": attack.name, **attack.describe(),
                               "accuracy": transfer_matrix(models, x_all, y_all, attack, batch_size)}
        out["discrepancy"] = prediction_discrepancy(models, x_all, batch_size)
    return out
