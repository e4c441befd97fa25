"""The eager engine: runs one cohort step on any device; the semantics reference for every faster engine.

From a method's declaration it plans, once:
- the clean no-grad (eval-BN) logits that attack objectives read (TRADES-KL's ``p(x)``, RSLAD's ``p_T(x)``)
  — computed once per step before the attack loops, and reused by no-grad clean views;
- the no-grad views of each model batched into **one** eval forward over the concatenated inputs;
- the views with gradient, one train-mode forward each (as the papers' code does: concatenating them would
  change BatchNorm's batch statistics).
Then: attacks (input gradients only), views, the method's loss, one backward, every trainable peer's
optimizer steps.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..attacks import OBJECTIVE_REFS, bn_mode, run_attack
from ..cohort import Cohort
from ..errors import FastcollabError
from ..methods import CLEAN, AttackPlan, LogitTable, LossResult, StepContext, View
from .precision import Precision

VIEW_BN_MODES = ("eval", "train")


@dataclass
class StepPlan:
    attacks: list[AttackPlan]
    clean_refs: list[str]                     # models whose clean no-grad logits are computed up front
    nograd_batched: dict[str, list[str]]      # model -> inputs evaluated together, no grad, eval BN
    nograd_single: list[View]                 # no-grad views run one by one (train-mode BN for peer views)
    grad_views: list[View] = field(default_factory=list)


def plan_step(cohort: Cohort, view_bn: str = "eval") -> StepPlan:
    """Turn the method's declarations into an execution plan, checking that they are consistent."""
    if view_bn not in VIEW_BN_MODES:
        raise FastcollabError(f"unknown --view-bn {view_bn!r}: use eval or train")
    method, models = cohort.method, cohort.models
    attacks = method.attacks()
    keys = {CLEAN} | {a.key for a in attacks}
    for a in attacks:
        for name in (a.peer, a.guide):
            if name is not None and name not in models:
                raise FastcollabError(f"method {method.name} attacks with model {name!r}, which the cohort lacks")
    views = list(dict.fromkeys(method.views()))
    for v in views:
        if v.model not in models or v.input not in keys:
            raise FastcollabError(f"method {method.name} declares view {v}, which names an unknown model or input")
        if v.grad and v.model not in cohort.optimizers:
            raise FastcollabError(f"method {method.name} asks for gradients through frozen model {v.model!r}")
    # a view with grad already provides the no-grad one
    grad_views = [v for v in views if v.grad]
    with_grad = {(v.model, v.input) for v in grad_views}
    nograd = [v for v in views if not v.grad and (v.model, v.input) not in with_grad]

    clean_refs = []
    for a in attacks:
        for ref in OBJECTIVE_REFS.get(a.spec.objective, ()):
            clean_refs.append(a.peer if ref == "attacked_clean" else a.guide)
    batched, single = defaultdict(list), []
    for v in nograd:
        frozen = v.model not in cohort.optimizers
        if frozen or view_bn == "eval":
            if v.input == CLEAN:
                clean_refs.append(v.model)
            else:
                batched[v.model].append(v.input)
        else:
            single.append(v)
    return StepPlan(attacks, list(dict.fromkeys(clean_refs)), dict(batched), single, grad_views)


class EagerEngine:
    """Executes :class:`StepPlan`s with plain PyTorch calls, peers one after another."""

    name = "eager"

    def __init__(self, cohort: Cohort, precision: Precision, view_bn: str = "eval"):
        self.cohort, self.precision, self.view_bn = cohort, precision, view_bn
        self.plan = plan_step(cohort, view_bn)

    def _forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            return self.cohort.models[name](x).float()

    def _nograd(self, name: str, inputs: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
        model = self.cohort.models[name]
        with torch.no_grad(), bn_mode([model], [mode]):
            out = self._forward(name, torch.cat(inputs) if len(inputs) > 1 else inputs[0])
        return list(out.split([t.shape[0] for t in inputs]))

    # hooks: faster engines change where, and on which copy of a model, attacks run, never what they compute
    def _attack_model(self, name: str | None, mode: str):
        """The module an attack evaluates for model ``name`` with BatchNorm in ``mode`` (None for no model)."""
        return self.cohort.models.get(name) if name is not None else None

    def _attack(self, a: AttackPlan, x: torch.Tensor, y: torch.Tensor,
                clean: dict[str, torch.Tensor]) -> torch.Tensor:
        """Craft the adversarial input of one attack plan (input gradients only)."""
        ref = {"attacked_clean": clean.get(a.peer), "guide_clean": clean.get(a.guide)}
        return run_attack(self._attack_model(a.peer, a.spec.bn_mode), x, y, a.spec,
                          guide=self._attack_model(a.guide, "eval"),
                          ref={k: v for k, v in ref.items() if v is not None}, autocast=self.precision.autocast)

    def _attacks(self, x: torch.Tensor, y: torch.Tensor,
                 clean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every attack plan, one after another: ``{input key: x'}``."""
        return {a.key: self._attack(a, x, y, clean) for a in self.plan.attacks}

    def compute_table(self, x: torch.Tensor, y: torch.Tensor) -> LogitTable:
        """Attacks and views of one step (no parameter update)."""
        plan = self.plan
        clean = {m: self._nograd(m, [x], "eval")[0] for m in plan.clean_refs}
        inputs = {CLEAN: x, **self._attacks(x, y, clean)}
        table = {(m, CLEAN): logits for m, logits in clean.items()}
        for m, keys in plan.nograd_batched.items():
            table.update(zip(((m, k) for k in keys), self._nograd(m, [inputs[k] for k in keys], "eval")))
        for v in plan.nograd_single:
            table[v.model, v.input] = self._nograd(v.model, [inputs[v.input]], self.view_bn)[0]
        for v in plan.grad_views:
            table[v.model, v.input] = self._forward(v.model, inputs[v.input])
        return LogitTable(table)

    def step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossResult:
        cohort = self.cohort
        cohort.train_mode()
        table = self.compute_table(x, y)
        result = cohort.method.loss(table, y, ctx)
        for opt in cohort.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.precision.backward_and_step(result.total, cohort.optimizers.values())
        return result
