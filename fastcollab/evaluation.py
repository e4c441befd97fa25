"""Honest evaluation: clean accuracy and accuracy under white-box attacks, in fp32 and eval mode.

Attack names: ``clean``, ``fgsm``, ``pgd{K}`` (l_inf CE-PGD, K steps, uniform start), ``cw{K}`` (l_inf PGD on
the CW margin). Budgets default to eps 8/255 and step 2/255 and are recorded next to every number.

Multiple perturbations (MAT-MP, Maini et al. 2020): ``linf-pgd{K}``, ``l2-pgd{K}``, ``l1-pgd{K}`` (and ``-cw{K}``)
at MAT-MP's budgets (:data:`MP_BUDGETS`: eps 0.03 / 0.5 / 12, step 0.003 / 0.05 / 0.05), ``msd{K}`` (the MSD
attack over the three). :func:`union_metrics` gives per-norm accuracy (an example counts as robust in a norm
when every attack of that norm fails on it), ``R_avg`` (the mean over the norms) and ``R_worst`` (robust to
every attack at once, per example). :func:`evaluate_cohort` adds the transfer matrix between peers (MAT
Table 4) and CAT's prediction discrepancy (CAT Eq. 7).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .attacks import AttackSpec, msd_spec, run_attack
from .errors import FastcollabError

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw20")
#: MAT-MP's evaluation budgets per norm (eps, step): shared/papers/mat_*, Sec. 3.3.1
MP_BUDGETS = {"linf": (0.03, 0.003), "l2": (0.5, 0.05), "l1": (12.0, 0.05)}


@dataclass(frozen=True)
class EvalAttack:
    name: str
    spec: AttackSpec | None      # None: clean accuracy

    def describe(self) -> dict:
        return {"name": self.name, **(self.spec.describe() if self.spec else {})}


def parse_attack(name: str, eps: float = 8 / 255, step: float = 2 / 255) -> EvalAttack:
    name = name.strip().lower()
    if name == "clean":
        return EvalAttack(name, None)
    if name == "fgsm":
        return EvalAttack(name, AttackSpec(eps=eps, step=max(eps, 1e-12), steps=1, init="zero"))
    m = re.fullmatch(r"(linf|l2|l1)-(pgd|cw)(\d+)", name)
    if m:
        norm, kind, steps = m.group(1), m.group(2), int(m.group(3))
        e, s = MP_BUDGETS[norm]
        return EvalAttack(name, AttackSpec(norm=norm, eps=e, step=s, steps=steps, init="uniform",
                                           objective="ce" if kind == "pgd" else "cw"))
    m = re.fullmatch(r"msd(\d+)", name)
    if m:
        comps = [AttackSpec(norm=n, eps=e, step=s, steps=1, objective="ce") for n, (e, s) in MP_BUDGETS.items()]
        return EvalAttack(name, msd_spec(comps, int(m.group(1)), objective="ce"))
    m = re.fullmatch(r"(pgd|cw)(\d+)", name)
    if m:
        objective = "ce" if m.group(1) == "pgd" else "cw"
        return EvalAttack(name, AttackSpec(eps=eps, step=step, steps=int(m.group(2)), init="uniform",
                                           objective=objective))
    raise FastcollabError(f"unknown evaluation attack {name!r}: use clean, fgsm, pgdK, cwK (e.g. pgd20, cw20), "
                          "linf-pgdK, l2-pgdK, l1-pgdK or msdK")


def parse_attacks(names: str | list[str], eps: float = 8 / 255, step: float = 2 / 255) -> list[EvalAttack]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise FastcollabError("no evaluation attack given: pass e.g. --attacks clean,fgsm,pgd20,cw20")
    return [parse_attack(n, eps, step) for n in names]


def correct_under(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: EvalAttack) -> torch.Tensor:
    """Per-example booleans: is ``model`` right on the attacked ``x``? (model must be in eval mode)"""
    x_eval = x if attack.spec is None else run_attack(model, x, y, attack.spec)
    with torch.no_grad():
        return model(x_eval).argmax(1) == y


def _batches(x_all, y_all, batch_size, device):
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield x, y_all[start:start + batch_size].to(device)


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
    classified by the target peer (MAT Table 4; the diagonal is the white-box accuracy)."""
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
