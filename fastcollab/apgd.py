"""APGD-CE and APGD-T of fastcollab's own, batched over a whole cohort (Croce & Hein 2020).

Auto-PGD ("Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020, Algorithm 1) is PGD with momentum and a step size that halves at checkpoints:

* start ``x⁽⁰⁾``: a random point on the sphere of radius eps (l_inf: uniform direction scaled to
  ``‖δ‖_∞ = eps``; l2: Gaussian direction scaled to ``‖δ‖₂ = eps``), clipped to the box [0, 1];
* step ``z = P(x⁽ᵏ⁾ + η⁽ᵏ⁾·s(∇f))`` (``s`` = sign for l_inf, ``∇/‖∇‖₂`` for l2, the fused
  :func:`fastcollab.ops.pgd_step_`), then ``x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α(z − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾))``
  with momentum ``α = 0.75`` (``α = 1`` at the first step), initial step ``η⁽⁰⁾ = 2·eps``;
* checkpoints ``w_j = ⌈p_j·N⌉`` with ``p_0 = 0, p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03,
  0.06)`` (integer rounding of the official code: first gap ``int(0.22 N)``, each next gap
  ``int(0.03 N)`` shorter, never below ``int(0.06 N)``); at a checkpoint the step halves, and the walk
  restarts from the best point seen, when (1) the loss increased in at most ``rho·(w_j − w_{j−1})`` of the
  steps since the last checkpoint (the official code's ``≤``; the paper writes ``<``), or (2) the step was
  not halved at the last checkpoint and the best loss did not improve since then;
* losses: CE, DLR and targeted DLR (paper Sec. 4; formulas as in the official code), see :data:`LOSSES`.

One deliberate difference from the official code (``pyautoattack.autopgd_base``): the count of loss
increases in the first window compares the first step with the loss at ``x⁽⁰⁾`` (the paper's condition);
the official code compares it with an unfilled zero entry. Everything else follows the official code, so
that the same model gives the same per-example outcome (tested against ``pyautoattack`` in
tests/test_apgd.py).

How the cohort runs: the examples still to attack of every model are rows of one pool ``[R, C, H, W]``
(grouped by model); each step runs each model's forward on its rows, one ``autograd.grad`` over the whole
pool, and one update for all rows (per-row step sizes through ``pgd_step_``'s per-peer step with the rows as
"peers"). A row leaves the pool the moment its model misclassifies it (early exit: AutoAttack keeps iterating
on broken points); the remaining rows do not change their trajectories, so the outcome per example is that
of a run on that example alone. Random starts are drawn per model from a generator seeded with
``spec.seed`` for the whole batch, so a model's results do not depend on the other models of the cohort or
on which points were already broken.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import FastcollabError

APGD_NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr", "dlr-targeted")
MOMENTUM = 0.75          # alpha of Algorithm 1 (official code: 0.75, 1.0 at the first step)
INITIAL_STEP = 2.0       # eta^(0) = 2 * eps (Algorithm 1, l_inf and l2)
_DLR_EPS = 1e-12         # the official code's denominator guard

#: attack names that need the DLR loss (>= 3 classes) and targeted DLR / FAB-T (>= 4 classes)
DLR_ATTACKS = frozenset({"dlr", "apgd-dlr"})
TARGETED_ATTACKS = frozenset({"dlr-targeted", "apgd-t", "fab-t", "aa", "aa-lite", "aa-fast"})


def check_aa_applicable(num_classes: int, attacks: Sequence[str]) -> None:
    """Raise one clear :class:`FastcollabError` when an attack of ``attacks`` cannot run on a
    ``num_classes``-class model: DLR needs 3 classes (its denominator uses the third-largest logit),
    targeted DLR 4 (the fourth-largest); AutoAttack's ``checks.check_n_classes`` only warns."""
    names = {a.lower() for a in attacks}
    dlr = sorted(names & (DLR_ATTACKS | TARGETED_ATTACKS))
    targeted = sorted(names & TARGETED_ATTACKS)
    if dlr and num_classes < 3:
        raise FastcollabError(f"{', '.join(dlr)}: the DLR loss needs at least 3 classes but the model has "
                              f"{num_classes}: use apgd-ce or pgdK instead")
    if targeted and num_classes < 4:
        raise FastcollabError(f"{', '.join(targeted)}: the targeted DLR loss needs at least 4 classes but the "
                              f"model has {num_classes}: use apgd-ce (or apgd-dlr with 3 classes) instead")


