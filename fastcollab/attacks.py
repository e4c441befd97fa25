"""Inner maximisation: PGD in l_inf / l2 / l1 with pluggable objectives, and FGSM (DESIGN §3).

Every attack takes and returns NCHW float images in [0, 1]; models normalise inside themselves. Gradients
are taken with respect to the input only (``torch.autograd.grad(loss, x_adv)``): no parameter gradient is
ever accumulated inside an attack loop. The update and the projection are the fused op
``fastcollab.ops.pgd_step_`` (its plain-torch reference is the semantics).

An attack is described by an :class:`AttackSpec` (norm, eps, step, steps, init, objective, BN mode) and run
against one or more models: the first is the attacked model, the others are *guides* evaluated on the same
``x'`` at every step (MMARD's teacher). Objectives map the logits of those models, the labels and fixed
reference logits computed once before the loop (the clean logits of TRADES-KL, the teacher's clean logits of
RSLAD) to a per-example loss that the attack maximises.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import FastcollabError

NORMS = ("linf", "l2", "l1")
INITS = ("uniform", "normal", "zero")
BN_MODES = ("eval", "train")


def parse_number(text: str | float, what: str) -> float:
    """Read a float or a fraction such as ``8/255`` (how robustness papers write eps)."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise FastcollabError(f"{what} must be a number or a fraction like 8/255, got {text!r}") from None


# ----------------------------------------------------------------------------------------- objectives
def _ce(logits, y, ref):
    return F.cross_entropy(logits["attacked"], y, reduction="none")


def _boosted_ce(logits, y, ref):
    return ops.boosted_ce(logits["attacked"], y, reduction="none")


def _cw_margin(logits, y, ref):
    """Carlini-Wagner margin ``max_{k≠y} z_k − z_y`` on logits (maximised: positive once misclassified)."""
    z = logits["attacked"]
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return other - z_y


def _trades_kl(logits, y, ref):
    """TRADES inner objective (Zhang et al. 2019, Eq. 5): ``KL(sg p(x) ‖ p(x'))`` of the attacked model."""
    return ops.kl_div(logits["attacked"], ref["attacked_clean"], reduction="none")


def _teacher_kl(logits, y, ref):
    """RSLAD inner objective: ``KL(sg p_T(x) ‖ p_S(x'))`` with the teacher's clean logits fixed."""
    return ops.kl_div(logits["attacked"], ref["guide_clean"], reduction="none")


def _guide_kl(logits, y, ref):
    """MMARD inner objective: ``KL(p_T(x') ‖ p_S(x'))``, the teacher evaluated on the current ``x'``."""
    return ops.kl_div(logits["attacked"], logits["guide"], reduction="none", detach_teacher=False)


def _guide_kl_student_grad(logits, y, ref):
    """MMARD inner objective with the teacher's ``p_T(x')`` held constant at each step (``--guide-grad
    student``): the ascent direction comes from the student alone."""
    return ops.kl_div(logits["attacked"], logits["guide"], reduction="none")


