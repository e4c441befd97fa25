"""Sanity checks beside every robust number (AutoAttack's ``checks.py``; Carlini et al. 2019, "On evaluating
adversarial robustness"; Athalye et al. 2018, "Obfuscated gradients"), run on a small subset of the test
images so that they are cheap.

Each check is ``{"name", "status": pass|warn|fail|skipped, "value", "threshold", "explain"}``:

- model contract: ``eval_mode`` (no module left training, outputs independent of the rest of the batch),
  ``logits`` (not probabilities), ``deterministic`` (two passes agree), ``no_side_effects`` (a forward
  changes no parameter, gradient or buffer), ``input_range`` (data in [0, 1], and the model does not score
  better on another input range);
- ``perturbations_valid``: every adversarial example in the ball, in the box, finite;
- ``zero_gradient``: share of clean inputs where the input gradient of the CW margin is exactly zero (the
  margin does not saturate like CE does, so a zero is masking: quantised inputs, argmax, rounding);
- ``fgsm_vs_pgd``: examples broken by FGSM but not by PGD (the iterative attack must dominate per example);
- ``more_steps`` / ``restarts``: PGD-2K and 5 restarts may not lower PGD-K's accuracy by more than a tolerance;
- ``eps_sweep``: accuracy over {0, ε/4, ε/2, ε, 2ε, 4ε, the whole box} non-increasing and at chance at the end;
- ``square``: the black-box Square attack on the white-box survivors breaks at most 0.2 points more
  (AutoAttack's threshold: warn above it, fail above one image of the subset);
- ``transfer``: adversarial examples of another peer do not beat the white-box attack;
- ``random_noise``: uniform noise in the ball is weaker than the white-box attack;
- ``degenerate``: one class predicted for most inputs, a clean loss ≈ log C, or non-finite logits. A
  degenerate model's robust accuracy is meaningless.

Tolerances are in accuracy points and never finer than a few images of the subset, so that the checks do
not flicker with the random starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackSpec, random_init
from .core import EvalAttack, percent, pgd_best_iterate, robust_under

CHECK_N = 128            #: default subset size of the checks
CHECK_STEPS = 10         #: K of the checks' PGD-K
SQUARE_THRESHOLD = 0.2   #: AutoAttack's threshold (points) for the black-box check


@dataclass(frozen=True)
class CheckBudget:
    """The threat model and the effort of the checks (PGD-K with step 2.5·ε/K, Madry et al. 2018)."""

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = CHECK_STEPS
    restarts: int = 5
    square_queries: int = 1000

    def spec(self, eps: float | None = None, steps: int | None = None) -> AttackSpec:
        e = self.eps if eps is None else eps
        return AttackSpec(norm=self.norm, eps=e, step=max(2.5 * e / self.steps, 1e-12),
                          steps=self.steps if steps is None else steps, init="uniform")

    def box(self, dim: int) -> float:
        """The radius that covers the whole [0, 1] box: l_inf 1, l2 √d, l1 d."""
        return {"linf": 1.0, "l2": math.sqrt(dim), "l1": float(dim)}[self.norm]

    def sweep(self, dim: int) -> list[float]:
        e = self.eps
        return [0.0, e / 4, e / 2, e, 2 * e, 4 * e, self.box(dim)]


def check(name: str, status: str, value, threshold, explain: str) -> dict:
    return {"name": name, "status": status, "value": value, "threshold": threshold, "explain": explain}


def _tol(n: int, points: float, images: int) -> float:
    """A tolerance in accuracy points, never finer than ``images`` images of an ``n``-image subset."""
    return round(max(points, 100.0 * images / max(n, 1)), 4)


def _graded(name, value, warn_above, fail_above, explain) -> dict:
    status = "fail" if value > fail_above else "warn" if value > warn_above else "pass"
    return check(name, status, round(value, 4), {"warn_above": warn_above, "fail_above": fail_above}, explain)


# ----------------------------------------------------------------------------------------- model contract
def check_eval_mode(model: nn.Module, x: torch.Tensor) -> dict:
    training = [n or "(root)" for n, m in model.named_modules() if m.training]
    with torch.no_grad():
        half = max(1, len(x) // 2)
        diff = float((model(x)[:half] - model(x[:half])).abs().max()) if len(x) > 1 else 0.0
        scale = float(model(x[:half]).abs().max()) + 1.0
    if training:
        return check("eval_mode", "fail", training[:3], "no module training",
                     f"module(s) {', '.join(training[:3])} still in training mode after model.eval()")
    status = "fail" if not diff <= 1e-4 * scale else "pass"
    return check("eval_mode", status, diff, 1e-4 * scale,
                 "outputs of an image must not depend on the rest of the batch (BatchNorm batch statistics?)")


def check_logits(model: nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad():
        z = model(x).float()
    probs = ((z >= 0) & (z <= 1)).all(1) & ((z.sum(1) - 1).abs() < 1e-3)
    logprobs = (z <= 0).all(1) & (torch.logsumexp(z, 1).abs() < 1e-3)
    p, lp = percent(probs), percent(logprobs)
    if p > 50:
        return check("logits", "fail", p, "≤ 50 % of rows are probability vectors",
                     f"{p:.0f} % of output rows are in [0,1] and sum to 1: the model returns probabilities "
                     "(softmax), so CE-based attacks see flat gradients; return logits")
    if lp > 50:
        return check("logits", "warn", lp, "≤ 50 % of rows are log-probabilities",
                     f"{lp:.0f} % of output rows are log-probabilities: fine for CE, but the CW/DLR margins "
                     "assume logits")
    return check("logits", "pass", p, "≤ 50 % of rows are probability vectors", "outputs look like logits")


def check_deterministic(model: nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad():
        a, b = model(x).float(), model(x).float()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    thr = 1e-4 * (1.0 + float(a.abs().max()))
    status = "pass" if diff <= thr else "fail"
    return check("deterministic", status, diff, thr,
                 "two forward passes on the same images must agree (randomised defences need EOT attacks)")


def check_no_side_effects(model: nn.Module, x: torch.Tensor) -> dict:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        model(xg)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), params[n])]
    changed += [n + ".grad" for n, p in model.named_parameters()
                if (p.grad is None) != (grads[n] is None) or (p.grad is not None and not torch.equal(p.grad, grads[n]))]
    changed += [n for n, b in model.named_buffers() if n in buffers and not torch.equal(b, buffers[n])]
    changed += ["input.grad"] if xg.grad is not None else []
    status = "fail" if changed else "pass"
    return check("no_side_effects", status, changed[:5], "nothing changed",
                 "a forward pass must not step parameters, write gradients or update buffers"
                 + (f": changed {', '.join(changed[:5])}" if changed else ""))


def check_input_range(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1 or not math.isfinite(lo + hi):
        return check("input_range", "fail", [lo, hi], [0.0, 1.0],
                     "evaluation images must be NCHW floats in [0, 1]")
    with torch.no_grad():
        acc = {"[0,1]": percent(model(x).argmax(1) == y),
               "[0,255]": percent(model(x * 255).argmax(1) == y),
               "standardised": percent(model((x - 0.5) / 0.25).argmax(1) == y)}
    best = max(acc, key=acc.get)
    margin = _tol(len(x), 10.0, 3)
    if best != "[0,1]" and acc[best] > acc["[0,1]"] + margin:
        return check("input_range", "warn", acc, f"[0,1] within {margin} points of the best range",
                     f"the model scores better on {best} inputs than on [0,1]: it seems to expect another "
                     "input range (normalise inside the model)")
    return check("input_range", "pass", acc, f"[0,1] within {margin} points of the best range",
                 "data in [0, 1] and the model scores best there")


def check_degenerate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    with torch.no_grad():
        z = model(x).float()
    if not bool(torch.isfinite(z).all()):
        return check("degenerate", "fail", "non-finite logits", "finite", "the model outputs NaN/inf")
    share = float(torch.bincount(z.argmax(1), minlength=num_classes).max()) / max(len(x), 1)
    loss = float(F.cross_entropy(z, y))
    rel = abs(loss - math.log(num_classes)) / math.log(num_classes)
    share_max = 0.5 + 0.5 / num_classes
    value = {"top_class_share": round(share, 4), "clean_loss": round(loss, 4), "log_C": round(math.log(num_classes), 4)}
    thr = {"top_class_share_max": round(share_max, 4), "loss_rel_to_log_C_min": 0.02}
    if share > share_max or rel < 0.02:
        why = (f"{100 * share:.0f} % of inputs get one class" if share > share_max
               else f"clean loss {loss:.3f} ≈ log C = {math.log(num_classes):.3f} (uniform output)")
        return check("degenerate", "fail", value, thr, f"degenerate model: {why}; its robust accuracy is meaningless")
    return check("degenerate", "pass", value, thr, "predictions spread over classes, loss away from log C")


def check_zero_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(xg).float()
        z_y = z.gather(1, y[:, None]).squeeze(1)
        other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
        (g,) = torch.autograd.grad((other - z_y).sum(), xg, allow_unused=True)
    if g is None:
        rate = 100.0
    else:
        per = g.flatten(1).abs().amax(1)
        rate = percent((per == 0) | ~torch.isfinite(per))
    return _graded("zero_gradient", rate, 5.0, 50.0,
                   f"{rate:.1f} % of clean inputs have an exactly zero (or non-finite) input gradient of the CW "
                   "margin: gradient masking (quantised or non-differentiable input processing) if high")


# ------------------------------------------------------------------------------------- attack consistency
def check_perturbations(x: torch.Tensor, advs: dict[str, torch.Tensor], norm: str, eps: float) -> dict:
    bad = {}
    for name, xa in advs.items():
        d = (xa - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1) if norm == "l2" else d.abs().sum(1)
        ok = (size <= eps * (1 + 1e-4) + 1e-6) & (xa.flatten(1) >= 0).all(1) & (xa.flatten(1) <= 1).all(1)
        ok &= torch.isfinite(xa.flatten(1)).all(1)
        if not bool(ok.all()):
            bad[name] = int((~ok).sum())
    return check("perturbations_valid", "fail" if bad else "pass", bad, "0 invalid examples",
                 f"every adversarial example must lie in the {norm} ball of radius {eps:g}, in [0, 1], finite")


def check_fgsm_vs_pgd(fgsm_robust: torch.Tensor, pgd_robust: torch.Tensor) -> dict:
    n = len(pgd_robust)
    v = percent(~fgsm_robust & pgd_robust)
    return _graded("fgsm_vs_pgd", v, _tol(n, 1.0, 1), _tol(n, 5.0, 3),
                   f"{v:.1f} % of examples are broken by FGSM but not by PGD: the iterative attack must dominate")


def check_effort(name: str, base: torch.Tensor, more: torch.Tensor, what: str) -> dict:
    n = len(base)
    drop = percent(base) - percent(more)
    return _graded(name, drop, _tol(n, 2.0, 2), _tol(n, 10.0, 4),
                   f"{what} lowers accuracy by {drop:.1f} points: the number has {'not ' if drop > _tol(n, 2.0, 2) else ''}"
                   "converged")


def check_sweep(eps: list[float], acc: list[float], n: int, num_classes: int) -> dict:
    rise = max([b - a for a, b in zip(acc, acc[1:])] + [0.0])
    end_max = 100.0 / num_classes + 100.0 / max(n, 1)
    value = {"max_rise": round(rise, 4), "accuracy_at_box": round(acc[-1], 4)}
    thr = {"max_rise": _tol(n, 0.0, 1), "accuracy_at_box_max": round(end_max, 4)}
    problems = []
    if rise > thr["max_rise"]:
        problems.append(f"accuracy rises by {rise:.1f} points as ε grows")
    if acc[-1] > end_max:
        problems.append(f"accuracy {acc[-1]:.1f} % with the whole box allowed, above chance "
                        f"{100 / num_classes:.1f} %: the attack cannot move the model")
    return check("eps_sweep", "fail" if problems else "pass", value, thr,
                 "; ".join(problems) or "accuracy non-increasing in ε and at chance over the whole box")


def check_transfer(white: torch.Tensor, transfer: dict[str, torch.Tensor]) -> dict:
    if not transfer:
        return check("transfer", "skipped", None, None, "one peer: no other model to transfer from")
    n = len(white)
    worst = min(transfer, key=lambda s: percent(transfer[s]))
    gap = percent(white) - percent(transfer[worst])
    return _graded("transfer", gap, _tol(n, 2.0, 2), _tol(n, 2.0, 2),
                   f"examples crafted on {worst} leave {percent(transfer[worst]):.1f} % vs white-box "
                   f"{percent(white):.1f} %: transfer must not beat the white-box attack")


def check_noise(white: torch.Tensor, noise: torch.Tensor) -> dict:
    n = len(white)
    gap = percent(white) - percent(noise)
    return _graded("random_noise", gap, _tol(n, 2.0, 2), _tol(n, 2.0, 2),
                   f"uniform noise in the ball leaves {percent(noise):.1f} % vs white-box {percent(white):.1f} %: "
                   "noise must be weaker")


def check_square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, white: torch.Tensor,
                 budget: CheckBudget, seed: int) -> dict:
    from .library import square_robust

    alive = white.nonzero().squeeze(1)
    thr = SQUARE_THRESHOLD
    if len(alive) == 0:
        return check("square", "pass", 0.0, {"warn_above": thr}, "no white-box survivors left for the black-box attack")
    result = square_robust(model, x[alive], y[alive], norm=budget.norm, eps=budget.eps,
                           queries=budget.square_queries, seed=seed)
    if result is None:
        return check("square", "skipped", None, thr, "the AutoAttack extra is not installed: "
                     'pip install "fastcollab[autoattack]" to run Square on the white-box survivors')
    extra = 100.0 * float((~result).sum()) / max(len(x), 1)
    fail_above = _tol(len(x), thr, 1)
    status = "fail" if extra > fail_above else "warn" if extra > thr else "pass"
    return check("square", status, round(extra, 4), {"warn_above": thr, "fail_above": fail_above},
                 f"Square ({budget.square_queries} queries) breaks {extra:.2f} more points than the checks' "
                 "white-box PGD" + ("" if status == "pass" else ": the white-box numbers over-state robustness "
                                    "(masked or weak gradients)"))


# ---------------------------------------------------------------------------------------------- driver
def _sweep(model, x, y, budget: CheckBudget, dim: int, known: dict[float, torch.Tensor] | None = None) -> dict:
    """Accuracy under the checks' PGD-K at every ε of the grid (``known``: results already computed)."""
    grid = budget.sweep(dim)
    acc = []
    for e in grid:
        if known and e in known:
            acc.append(percent(known[e]))
            continue
        attack = EvalAttack("clean", None, kind="clean") if e == 0 else EvalAttack("sweep", budget.spec(e))
        acc.append(percent(robust_under(model, x, y, attack)[0]))
    return {"eps": grid, "accuracy": acc, "attack": f"pgd{budget.steps} step 2.5·ε/{budget.steps}", "n": len(x)}