@dataclass(frozen=True)
class APGDSpec:
    """One APGD attack: ``steps`` iterations per run, ``restarts`` random restarts (per target class for
    ``dlr-targeted``, over the ``n_target_classes`` highest non-true classes of the clean logits), in the
    ``norm`` ball of radius ``eps`` intersected with [0, 1]. AutoAttack's standard version: APGD-CE with
    ``steps=100, restarts=1``; APGD-T with ``loss="dlr-targeted", n_target_classes=9, restarts=1``."""

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 100
    restarts: int = 1
    loss: str = "ce"
    n_target_classes: int = 9
    rho: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.norm == "l1":
            raise FastcollabError("fastcollab's own APGD supports linf and l2; l1-APGD (Croce & Hein 2021) "
                                  "is not implemented: use the attack aa (pip install \"fastcollab[autoattack]\")")
        if self.norm not in APGD_NORMS:
            raise FastcollabError(f"unknown APGD norm {self.norm!r}: use linf or l2")
        if not (self.eps >= 0 and self.eps != float("inf")):
            raise FastcollabError(f"APGD eps must be a finite number >= 0, got {self.eps}: pass e.g. --eps 8/255")
        for name in ("steps", "restarts", "n_target_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise FastcollabError(f"APGD {name} must be a whole number >= 1, got {v!r}")
        if self.loss not in LOSSES:
            raise FastcollabError(f"unknown APGD loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if not 0 < self.rho < 1:
            raise FastcollabError(f"APGD rho must be in (0, 1), got {self.rho} (the paper uses 0.75)")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise FastcollabError(f"APGD seed must be an integer, got {self.seed!r}")

    def checkpoints(self) -> list[int]:
        """Iteration counts after which the step-size conditions are checked (e.g. 22, 41, 57, ... for 100)."""
        gap, shrink, floor = max(int(0.22 * self.steps), 1), max(int(0.03 * self.steps), 1), \
            max(int(0.06 * self.steps), 1)
        marks, at = [], gap
        while at <= self.steps:
            marks.append(at)
            gap = max(gap - shrink, floor)
            at += gap
        return marks

    def describe(self) -> dict:
        """Every hyper-parameter (for the evaluation JSON), the derived ones included."""
        return {"attack": "apgd-t" if self.loss == "dlr-targeted" else f"apgd-{self.loss}",
                "algorithm": "APGD, Croce & Hein 2020 (fastcollab's own)", **asdict(self),
                "n_target_classes": self.n_target_classes if self.loss == "dlr-targeted" else None,
                "momentum": MOMENTUM, "initial_step": INITIAL_STEP * self.eps,
                "checkpoints": self.checkpoints(), "early_exit": True}


# ------------------------------------------------------------------------------------------- losses
def _dlr(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """DLR loss (Croce & Hein 2020, Sec. 4 "An alternative loss"; formula and the 1e-12 guard as in the
    official code): ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)``, ``π`` sorting the logits in decreasing
    order (maximised)."""
    z_sorted = z.sort(dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return -(z_y - other) / (z_sorted[:, -1] - z_sorted[:, -3] + _DLR_EPS)


def _dlr_targeted(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss of AutoAttack's APGD-T (Croce & Hein 2020, Sec. 4; formula as in the official code,
    ``dlr_loss_targeted``): ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2)`` for target class ``t`` (maximised)."""
    z_sorted = z.sort(dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + _DLR_EPS)


def _ce(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy against the true class (APGD-CE, Croce & Hein 2020, Sec. 3; maximised)."""
    return F.cross_entropy(z, y, reduction="none")


_LOSS_FNS = {"ce": _ce, "dlr": _dlr, "dlr-targeted": _dlr_targeted}


# ------------------------------------------------------------------------------------------- the pool
class _Pool:
    """The rows still under attack (grouped by model) and their per-row APGD state."""

    FIELDS = ("x0", "y", "target", "owner", "row", "x_adv", "x_prev", "grad", "x_best", "grad_best",
              "loss_best", "loss_prev", "step", "n_incr", "best_at_check", "reduced_last")

    def __init__(self, **state):
        for k in self.FIELDS:
            setattr(self, k, state.get(k))

    def keep(self, mask: torch.Tensor) -> None:
        for k in self.FIELDS:
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v[mask])

    def counts(self, n_models: int) -> list[int]:
        return torch.bincount(self.owner, minlength=n_models).tolist()

    def __len__(self) -> int:
        return self.x0.shape[0]


def _loss_grad(models: Sequence[nn.Module], counts: list[int], x_adv: torch.Tensor, pool: _Pool, loss_fn):
    """Per-row loss, its input gradient and whether each row is still classified correctly."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        chunks = x_adv.split(counts)
        logits = torch.cat([m(c).float() for m, c in zip(models, chunks) if c.shape[0]])
        per = loss_fn(logits, pool.y, pool.target)
        (grad,) = torch.autograd.grad(per.sum(), x_adv)
    return per.detach(), grad.detach(), logits.detach().argmax(1) == pool.y


def _project_(v: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projection on the ball ∩ box: ``pgd_step_`` with a zero gradient moves nothing and only projects."""
    return ops.pgd_step_(v, torch.zeros_like(v), x0, eps, 1.0, norm)


def _run(models: Sequence[nn.Module], pool: _Pool, spec: APGDSpec, robust_out: torch.Tensor,
         x_out: torch.Tensor) -> None:
    """One APGD run over the pool (Algorithm 1); writes per original row whether it survived and the
    adversarial point (the first misclassified iterate, or the highest-loss point for survivors)."""
    loss_fn = _LOSS_FNS[spec.loss]
    checkpoints = set(spec.checkpoints())
    n_models = len(models)
    counts = pool.counts(n_models)
    loss, pool.grad, ok = _loss_grad(models, counts, pool.x_adv, pool, loss_fn)
    pool.x_best, pool.grad_best, pool.loss_best, pool.loss_prev = pool.x_adv.clone(), pool.grad.clone(), loss, loss
    pool.best_at_check = loss.clone()
    pool.reduced_last = torch.ones_like(ok)
    pool.n_incr = torch.zeros_like(loss)
    pool.step = torch.full_like(loss, INITIAL_STEP * spec.eps)
    pool.x_prev = pool.x_adv.clone()
    last_check = 0

    def retire(ok: torch.Tensor, x_evaluated: torch.Tensor) -> list[int]:
        broken = ~ok
        robust_out[pool.row[broken]] = False
        x_out[pool.row[broken]] = x_evaluated[broken]
        pool.keep(ok)
        return pool.counts(n_models)

    if not bool(ok.all()):
        counts = retire(ok, pool.x_adv)
    view = (-1, 1) + tuple(pool.x0.shape[1:])
    for i in range(spec.steps):
        if len(pool) == 0:
            return
        with torch.no_grad():
            z = pool.x_adv.clone()
            ops.pgd_step_(z.view(view), pool.grad.view(view), pool.x0.view(view), spec.eps, pool.step, spec.norm)
            a = 1.0 if i == 0 else MOMENTUM
            v = pool.x_adv + a * (z - pool.x_adv) + (1 - a) * (pool.x_adv - pool.x_prev)
            pool.x_prev, pool.x_adv = pool.x_adv, _project_(v, pool.x0, spec.eps, spec.norm)
        loss, pool.grad, ok = _loss_grad(models, counts, pool.x_adv, pool, loss_fn)
        x_evaluated = pool.x_adv  # a checkpoint may move x_adv back to x_best below
        with torch.no_grad():
            better = loss > pool.loss_best
            b = better.view(-1, 1, 1, 1)
            pool.x_best = torch.where(b, pool.x_adv, pool.x_best)
            pool.grad_best = torch.where(b, pool.grad, pool.grad_best)
            pool.loss_best = torch.where(better, loss, pool.loss_best)
            pool.n_incr += (loss > pool.loss_prev).to(loss.dtype)
            pool.loss_prev = loss
            if i + 1 in checkpoints:
                window = i + 1 - last_check
                last_check = i + 1
                oscillating = pool.n_incr <= spec.rho * window
                stalled = ~pool.reduced_last & (pool.best_at_check >= pool.loss_best)
                reduce = oscillating | stalled
                rb = reduce.view(-1, 1, 1, 1)
                pool.step = torch.where(reduce, pool.step / 2, pool.step)
                pool.x_adv = torch.where(rb, pool.x_best, pool.x_adv)
                pool.grad = torch.where(rb, pool.grad_best, pool.grad)
                pool.reduced_last, pool.best_at_check = reduce, pool.loss_best.clone()
                pool.n_incr = torch.zeros_like(pool.n_incr)
        if not bool(ok.all()):
            counts = retire(ok, x_evaluated)
    x_out[pool.row] = pool.x_best


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """``x + δ`` with ``δ`` on the sphere of radius eps (as the official code), clipped to [0, 1]."""
    if norm == "linf":
        t = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
        scale = t.flatten(1).abs().amax(1)
    else:
        t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        scale = t.flatten(1).norm(dim=1)
    return (x + eps * t / (scale.view(-1, 1, 1, 1) + 1e-12)).clamp(0, 1)


def _check_inputs(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                  already_broken: Mapping[str, torch.Tensor] | None) -> None:
    if not models:
        raise FastcollabError("apgd_cohort needs at least one model: pass {name: model}")
    training = [n for n, m in models.items() if m.training]
    if training:
        raise FastcollabError(f"APGD needs models in eval mode; {', '.join(training)} is in training mode: "
                              "call model.eval() first (BatchNorm statistics would change during the attack)")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise FastcollabError("APGD images must be a float tensor [B, C, H, W] in [0, 1]: "
                              "convert uint8 images with x.float() / 255")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise FastcollabError(f"APGD images must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]: "
                              "pass un-normalised images (models normalise inside themselves)")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.dtype != torch.long:
        raise FastcollabError(f"APGD labels must be an int64 tensor [B] matching the {x.shape[0]} images: "
                              "pass y.long()")
    for n, b in (already_broken or {}).items():
        if n not in models:
            raise FastcollabError(f"already_broken names {n!r}, which is not a model of the cohort "
                                  f"({', '.join(models)}): use the same names")
        if b.shape != y.shape or b.dtype != torch.bool:
            raise FastcollabError(f"already_broken[{n!r}] must be a bool tensor [B] of {y.shape[0]} flags")


def apgd_cohort(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, spec: APGDSpec, *,
                already_broken: Mapping[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``spec`` on every model of the cohort at once; ``{name: (robust [B] bool, x_adv [B, C, H, W])}``.

    ``robust``: the model classifies the clean image and every evaluated iterate correctly (False for
    points misclassified clean and for points in ``already_broken[name]``, which are not attacked: the
    caller passes the points broken by an earlier attack, as AutoAttack does between its attacks).
    ``x_adv``: the adversarial image for broken points, the highest-loss point of the last run for robust
    points, and ``x`` for points that were not attacked. Models must be in eval mode; images are fp32 in
    [0, 1] on the models' device; labels int64.
    """
    _check_inputs(models, x, y, already_broken)
    names = list(models)
    x = x.detach().float()
    if not len(x):  # an empty shard: nothing to attack
        return {n: (torch.zeros(0, dtype=torch.bool, device=x.device), x.clone()) for n in names}
    with torch.no_grad():
        clean = {n: models[n](x).float() for n in names}
    num_classes = next(iter(clean.values())).shape[1]
    check_aa_applicable(num_classes, [spec.loss])
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise FastcollabError(f"APGD labels must be in 0..{num_classes - 1} (the models have {num_classes} "
                              f"classes), got {int(y.min())}..{int(y.max())}")
    if spec.loss == "dlr-targeted" and spec.n_target_classes > num_classes - 1:
        raise FastcollabError(f"APGD-T with n_target_classes={spec.n_target_classes} needs at least "
                              f"{spec.n_target_classes + 1} classes; the model has {num_classes}: "
                              f"use n_target_classes <= {num_classes - 1}")
    robust = {n: (clean[n].argmax(1) == y) for n in names}
    for n, b in (already_broken or {}).items():
        robust[n] &= ~b.to(y.device)
    x_adv = {n: x.clone() for n in names}
    if spec.eps == 0:
        return {n: (robust[n], x_adv[n]) for n in names}
    gens = {n: torch.Generator(device=x.device).manual_seed(int(spec.seed)) for n in names}
    # targeted: the (t+2)-th largest clean logit, t = 0..n_target_classes-1 (the official code's order)
    ranked = {n: clean[n].argsort(dim=1, descending=True) for n in names}
    targets = list(range(spec.n_target_classes)) if spec.loss == "dlr-targeted" else [None]
    model_list = [models[n] for n in names]
    for t in targets:
        for _ in range(spec.restarts):
            starts = {n: _random_start(x, spec.eps, spec.norm, gens[n]) for n in names}
            idx = {n: robust[n].nonzero().squeeze(1) for n in names}
            if not any(len(i) for i in idx.values()):
                return {n: (robust[n], x_adv[n]) for n in names}
            owner = torch.cat([torch.full_like(idx[n], k) for k, n in enumerate(names)])
            offsets = torch.tensor([0] + [len(y)] * (len(names) - 1), device=y.device).cumsum(0)
            row = torch.cat([idx[n] + offsets[k] for k, n in enumerate(names)])
            pool = _Pool(x0=torch.cat([x[idx[n]] for n in names]), y=torch.cat([y[idx[n]] for n in names]),
                         target=None if t is None else torch.cat([ranked[n][idx[n], t + 1] for n in names]),
                         owner=owner, row=row, x_adv=torch.cat([starts[n][idx[n]] for n in names]))
            robust_flat = torch.cat([robust[n] for n in names])
            x_flat = torch.cat([x_adv[n] for n in names])
            _run(model_list, pool, spec, robust_flat, x_flat)
            for k, n in enumerate(names):
                robust[n] = robust_flat[k * len(y):(k + 1) * len(y)]
                x_adv[n] = x_flat[k * len(y):(k + 1) * len(y)]
    return {n: (robust[n], x_adv[n]) for n in names}


def aa_fast(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *, norm: str = "linf",
            eps: float = 8 / 255, seed: int = 0, steps: int = 100) -> dict[str, torch.Tensor]:
    """AutoAttack's standard APGD pair on the whole cohort: APGD-CE, then APGD-T (9 target classes, or
    every non-true class with fewer than 10 classes) on the points APGD-CE left; ``{name: robust [B]}`` —
    the worst case per example over both attacks (FAB-T and Square of the standard version are left out)."""
    _check_inputs(models, x, y, None)
    with torch.no_grad():
        num_classes = next(iter(models.values()))(x[:1].float()).shape[1]
    check_aa_applicable(num_classes, ["aa-fast"])
    ce = apgd_cohort(models, x, y, APGDSpec(norm=norm, eps=eps, steps=steps, loss="ce", seed=seed))
    spec_t = APGDSpec(norm=norm, eps=eps, steps=steps, loss="dlr-targeted", seed=seed,
                      n_target_classes=min(9, num_classes - 1))
    t = apgd_cohort(models, x, y, spec_t, already_broken={n: ~r for n, (r, _) in ce.items()})
    return {n: r for n, (r, _) in t.items()}