Objective = Callable[[Mapping[str, torch.Tensor], torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]

OBJECTIVES: dict[str, Objective] = {
    "ce": _ce,
    "bce": _boosted_ce,
    "cw": _cw_margin,
    "trades_kl": _trades_kl,
    "teacher_kl": _teacher_kl,
    "guide_kl": _guide_kl,
    "guide_kl_sg": _guide_kl_student_grad,
}
# which reference logits (computed once, before the loop, no grad, eval BN) an objective reads
OBJECTIVE_REFS = {"trades_kl": ("attacked_clean",), "teacher_kl": ("guide_clean",)}
# objectives that evaluate the guide model on x' at every step
OBJECTIVES_WITH_GUIDE_IN_LOOP = ("guide_kl", "guide_kl_sg")


@dataclass(frozen=True)
class AttackSpec:
    """One inner maximisation: ``steps`` projected steps of size ``step`` inside the ``norm`` ball of
    radius ``eps`` around ``x`` (intersected with the [0, 1] box), from ``init``, maximising ``objective``
    with the attacked model's BatchNorm in ``bn_mode``."""

    norm: str = "linf"
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    init: str = "uniform"
    objective: str = "ce"
    bn_mode: str = "eval"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise FastcollabError(f"unknown attack norm {self.norm!r}: use one of {', '.join(NORMS)}")
        if not self.eps >= 0:
            raise FastcollabError(f"attack eps must be >= 0, got {self.eps}: pass e.g. --eps 8/255")
        if not self.step > 0:
            raise FastcollabError(f"attack step must be > 0, got {self.step}: pass e.g. --step-size 2/255")
        self._check_loop()

    def _check_loop(self) -> None:
        """Checks of what every attack has besides its budget: steps, init, objective, BN mode."""
        if int(self.steps) != self.steps or self.steps < 0:
            raise FastcollabError(f"attack steps must be a whole number >= 0, got {self.steps}")
        if self.init not in INITS:
            raise FastcollabError(f"unknown attack init {self.init!r}: use one of {', '.join(INITS)}")
        if self.objective not in OBJECTIVES:
            raise FastcollabError(
                f"unknown attack objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.bn_mode not in BN_MODES:
            raise FastcollabError(f"unknown attack BN mode {self.bn_mode!r}: use eval or train")

    def with_(self, **changes) -> "AttackSpec":
        return replace(self, **changes)

    def describe(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "step": self.step, "steps": self.steps,
                "init": self.init, "objective": self.objective, "bn_mode": self.bn_mode}


# ------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def bn_mode(models: Sequence[nn.Module], modes: Sequence[str]):
    """Put each model in train or eval mode for the duration, restoring what it was."""
    was = [m.training for m in models]
    try:
        for m, mode in zip(models, modes):
            m.train(mode == "train")
        yield
    finally:
        for m, training in zip(models, was):
            m.train(training)


def _per_example_norm(t: torch.Tensor, p: int) -> torch.Tensor:
    flat = t.flatten(1)
    n = flat.abs().sum(1) if p == 1 else flat.norm(dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


def random_init(x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """The starting point ``x + δ₀`` clipped to [0, 1]: uniform in the ball, ``0.001·N(0, 1)``, or ``x``."""
    if spec.init == "zero" or spec.eps == 0:
        return x.clone()
    if spec.init == "normal":
        return (x + 0.001 * torch.randn_like(x)).clamp_(0, 1)
    if spec.norm == "linf":
        delta = torch.empty_like(x).uniform_(-spec.eps, spec.eps)
    else:
        # a random direction (Gaussian for l2, Laplace for l1) scaled to a radius drawn uniformly in [0, eps];
        # Laplace(0, 1) = Exp(1) - Exp(1), drawn on x's device by torch's generator (CUDA-graph safe, no copy)
        p = 2 if spec.norm == "l2" else 1
        direction = (torch.randn_like(x) if p == 2
                     else torch.empty_like(x).exponential_() - torch.empty_like(x).exponential_())
        direction = direction / (_per_example_norm(direction, p) + 1e-12)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) * spec.eps
        delta = direction * radius
    return (x + delta).clamp_(0, 1)


def _float_logits(models: Mapping[str, nn.Module], x_adv, autocast) -> dict[str, torch.Tensor]:
    with autocast():
        return {name: m(x_adv).float() for name, m in models.items()}


def _loop_setup(spec: AttackSpec, model: nn.Module, guide: nn.Module | None):
    """The objective, the models evaluated on ``x'`` at every step, and their BN modes."""
    needs_guide = spec.objective in OBJECTIVES_WITH_GUIDE_IN_LOOP
    if needs_guide and guide is None:
        raise FastcollabError(f"attack objective {spec.objective!r} needs a guide (teacher) model")
    models = {"attacked": model, **({"guide": guide} if needs_guide else {})}
    return OBJECTIVES[spec.objective], models, [spec.bn_mode] + ["eval"] * (len(models) - 1)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
        guide: nn.Module | None = None, ref: Mapping[str, torch.Tensor] | None = None,
        autocast=contextlib.nullcontext) -> torch.Tensor:
    """Projected gradient ascent on ``spec.objective`` (Madry et al. 2018; l1 steepest ascent of Maini et
    al. 2020), returning ``x'`` (detached). ``guide`` is a second, frozen model that objectives such as
    ``guide_kl`` evaluate on ``x'`` at every step; ``ref`` holds reference logits computed once."""
    objective, models, modes = _loop_setup(spec, model, guide)
    ref = dict(ref or {})
    x = x.detach()
    x_adv = random_init(x, spec)
    with bn_mode(list(models.values()), modes):
        for _ in range(spec.steps):
            x_adv.requires_grad_(True)
            loss = objective(_float_logits(models, x_adv, autocast), y, ref).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            ops.pgd_step_(x_adv, grad, x, spec.eps, spec.step, spec.norm)
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, *,
         autocast=contextlib.nullcontext) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one l_inf step of size eps from x."""
    return pgd(model, x, y, AttackSpec(eps=eps, step=max(eps, 1e-12), steps=1, init="zero"),
               autocast=autocast)


# ------------------------------------------------------------------------------ MSD (multiple norms)
@dataclass(frozen=True)
class MSDSpec(AttackSpec):
    """Multi steepest descent (Maini, Wong & Kolter 2020, Algorithm 2): ``steps`` iterations; at each one
    the l_inf, l2 and l1 candidate steps of ``components`` (each with its own eps and step size) are taken
    from the current point, and per example the candidate with the highest loss is kept; the best ``x'``
    seen over the iterations is returned. ``norm`` is ``"msd"``; ``eps``/``step`` are unused (the
    components carry theirs); ``init`` is the start of the walk (MSD starts at ``x``: ``zero``)."""

    norm: str = "msd"
    eps: float = 0.0
    step: float = 1.0
    init: str = "zero"
    components: tuple = ()

    def __post_init__(self):
        if self.norm != "msd":
            raise FastcollabError(f"an MSD spec has norm 'msd', got {self.norm!r}")
        if not self.components:
            raise FastcollabError("an MSD attack needs component specs (one per norm), e.g. linf, l2, l1")
        for c in self.components:
            if not isinstance(c, AttackSpec) or isinstance(c, MSDSpec):
                raise FastcollabError(f"MSD components must be single-norm AttackSpecs, got {c!r}")
        self._check_loop()

    def describe(self) -> dict:
        return {"norm": "msd", "steps": self.steps, "init": self.init, "objective": self.objective,
                "bn_mode": self.bn_mode,
                "components": [{k: v for k, v in c.describe().items() if k in ("norm", "eps", "step")}
                               for c in self.components]}


def msd_spec(components: Sequence[AttackSpec], steps: int, objective: str = "ce", bn_mode: str = "eval",
             init: str = "zero") -> MSDSpec:
    return MSDSpec(steps=steps, objective=objective, bn_mode=bn_mode, init=init, components=tuple(components))


def _msd_init(x: torch.Tensor, spec: MSDSpec) -> torch.Tensor:
    if spec.init == "uniform":
        # a random start inside the first (l_inf, by default) component's ball
        return random_init(x, spec.components[0].with_(init="uniform"))
    return random_init(x, spec.components[0].with_(init=spec.init))


def msd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: MSDSpec, *,
        guide: nn.Module | None = None, ref: Mapping[str, torch.Tensor] | None = None,
        autocast=contextlib.nullcontext) -> torch.Tensor:
    """MSD attack (Maini et al. 2020): per step, one gradient at the current ``x'``, one candidate step per
    component norm (``ops.pgd_step_`` with that norm's eps and step, projected on that norm's ball around
    ``x``), then, per example, the candidate of highest objective becomes the new ``x'``; returns the
    ``x'`` of highest objective seen (the start included). Cost per step: one forward-backward plus one
    no-grad forward per component."""
    objective, models, modes = _loop_setup(spec, model, guide)
    ref = dict(ref or {})
    x = x.detach()
    x_adv = _msd_init(x, spec)
    view = (-1,) + (1,) * (x.dim() - 1)
    with bn_mode(list(models.values()), modes):
        best, best_loss = x_adv.clone(), None
        for _ in range(spec.steps):
            x_adv.requires_grad_(True)
            per = objective(_float_logits(models, x_adv, autocast), y, ref)
            (grad,) = torch.autograd.grad(per.sum(), x_adv)
            x_adv = x_adv.detach()
            if best_loss is None:
                best_loss = per.detach().clone()
            cand_x, cand_loss = [], []
            for c in spec.components:
                cand = x_adv.clone()
                ops.pgd_step_(cand, grad, x, c.eps, c.step, c.norm)
                with torch.no_grad():
                    cand_loss.append(objective(_float_logits(models, cand, autocast), y, ref).detach())
                cand_x.append(cand)
            losses = torch.stack(cand_loss)                       # [K, B]
            pick = losses.argmax(0)                               # [B]
            stacked = torch.stack(cand_x)                         # [K, B, C, H, W]
            x_adv = stacked[pick, torch.arange(x.shape[0], device=x.device)]
            new_loss = losses.gather(0, pick[None]).squeeze(0)
            better = new_loss > best_loss
            best = torch.where(better.view(view), x_adv, best)
            best_loss = torch.where(better, new_loss, best_loss)
    return best.detach()


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
               guide: nn.Module | None = None, ref: Mapping[str, torch.Tensor] | None = None,
               autocast=contextlib.nullcontext) -> torch.Tensor:
    """Run ``spec``: MSD for an :class:`MSDSpec` (``norm == "msd"``), PGD in its norm otherwise."""
    attack = msd if isinstance(spec, MSDSpec) else pgd
    return attack(model, x, y, spec, guide=guide, ref=ref, autocast=autocast)
