"""ADT / AODT: a natural model's logits guide a robust one (shared/papers/adt_adversarial_distillation_training.txt,
DESIGN §2.5).

``adt``: a frozen natural teacher (``--teacher RUN_DIR[:K]``, e.g. a ``nat`` run) — Eq. 2.
``aodt``: the natural model trains online beside the robust one — Eq. 3, with the ALP (Eq. 4) and
TRADES (Eq. 5) variants. The robust model is peer ``p0``; AODT's natural model is ``p1``.
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import ops
from ..errors import FastcollabError
from .base import CLEAN, AttackPlan, LogitTable, LossResult, Method, Peer, StepContext, View, accuracy_of, adv_key
from .distill import TEACHER_OPTION
from .registry import register_method

ROBUST, NATURAL, TEACHER = "p0", "p1", "teacher"
ADV = adv_key(ROBUST)
VARIANTS = ("plain", "alp", "trades")
ATTACKS = ("ce", "trades")

# the paper's CIFAR-10 recipe (Sec. 4): WRN-34-10, eps 0.031, step 0.007, 10 steps, lr 0.1, 100 epochs,
# ×0.1 at 75 and 90, wd 2e-4
_ADT = {"eps": 0.031, "step": 0.007, "attack_steps": 10, "epochs": 100, "lr": 0.1, "lr_drops": [75, 90],
        "weight_decay": 2e-4, "attack_bn": "eval"}
ATTACK_OPTION = {"--attack": {"dest": "attack", "choices": list(ATTACKS),
                              "help": "aodt: inner objective, ce (CE-PGD, the paper) or trades (TRADES-KL)"}}


@register_method
class ADT(Method):
    """ADT, Eq. 2: ``L = MSE(R(x'), sg N(x))`` on **logits** (mean over batch × classes, ``nn.MSELoss``),
    with N a frozen natural teacher and x' the CE-PGD example of the robust model R."""

    name = "adt"
    summary = "adversarial distillation training: frozen natural teacher, logit MSE"
    defaults = {**_ADT, "teacher": None, "attack_init": "uniform"}
    cli_options = {**TEACHER_OPTION}

    def peers(self):
        return [Peer(ROBUST, "robust"), Peer(TEACHER, "natural teacher", trainable=False, source="teacher")]

    def attacks(self):
        return [AttackPlan(ADV, ROBUST, self.attack_spec("ce"))]

    def views(self):
        return [View(ROBUST, ADV), View(TEACHER, CLEAN, grad=False)]

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        mse = ops.logit_mse(table[ROBUST, ADV], table[TEACHER, CLEAN].detach())
        return LossResult(mse, {"logit_mse": mse}, {ROBUST: accuracy_of(table[ROBUST, ADV], y)})


@register_method
class AODT(Method):
    """AODT, Eq. 3: ``L = MSE(R(x'), N(x)) + β·CE(N(x), y)``, β = 1, N trained online (its logits are not
    detached: the MSE pulls N towards R too). Variants (``--variant``):

    - ``alp`` (Eq. 4 with Eq. 3's first term): ``+ α·MSE(R(x'), R(x))``, α = 1;
    - ``trades`` (Eq. 5 with Eq. 3's first term): ``+ α·KL(p_R(x) ‖ p_R(x'))``, α = 6. The paper writes
      ``D_KL(σ(R(x')) ‖ σ(R(x)))`` in KLDivLoss argument order; we use TRADES' boundary term as TRADES
      defines it (``ops.trades_kl``, gradient into both), as DESIGN §2.5 states.

    ``--alpha`` unset means the variant's default (1 for alp, 6 for trades). Attack: CE-PGD (the paper,
    uniform start) or TRADES-KL (``--attack trades``, start ``x + 0.001·N``)."""

    name = "aodt"
    summary = "adversarial online distillation training: natural peer trained online, logit MSE"
    defaults = {**_ADT, "variant": "plain", "attack": "ce", "alpha": None, "beta": 1.0, "attack_init": "per-attack"}
    cli_options = {"--variant": {"dest": "variant", "choices": list(VARIANTS),
                                 "help": "aodt: plain (Eq. 3), alp (+α·MSE(R(x'),R(x))) or trades (+α·KL)"},
                   **ATTACK_OPTION}

    def __init__(self, hp):
        super().__init__(hp)
        if self.hp["variant"] not in VARIANTS:
            raise FastcollabError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.hp['variant']!r}")
        if self.hp["attack"] not in ATTACKS:
            raise FastcollabError(f"--attack must be ce or trades, got {self.hp['attack']!r}")
        if self.hp["alpha"] is None:
            self.hp["alpha"] = {"plain": 0.0, "alp": 1.0, "trades": 6.0}[self.hp["variant"]]
        if self.hp["alpha"] < 0 or self.hp["beta"] < 0:
            raise FastcollabError("aodt's --alpha and --beta must be >= 0")

    def peers(self):
        return [Peer(ROBUST, "robust"), Peer(NATURAL, "natural")]

    def attacks(self):
        objective = "ce" if self.hp["attack"] == "ce" else "trades_kl"
        init = self.hp["attack_init"]
        if init == "per-attack":
            init = "uniform" if objective == "ce" else "normal"
        return [AttackPlan(ADV, ROBUST, self.attack_spec(objective, init=init))]

    def views(self):
        v = [View(ROBUST, ADV), View(NATURAL, CLEAN)]
        return v + ([View(ROBUST, CLEAN)] if self.hp["variant"] != "plain" else [])

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        r_adv, n_nat = table[ROBUST, ADV], table[NATURAL, CLEAN]
        mse = ops.logit_mse(r_adv, n_nat)
        ce_nat = F.cross_entropy(n_nat, y)
        total = mse + self.hp["beta"] * ce_nat
        terms = {"logit_mse": mse, "nat_ce": ce_nat}
        if self.hp["variant"] == "alp":
            pair = ops.logit_mse(r_adv, table[ROBUST, CLEAN])
            terms["alp_mse"] = pair
            total = total + self.hp["alpha"] * pair
        elif self.hp["variant"] == "trades":
            kl = ops.trades_kl(table[ROBUST, CLEAN], r_adv)
            terms["trades_kl"] = kl
            total = total + self.hp["alpha"] * kl
        return LossResult(total, terms, {ROBUST: accuracy_of(r_adv, y), NATURAL: accuracy_of(n_nat, y)})