def run_checks(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, num_classes: int,
               budget: CheckBudget = CheckBudget(), seed: int = 0, square: bool = True,
               sweep_norms: tuple[str, ...] = ()) -> dict:
    """Run every check on ``x`` (float [0, 1]), per peer. Returns ``{"n", "budget", "peers": {peer: [check]},
    "eps_sweep": {peer: {norm: {eps, accuracy}}}, "meaningless": [peers whose robust numbers mean nothing]}``.
    ``sweep_norms``: further norms whose ε sweep (at :data:`~.core.DEFAULT_EPS`) feeds the robustness curves."""
    from .core import DEFAULT_EPS

    dim = x[0].numel()
    out = {"n": len(x), "budget": {"norm": budget.norm, "eps": budget.eps, "steps": budget.steps,
                                   "restarts": budget.restarts}, "peers": {}, "eps_sweep": {}}
    was = {n: m.training for n, m in models.items()}
    white, advs = {}, {}
    try:
        for name, model in models.items():
            model.eval()
            torch.manual_seed(seed)
            checks = [check_eval_mode(model, x), check_logits(model, x), check_deterministic(model, x),
                      check_no_side_effects(model, x), check_input_range(model, x, y),
                      check_degenerate(model, x, y, num_classes), check_zero_gradient(model, x, y)]
            fgsm_spec = AttackSpec(norm=budget.norm, eps=budget.eps, step=budget.eps, steps=1, init="zero")
            fgsm_r, fgsm_x = pgd_best_iterate(model, x, y, fgsm_spec)
            pgd_r, pgd_x = pgd_best_iterate(model, x, y, budget.spec())
            more_r, more_x = pgd_best_iterate(model, x, y, budget.spec(steps=2 * budget.steps))
            rest = EvalAttack("restarts", budget.spec(), restarts=max(budget.restarts - 1, 1))
            rest_r, _ = robust_under(model, x, y, rest)
            noise_x = random_init(x, budget.spec())
            with torch.no_grad():
                noise_r = model(noise_x).argmax(1) == y
            checks += [check_perturbations(x, {"fgsm": fgsm_x, "pgd": pgd_x, "pgd2k": more_x, "noise": noise_x},
                                           budget.norm, budget.eps),
                       check_fgsm_vs_pgd(fgsm_r, pgd_r),
                       check_effort("more_steps", pgd_r, pgd_r & more_r, f"PGD-{2 * budget.steps}"),
                       check_effort("restarts", pgd_r, pgd_r & rest_r, f"{budget.restarts} restarts")]
            sweeps = {budget.norm: _sweep(model, x, y, budget, dim, known={budget.eps: pgd_r})}
            for norm in sweep_norms:
                if norm not in sweeps:
                    sweeps[norm] = _sweep(model, x, y, CheckBudget(norm=norm, eps=DEFAULT_EPS[norm],
                                                                   steps=budget.steps), dim)
            s = sweeps[budget.norm]
            checks.append(check_sweep(s["eps"], s["accuracy"], len(x), num_classes))
            checks.append(check_noise(pgd_r, noise_r))
            white_all = pgd_r & more_r & rest_r     # Square attacks what every white-box attack left
            checks.append(check_square(model, x, y, white_all, budget, seed) if square else
                          check("square", "skipped", None, SQUARE_THRESHOLD, "turned off"))
            out["peers"][name], out["eps_sweep"][name] = checks, sweeps
            white[name], advs[name] = pgd_r, pgd_x
        for target, model in models.items():
            with torch.no_grad():
                transfer = {s: model(advs[s]).argmax(1) == y for s in models if s != target}
            out["peers"][target].insert(-1, check_transfer(white[target], transfer))
    finally:
        for n, m in models.items():
            m.train(was[n])
    out["meaningless"] = [p for p, cs in out["peers"].items()
                          if any(c["name"] == "degenerate" and c["status"] == "fail" for c in cs)]
    return out


def failed(checks: list[dict]) -> list[str]:
    return [c["name"] for c in checks if c["status"] == "fail"]


def summary_line(report: dict) -> str:
    """One console line: per peer, how many checks passed / warned / failed (and which)."""
    parts = []
    for peer, cs in report["peers"].items():
        counts = {s: [c["name"] for c in cs if c["status"] == s] for s in ("pass", "warn", "fail", "skipped")}
        text = f"{peer}: {len(counts['pass'])} pass"
        for s in ("warn", "fail", "skipped"):
            if counts[s]:
                text += f", {len(counts[s])} {s} ({', '.join(counts[s])})"
        parts.append(text)
    return f"checks on {report['n']} images · " + " · ".join(parts)


def warning_for(report: dict | None, peer: str) -> str:
    """The warning printed next to a peer's robust numbers ("" when every check passed)."""
    if not report or peer not in report["peers"]:
        return ""
    bad = failed(report["peers"][peer])
    if peer in report.get("meaningless", []):
        return f"  !! DEGENERATE MODEL: robust accuracy meaningless (failed checks: {', '.join(bad)})"
    return f"  !! CHECKS FAILED: {', '.join(bad)} — do not trust these robust numbers" if bad else ""
