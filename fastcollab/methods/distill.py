"""Adversarial robustness distillation from a frozen robust teacher T into a student S (DESIGN §2.4):
ARD, RSLAD, IAD and MMARD (shared/papers/mmard_minmax_robustness_distillation.txt).

The teacher is a trained peer of an earlier run, ``--teacher RUN_DIR[:K]`` (see ``fastcollab.teachers``);
it stays in eval mode, is never updated and never saved with the student. The student is peer ``p0`` (so a
distilled run can itself be a teacher, ``RUN_DIR:0``).

KL reductions (``--kl-reduction``): ``batchmean`` sums the KL over the C classes and averages over the
batch (the definition of KL); ``mean`` averages over batch × classes, as ``nn.KLDivLoss()`` does in the
original ARD and RSLAD code. ``batchmean = C · mean``: with C = 10 a ``batchmean`` run has a 10× larger
distillation gradient (equivalent, under SGD without weight decay, to a 10× larger lr on that term).
ARD and RSLAD default to their code's ``mean``; IAD and MMARD to ``batchmean``.
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import ops
from ..errors import FastcollabError
from .base import CLEAN, AttackPlan, LogitTable, LossResult, Method, Peer, StepContext, View, accuracy_of, adv_key
from .registry import register_method

STUDENT, TEACHER = "p0", "teacher"
ADV = adv_key(STUDENT)
KL_REDUCTIONS = ("batchmean", "mean")
GUIDE_GRADS = ("both", "student")
TRIANGLE_REDUCTIONS = ("mean", "sum")

TEACHER_OPTION = {"--teacher": {"dest": "teacher",
                                "help": "ard / rslad / iad / mmard / adt: frozen teacher, RUN_DIR or RUN_DIR:K "
                                        "(peer K of an earlier run)"}}
KL_OPTION = {"--kl-reduction": {"dest": "kl_reduction", "choices": list(KL_REDUCTIONS),
                                "help": "ard / rslad / iad / mmard: batchmean (sum over classes) or mean "
                                        "(over batch×classes, the ARD/RSLAD code; C times smaller)"}}


class Distillation(Method):
    """Shared shape: a trainable student ``p0`` and a frozen ``teacher``."""

    def __init__(self, hp):
        super().__init__(hp)
        if self.hp.get("kl_reduction") not in KL_REDUCTIONS:
            raise FastcollabError(f"--kl-reduction must be batchmean or mean, got {self.hp.get('kl_reduction')!r}")

    def peers(self):
        return [Peer(STUDENT, "student"), Peer(TEACHER, "teacher", trainable=False, source="teacher")]

    def kl(self, student_logits, teacher_logits, T: float = 1.0):
        return ops.kl_div(student_logits, teacher_logits, T=T, reduction=self.hp["kl_reduction"])


_ROBUST_KD = {"teacher": None, "eps": 8 / 255, "step": 2 / 255, "attack_steps": 10, "weight_decay": 2e-4,
              "lr": 0.1}


@register_method
class ARD(Distillation):
    """ARD (Goldblum et al. 2020, their distillation objective as restated in DESIGN §2.4): inner ``max CE(S(x'), y)``; outer

    ``L = α·τ²·KL(sg p_T^τ(x) ‖ p_S^τ(x')) + (1−α)·CE(S(x), y)``, ``p^τ = softmax(z/τ)``, τ = 30, α = 1
    (CIFAR-10), attack with train-mode BN and a uniform start as in the ARD code; 200 epochs, lr 0.1 ×0.1 at
    100 and 150, wd 2e-4. The clean student forward ``S(x)`` runs at every step even when α = 1 (its CE term
    then weighs 0), as the official ARD code does: that train-mode forward is where the student's BatchNorm
    running statistics see clean images, which the evaluation's clean accuracy depends on."""

    name = "ard"
    summary = "adversarially robust distillation (Goldblum et al. 2020), frozen robust teacher"
    defaults = {**_ROBUST_KD, "alpha": 1.0, "temperature": 30.0, "kl_reduction": "mean", "epochs": 200,
                "lr_drops": [100, 150], "attack_init": "uniform", "attack_bn": "train"}
    cli_options = {**TEACHER_OPTION, **KL_OPTION}

    def __init__(self, hp):
        super().__init__(hp)
        if not 0.0 <= self.hp["alpha"] <= 1.0:
            raise FastcollabError(f"ard's --alpha must lie in [0, 1], got {self.hp['alpha']}")
        if not self.hp["temperature"] > 0:
            raise FastcollabError(f"--temperature must be > 0, got {self.hp['temperature']}")

    def attacks(self):
        return [AttackPlan(ADV, STUDENT, self.attack_spec("ce"))]

    def views(self):
        return [View(STUDENT, ADV), View(STUDENT, CLEAN), View(TEACHER, CLEAN, grad=False)]

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        a, tau = self.hp["alpha"], self.hp["temperature"]
        kd = self.kl(table[STUDENT, ADV], table[TEACHER, CLEAN], T=tau) * tau * tau
        ce = F.cross_entropy(table[STUDENT, CLEAN], y)
        return LossResult(a * kd + (1 - a) * ce, {"kd": kd, "ce": ce},
                          {STUDENT: accuracy_of(table[STUDENT, ADV], y)})


@register_method
class RSLAD(Distillation):
    """RSLAD (Zi et al. 2021, the RSLAD objective as restated in DESIGN §2.4): the teacher's soft labels
    replace the hard labels in both steps. Inner ``max KL(sg p_T(x) ‖ p_S(x'))`` (teacher's clean logits computed once per step), start
    ``x + 0.001·N(0,1)``, eval-mode BN; outer

    ``L = 5/6·KL(sg p_T(x) ‖ p_S(x')) + 1/6·KL(sg p_T(x) ‖ p_S(x))``.
    300 epochs, lr 0.1 ×0.1 at 215, 260, 285, wd 2e-4."""

    name = "rslad"
    summary = "robust soft label adversarial distillation (Zi et al. 2021), frozen robust teacher"
    defaults = {**_ROBUST_KD, "rslad_adv_weight": 5 / 6, "kl_reduction": "mean", "epochs": 300,
                "lr_drops": [215, 260, 285], "attack_init": "normal", "attack_bn": "eval"}
    cli_options = {**TEACHER_OPTION, **KL_OPTION,
                   "--rslad-adv-weight": {"dest": "rslad_adv_weight", "type": float,
                                          "help": "rslad: weight of the adversarial KL (5/6); the clean KL gets "
                                                  "1 minus it"}}

    def attacks(self):
        return [AttackPlan(ADV, STUDENT, self.attack_spec("teacher_kl"), guide=TEACHER)]

    def views(self):
        return [View(STUDENT, ADV), View(STUDENT, CLEAN), View(TEACHER, CLEAN, grad=False)]

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        w = self.hp["rslad_adv_weight"]
        t = table[TEACHER, CLEAN]
        kl_adv, kl_nat = self.kl(table[STUDENT, ADV], t), self.kl(table[STUDENT, CLEAN], t)
        return LossResult(w * kl_adv + (1 - w) * kl_nat, {"kl_adv": kl_adv, "kl_nat": kl_nat},
                          {STUDENT: accuracy_of(table[STUDENT, ADV], y)})


IAD_PAPER_EPOCHS = 200


@register_method
class IAD(Distillation):
    """IAD, introspective adversarial distillation (Zhu et al. 2022, the IAD objective as written in
    DESIGN §2.4): inner ``max CE(S(x'), y)`` (ARD's, train-mode BN); outer

    ``L = KL(sg p_T(x) ‖ p_S(x')) + [epoch ≥ e₀]·mean_i (1 − w_i)·KL(p_S(x_i) ‖ p_S(x'_i))``,
    ``w_i = p_T(y_i | x'_i)^β`` (β = 0.1): the student trusts the teacher on x'_i as much as the teacher is
    right there, and introspects on itself for the rest. ``e₀`` (``--iad-start``, 60) is an epoch of the
    paper's 200-epoch schedule and moves with ``--epochs`` like the lr drops (e₀·epochs/200). Before e₀
    the loss is the first term only. Gradient flows into both student terms of the introspection KL."""

    name = "iad"
    summary = "introspective adversarial distillation (Zhu et al. 2022), frozen robust teacher"
    defaults = {**_ROBUST_KD, "iad_beta": 0.1, "iad_start": 60.0, "kl_reduction": "batchmean", "epochs": 200,
                "lr_drops": [100, 150], "attack_init": "uniform", "attack_bn": "train"}
    cli_options = {**TEACHER_OPTION, **KL_OPTION,
                   "--iad-beta": {"dest": "iad_beta", "type": float, "help": "iad: exponent of the teacher's "
                                                                          "confidence w = p_T(y|x')^beta (0.1)"},
                   "--iad-start": {"dest": "iad_start", "type": float,
                                   "help": "iad: epoch (of the paper's 200) where introspection starts (60); "
                                           "scaled to --epochs"}}

    def start_epoch(self, epochs: int) -> float:
        return float(self.hp["iad_start"]) * epochs / IAD_PAPER_EPOCHS

    def attacks(self):
        return [AttackPlan(ADV, STUDENT, self.attack_spec("ce"))]

    def views(self):
        return [View(STUDENT, ADV), View(STUDENT, CLEAN), View(TEACHER, CLEAN, grad=False),
                View(TEACHER, ADV, grad=False)]

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        s_adv, s_nat = table[STUDENT, ADV], table[STUDENT, CLEAN]
        kd = self.kl(s_adv, table[TEACHER, CLEAN])
        terms = {"kd": kd}
        total = kd
        if ctx.epoch >= self.start_epoch(ctx.epochs):
            w = F.softmax(table[TEACHER, ADV].detach(), dim=1).gather(1, y[:, None]).squeeze(1) ** self.hp["iad_beta"]
            per = ops.kl_div(s_adv, s_nat, reduction="none", detach_teacher=False)
            if self.hp["kl_reduction"] == "mean":
                per = per / s_adv.shape[1]
            intro = ((1 - w) * per).mean()
            terms["introspect"] = intro
            total = total + intro
        return LossResult(total, terms, {STUDENT: accuracy_of(s_adv, y)})


@register_method
class MMARD(Distillation):
    """MMARD, min-max robustness distillation (shared/papers/mmard_*): inner Eq. 3,
    ``max KL(p_T(x') ‖ p_S(x'))`` with the teacher evaluated on the **current** x' at every attack step
    (objective ``guide_kl``, eval-mode BN, start ``x + 0.001·N(0,1)``); outer Eq. 7,

    ``L = KL(sg p_T(x') ‖ p_S(x')) + α·L_TRD``, α = 1,
    with L_TRD (Eq. 5–6) the Huber (δ = 1) distance between the teacher's and the student's triangle
    cosines ``ψ = cos∠(M(x) − y, M(x') − y)`` (probabilities and one-hot y; ``--triangle-space logits``),
    via ``ops.triangle_huber``. 300 epochs, cosine lr from 0.1, wd 2e-4, step 2/255, eps 8/255, 10 steps.

    The paper leaves three choices open (no official code was available to us); each is an option:

    - ``--guide-grad both|student`` — the inner gradient: Alg. 1 line 8 is ``∇_{x'} KL(S(x'), T(x'))`` with
      the teacher evaluated on the current x' and no stop-gradient, so ``both`` (default, the literal reading)
      differentiates through T(x') as well; ``student`` treats ``p_T(x')`` as a constant at each step;
    - ``--kl-reduction batchmean|mean`` — Eq. 4's KL as defined (sum over classes, batch average: default)
      or ARD/RSLAD code's ``nn.KLDivLoss()`` average over batch × classes (C times smaller);
    - ``--triangle-reduction mean|sum`` — Eq. 6 writes ``Σ_{x∪x'} l_δ``; the default ``mean`` averages
      over the batch so that α = 1 weighs L_TRD like the batch-averaged KL it is added to (a sum grows with
      the batch size: 128× at batch 128); ``sum`` is the literal formula."""

    name = "mmard"
    summary = "min-max robustness distillation (triangle relation), frozen robust teacher"
    defaults = {**_ROBUST_KD, "alpha": 1.0, "huber_delta": 1.0, "triangle_space": "probs",
                "guide_grad": "both", "triangle_reduction": "mean",
                "kl_reduction": "batchmean", "epochs": 300, "lr_drops": [], "schedule": "cosine",
                "attack_init": "normal", "attack_bn": "eval"}
    cli_options = {**TEACHER_OPTION, **KL_OPTION,
                   "--huber-delta": {"dest": "huber_delta", "type": float, "help": "mmard: Huber δ (1)"},
                   "--triangle-space": {"dest": "triangle_space", "choices": ["probs", "logits"],
                                        "help": "mmard: triangle vertices from probabilities (paper) or logits"},
                   "--guide-grad": {"dest": "guide_grad", "choices": list(GUIDE_GRADS),
                                    "help": "mmard: inner gradient through teacher and student (both, Alg. 1 "
                                            "read literally) or the student only"},
                   "--triangle-reduction": {"dest": "triangle_reduction", "choices": list(TRIANGLE_REDUCTIONS),
                                            "help": "mmard: L_TRD averaged over the batch (mean) or summed "
                                                    "(Eq. 6 literally)"}}

    def __init__(self, hp):
        super().__init__(hp)
        if self.hp["triangle_space"] not in ("probs", "logits"):
            raise FastcollabError(f"--triangle-space must be probs or logits, got {self.hp['triangle_space']!r}")
        if not self.hp["huber_delta"] > 0:
            raise FastcollabError(f"--huber-delta must be > 0, got {self.hp['huber_delta']}")
        if self.hp["guide_grad"] not in GUIDE_GRADS:
            raise FastcollabError(f"--guide-grad must be both or student, got {self.hp['guide_grad']!r}")
        if self.hp["triangle_reduction"] not in TRIANGLE_REDUCTIONS:
            raise FastcollabError(f"--triangle-reduction must be mean or sum, got {self.hp['triangle_reduction']!r}")

    def attacks(self):
        objective = "guide_kl" if self.hp["guide_grad"] == "both" else "guide_kl_sg"
        return [AttackPlan(ADV, STUDENT, self.attack_spec(objective), guide=TEACHER)]

    def views(self):
        return [View(STUDENT, ADV), View(STUDENT, CLEAN), View(TEACHER, CLEAN, grad=False),
                View(TEACHER, ADV, grad=False)]

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        s_adv, s_nat = table[STUDENT, ADV], table[STUDENT, CLEAN]
        t_adv, t_nat = table[TEACHER, ADV], table[TEACHER, CLEAN]
        kd = self.kl(s_adv, t_adv)
        trd = ops.triangle_huber(s_nat, s_adv, t_nat, t_adv, y, delta=self.hp["huber_delta"],
                                 use_probs=self.hp["triangle_space"] == "probs",
                                 reduction=self.hp["triangle_reduction"])
        return LossResult(kd + self.hp["alpha"] * trd, {"kd": kd, "triangle": trd},
                          {STUDENT: accuracy_of(s_adv, y)})
