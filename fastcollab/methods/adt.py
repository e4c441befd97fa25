"""ADT / AODT: a natural model's logits guide a robust one (shared/papers/adt_adversarial_distillation_training.txt,
DESIGN §2.5).

``adt``: a frozen natural teacher (``--teacher RUN_DIR[:K]``, e.g. a ``nat`` run) — Eq. 2.
``aodt``: the natural model trains online beside the robust one — Eq. 3.
Both take the paper's ALP (Eq. 4) and TRADES (Eq. 5) variants (``--variant``; Sec. 3.3: "our AODT method can
also be combined with both ALP and TRADES by replacing the first loss item in Eq. (4) and Eq. (5) with
Eq. (3)"). The robust model is peer ``p0``; AODT's natural model is ``p1``.
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
# α per variant when --alpha is not given: Sec. 4.2, "for ALP ... α = 1 following [10]. For the TRADES
# method, we adopt α = 6"; the paper's best clean models are the TRADES variants at α = 0 (--alpha 0)
VARIANT_ALPHA = {"plain": 0.0, "alp": 1.0, "trades": 6.0}
# the attack per variant when --attack is not given: the TRADES variants craft x' with TRADES' KL attack
# (Sec. 3.3 plugs ADT/AODT into TRADES, whose inner problem is the KL; LBGAT's code, lbgat.py, does so)
VARIANT_ATTACK = {"plain": "ce", "alp": "ce", "trades": "trades"}

# the paper's CIFAR-10 recipe (Sec. 4): WRN-34-10, eps 0.031, step 0.007, 10 steps, lr 0.1, 100 epochs,
# ×0.1 at 75 and 90, wd 2e-4
_ADT = {"eps": 0.031, "step": 0.007, "attack_steps": 10, "epochs": 100, "lr": 0.1, "lr_drops": [75, 90],
        "weight_decay": 2e-4, "attack_bn": "eval", "attack_init": "per-attack", "variant": "plain",
        "attack": "per-variant", "alpha": None}
VARIANT_OPTIONS = {
    "--variant": {"dest": "variant", "choices": list(VARIANTS),
                  "help": "adt / aodt: plain (Eq. 2 / 3), alp (+α·MSE(R(x'),R(x)), Eq. 4) or trades "
                          "(+α·KL(p_R(x) ‖ p_R(x')), Eq. 5)"},
    "--attack": {"dest": "attack", "choices": list(ATTACKS),
                 "help": "adt / aodt: inner objective, ce (CE-PGD) or trades (TRADES-KL); default: trades "
                         "for --variant trades, ce otherwise"},
}


class _Variants(Method):
    """What ADT and AODT share: the robust peer's attack and the ALP / TRADES term of Eq. 4 / 5.

    ``alp``: ``+ α·MSE(R(x'), R(x))`` (Eq. 4, α = 1); ``trades``: ``+ α·KL(p_R(x) ‖ p_R(x'))`` (Eq. 5,
    α = 6). The paper writes ``D_KL(σ(R(x')) ‖ σ(R(x)))`` in KLDivLoss argument order; we use TRADES'
    boundary term as TRADES defines it (``ops.trades_kl``, gradient into both, as LBGAT's code does), as
    DESIGN §2.5 states. Attack: CE-PGD from a uniform start, or TRADES-KL from ``x + 0.001·N``."""

    def __init__(self, hp):
        super().__init__(hp)
        h = self.hp
        if h["variant"] not in VARIANTS:
            raise FastcollabError(f"--variant must be one of {', '.join(VARIANTS)}, got {h['variant']!r}")
        if h["attack"] == "per-variant":
            h["attack"] = VARIANT_ATTACK[h["variant"]]
        if h["attack"] not in ATTACKS:
            raise FastcollabError(f"--attack must be ce or trades, got {h['attack']!r}")
        if h["alpha"] is None:
            h["alpha"] = VARIANT_ALPHA[h["variant"]]
        if h["alpha"] < 0:
            raise FastcollabError(f"{self.name}'s --alpha must be >= 0, got {h['alpha']}")

    def attacks(self):
        objective = "ce" if self.hp["attack"] == "ce" else "trades_kl"
        init = self.hp["attack_init"]
        if init == "per-attack":
            init = "uniform" if objective == "ce" else "normal"
        return [AttackPlan(ADV, ROBUST, self.attack_spec(objective, init=init))]

    def variant_views(self) -> list[View]:
        return [View(ROBUST, CLEAN)] if self.hp["variant"] != "plain" else []

    def variant_term(self, table: LogitTable, terms: dict):
        """α times the variant's term (0 for ``plain``), its value logged into ``terms``."""
        r_adv = table[ROBUST, ADV]
        if self.hp["variant"] == "alp":
            terms["alp_mse"] = ops.logit_mse(r_adv, table[ROBUST, CLEAN])
            return self.hp["alpha"] * terms["alp_mse"]
        if self.hp["variant"] == "trades":
            terms["trades_kl"] = ops.trades_kl(table[ROBUST, CLEAN], r_adv)
            return self.hp["alpha"] * terms["trades_kl"]
        return 0.0


@register_method
class ADT(_Variants):
    """ADT, Eq. 2: ``L = MSE(R(x'), sg N(x)) + [variant term]`` on **logits** (mean over batch × classes,
    ``nn.MSELoss``), with N a frozen natural teacher and x' the robust model's example (see
    :class:`_Variants`). ``--variant trades --alpha 0`` is the paper's best clean model, ADT+TRADES(α = 0)
    (Table 3): TRADES' KL attack, the MSE to the teacher alone as the loss."""

    name = "adt"
    summary = "adversarial distillation training: frozen natural teacher, logit MSE"
    defaults = {**_ADT, "teacher": None}
    cli_options = {**VARIANT_OPTIONS, **TEACHER_OPTION}

    def peers(self):
        return [Peer(ROBUST, "robust"), Peer(TEACHER, "natural teacher", trainable=False, source="teacher")]

    def views(self):
        return [View(ROBUST, ADV), View(TEACHER, CLEAN, grad=False)] + self.variant_views()

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        mse = ops.logit_mse(table[ROBUST, ADV], table[TEACHER, CLEAN].detach())
        terms = {"logit_mse": mse}
        total = mse + self.variant_term(table, terms)
        return LossResult(total, terms, {ROBUST: accuracy_of(table[ROBUST, ADV], y)})


@register_method
class AODT(_Variants):
    """AODT, Eq. 3: ``L = MSE(R(x'), N(x)) + β·CE(N(x), y) + [variant term]``, β = 1, N trained online
    (its logits are not detached: the MSE pulls N towards R too, as LBGAT's code does). Variants and
    attack: :class:`_Variants`; ``--variant trades`` (TRADES-KL attack) at ``--alpha 0`` / ``6`` are the
    paper's AODT+TRADES rows.

    Learning rate: the first epoch runs at 0.2 × lr (0.02 at the paper's 0.1; ``--lr-warmup-epochs`` /
    ``--lr-warmup-factor``), as LBGAT's training script does (``if epoch == 1: lr = 0.02``): at lr 0.1 from
    the first step the unnormalised logit MSE between two random networks diverges (NaN). The schedule
    executes it (``fastcollab.schedule.LRSchedule``)."""

    name = "aodt"
    summary = "adversarial online distillation training: natural peer trained online, logit MSE"
    defaults = {**_ADT, "beta": 1.0, "lr_warmup_epochs": 1.0, "lr_warmup_factor": 0.2}
    cli_options = {**VARIANT_OPTIONS,
                   "--lr-warmup-epochs": {"dest": "lr_warmup_epochs", "type": float,
                                          "help": "aodt: epochs at the warm-up lr before the schedule (1; 0 = off)"},
                   "--lr-warmup-factor": {"dest": "lr_warmup_factor", "type": float,
                                          "help": "aodt: warm-up lr as a fraction of --lr (0.2: 0.02 at lr 0.1)"}}

    def __init__(self, hp):
        super().__init__(hp)
        if self.hp["beta"] < 0:
            raise FastcollabError(f"aodt's --beta must be >= 0, got {self.hp['beta']}")

    def peers(self):
        return [Peer(ROBUST, "robust"), Peer(NATURAL, "natural")]

    def views(self):
        return [View(ROBUST, ADV), View(NATURAL, CLEAN)] + self.variant_views()

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        r_adv, n_nat = table[ROBUST, ADV], table[NATURAL, CLEAN]
        mse = ops.logit_mse(r_adv, n_nat)
        ce_nat = F.cross_entropy(n_nat, y)
        terms = {"logit_mse": mse, "nat_ce": ce_nat}
        total = mse + self.hp["beta"] * ce_nat + self.variant_term(table, terms)
        return LossResult(total, terms, {ROBUST: accuracy_of(r_adv, y), NATURAL: accuracy_of(n_nat, y)})
