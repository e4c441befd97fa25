"""MAT-MP: mutual adversarial training against multiple perturbations (shared/papers/mat_*, Sec. 2.2,
Eq. 6–10; DESIGN §2.2).

M specialists ``s1..sM`` — by default l_inf, l2 and l1 with eps 0.03 / 0.5 / 12, 40 / 50 / 50 steps of
0.003 / 0.05 / 0.05 — each attacked in its own norm, and one generalist ``g`` attacked with every norm
(AVG, MAX) or with the MSD attack (MSD). Every attack maximises MART's boosted CE (MAT's attack, Eq. 1).
"""
from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..attacks import NORMS, AttackSpec, msd_spec, parse_number
from ..errors import FastcollabError
from .base import CLEAN, AttackPlan, LogitTable, LossResult, Method, Peer, StepContext, View, accuracy_of, adv_key
from .baselines import mart_schedule
from .registry import register_method

GENERALIST = "g"
STRATEGIES = ("avg", "max", "msd")
PAPER_NORMS = ["linf", "l2", "l1"]
PAPER_EPS = [0.03, 0.5, 12.0]
PAPER_STEPS = [40, 50, 50]
PAPER_STEP_SIZES = [0.003, 0.05, 0.05]
#: the paper's per-norm PGD with "10 random starts" each (MAT Sec. 3.3.1); its non-gradient attacks are not here
MP_FINAL_ATTACKS = "clean,fgsm,linf-pgd50x10,l2-pgd50x10,l1-pgd50x10"


def _list(kind, what):
    def parse(text: str):
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except (ValueError, FastcollabError):
            raise FastcollabError(f"{what} takes a comma list, got {text!r}") from None
    return parse


def _as_list(value: Any, kind, what: str) -> list:
    if isinstance(value, str):
        return _list(kind, what)(value)
    if isinstance(value, (int, float)):
        return [kind(value)]
    return [kind(v) for v in value]


def specialist_name(m: int, norm: str) -> str:
    return f"s{m}-{norm}"


@register_method
class MATMP(Method):
    """MAT-MP, Eq. 6–10. With ``x'^m_m`` specialist m's own attack, ``x'^0_m`` the m-th attack against the
    generalist h0, ``x'^0_msd`` the MSD example of h0, BCE = MART's boosted CE and a = ``--alpha``:

    - specialist m (Eq. 6): ``(1−a)·BCE(f_m(x'^m_m), y) + a/M·Σ_{n≠m} KL(sg p_n(x) ‖ p_m(x'^m_m))``, n over
      the M other networks (the other specialists and the generalist);
    - generalist, ``--strategy avg`` (Eq. 7): ``1/M·Σ_m [(1−a)·BCE(f_0(x'^0_m), y) + a·KL(sg p_m(x) ‖ p_0(x'^0_m))]``;
    - ``max`` (Eq. 8): the bracket for ``k = argmax_m BCE(f_0(x'^0_m), y)`` only, chosen per example;
    - ``msd`` (Eq. 9): the bracket averaged over m with the single MSD example ``x'^0_msd``;
    - total (Eq. 10): the sum over the M + 1 networks.

    Soft labels come from the peers' clean predictions, as in MAT. The l_inf/general ``--eps``,
    ``--step-size`` and ``--attack-steps`` only set the per-epoch PGD-10 monitor; the training attacks are
    ``--specialist-norms/-eps/-steps/-step-sizes`` (lists, one entry per specialist) and ``--msd-steps``.
    ``--attack-objective`` replaces the boosted CE in every training attack (specialists, generalist, MSD).
    The l1 attack is Maini et al.'s steepest ascent (``ops.pgd_step_``), masking coordinates within one
    step of the box edge as their code does.
    """

    name = "mat-mp"
    summary = "mutual adversarial training for multiple perturbations (generalist + l_inf/l2/l1 specialists)"
    defaults = {"strategy": "avg", "alpha": 0.6, "specialist_norms": PAPER_NORMS, "specialist_eps": PAPER_EPS,
                "specialist_steps": PAPER_STEPS, "specialist_step_sizes": PAPER_STEP_SIZES, "msd_steps": 50,
                "eps": 0.03, "step": 0.003, "attack_steps": 40, "attack_init": "uniform", "attack_bn": "eval",
                "final_attacks": MP_FINAL_ATTACKS, **mart_schedule("resnet18")}
    cli_options = {
        "--strategy": {"dest": "strategy", "choices": list(STRATEGIES),
                       "help": "mat-mp: how the generalist uses the attacks: avg (Eq. 7), max (Eq. 8), msd (Eq. 9)"},
        "--specialist-norms": {"dest": "specialist_norms", "type": _list(str, "--specialist-norms"),
                               "help": "mat-mp: one norm per specialist (linf,l2,l1)"},
        "--specialist-eps": {"dest": "specialist_eps", "type": _list(lambda t: parse_number(t, "--specialist-eps"),
                                                                     "--specialist-eps"),
                             "help": "mat-mp: budgets per specialist (0.03,0.5,12)"},
        "--specialist-steps": {"dest": "specialist_steps", "type": _list(int, "--specialist-steps"),
                               "help": "mat-mp: attack steps per specialist (40,50,50)"},
        "--specialist-step-sizes": {"dest": "specialist_step_sizes",
                                    "type": _list(lambda t: parse_number(t, "--specialist-step-sizes"),
                                                  "--specialist-step-sizes"),
                                    "help": "mat-mp: step sizes per specialist (0.003,0.05,0.05)"},
        "--msd-steps": {"dest": "msd_steps", "type": int, "help": "mat-mp: steps of the generalist's MSD attack (50)"},
    }

    @classmethod
    def defaults_for(cls, model, dataset=None):
        return {**cls.defaults, **mart_schedule(model)}

    def __init__(self, hp):
        super().__init__(hp)
        h = self.hp
        if h["strategy"] not in STRATEGIES:
            raise FastcollabError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {h['strategy']!r}")
        if not 0.0 <= h["alpha"] <= 1.0:
            raise FastcollabError(f"mat-mp's --alpha must lie in [0, 1], got {h['alpha']}")
        norms = _as_list(h["specialist_norms"], str, "--specialist-norms")
        eps = _as_list(h["specialist_eps"], float, "--specialist-eps")
        steps = _as_list(h["specialist_steps"], int, "--specialist-steps")
        sizes = _as_list(h["specialist_step_sizes"], float, "--specialist-step-sizes")
        bad = [n for n in norms if n not in NORMS]
        if bad:
            raise FastcollabError(f"--specialist-norms: unknown norm(s) {', '.join(bad)}: use {', '.join(NORMS)}")
        if len(norms) < 2:
            raise FastcollabError("mat-mp needs at least 2 specialists: pass e.g. --specialist-norms linf,l2,l1")
        for what, values in (("--specialist-eps", eps), ("--specialist-steps", steps),
                             ("--specialist-step-sizes", sizes)):
            if len(values) != len(norms):
                raise FastcollabError(f"{what} lists {len(values)} values for {len(norms)} specialists "
                                      f"({','.join(norms)}): give one per specialist")
        if int(h["msd_steps"]) < 1:
            raise FastcollabError(f"--msd-steps must be >= 1, got {h['msd_steps']}")
        init = h["attack_init"]
        objective = h.get("attack_objective") or "bce"  # MAT's boosted CE (Eq. 1) unless overridden
        self.specs = [AttackSpec(norm=n, eps=e, step=s, steps=k, init=init, objective=objective,
                                 bn_mode=h["attack_bn"]) for n, e, k, s in zip(norms, eps, steps, sizes)]
        self.specialists = [specialist_name(m + 1, n) for m, n in enumerate(norms)]
        self.msd = msd_spec(self.specs, int(h["msd_steps"]), objective=objective, bn_mode=h["attack_bn"])

    # --- declarations ----------------------------------------------------------------------------
    def peers(self):
        return [Peer(GENERALIST, "generalist")] + [Peer(s, f"specialist ({spec.norm})")
                                                   for s, spec in zip(self.specialists, self.specs)]

    def _gen_keys(self) -> list[str]:
        if self.hp["strategy"] == "msd":
            return [adv_key(GENERALIST, "msd")]
        return [adv_key(GENERALIST, s) for s in self.specialists]

    def attacks(self):
        plans = [AttackPlan(adv_key(s), s, spec) for s, spec in zip(self.specialists, self.specs)]
        if self.hp["strategy"] == "msd":
            plans.append(AttackPlan(adv_key(GENERALIST, "msd"), GENERALIST, self.msd))
        else:
            plans += [AttackPlan(k, GENERALIST, spec) for k, spec in zip(self._gen_keys(), self.specs)]
        return plans

    def views(self):
        everyone = [GENERALIST] + self.specialists
        v = [View(s, adv_key(s)) for s in self.specialists] + [View(GENERALIST, k) for k in self._gen_keys()]
        return v + [View(n, CLEAN, grad=False) for n in everyone]

    # --- loss ------------------------------------------------------------------------------------
    def loss(self, table: LogitTable, y: torch.Tensor, ctx: StepContext) -> LossResult:
        a, M = self.hp["alpha"], len(self.specialists)
        everyone = [GENERALIST] + self.specialists
        terms, correct, total = {}, {}, 0.0
        for s in self.specialists:                                       # Eq. 6
            z = table[s, adv_key(s)]
            bce = ops.boosted_ce(z, y)
            kd = sum(ops.kl_div(z, table[n, CLEAN]) for n in everyone if n != s)
            total = total + (1 - a) * bce + a / M * kd
            terms[f"{s}/bce"], terms[f"{s}/kd"] = bce, kd
            correct[s] = accuracy_of(z, y)
        g_total, g_terms = self.generalist_loss(table, y)
        terms.update({f"{GENERALIST}/{k}": v for k, v in g_terms.items()})
        correct[GENERALIST] = accuracy_of(table[GENERALIST, self._gen_keys()[0]], y)
        return LossResult(total + g_total, terms, correct)                # Eq. 10

    def generalist_loss(self, table: LogitTable, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        a, strategy = self.hp["alpha"], self.hp["strategy"]
        soft = [table[s, CLEAN] for s in self.specialists]
        if strategy == "msd":                                            # Eq. 9
            z = table[GENERALIST, adv_key(GENERALIST, "msd")]
            bce = ops.boosted_ce(z, y)
            kd = sum(ops.kl_div(z, t) for t in soft) / len(soft)
            return (1 - a) * bce + a * kd, {"bce": bce, "kd": kd}
        # per example and per attack m: BCE(f_0(x'^0_m)) and KL(p_m(x) ‖ p_0(x'^0_m))      [M, B]
        zs = [table[GENERALIST, k] for k in self._gen_keys()]
        bce = torch.stack([ops.boosted_ce(z, y, reduction="none") for z in zs])
        kd = torch.stack([ops.kl_div(z, t, reduction="none") for z, t in zip(zs, soft)])
        if strategy == "avg":                                            # Eq. 7
            bce_t, kd_t = bce.mean(0).mean(), kd.mean(0).mean()
        else:                                                            # Eq. 8, k per example
            k = bce.detach().argmax(0, keepdim=True)
            bce_t, kd_t = bce.gather(0, k).mean(), kd.gather(0, k).mean()
        return (1 - a) * bce_t + a * kd_t, {"bce": bce_t, "kd": kd_t}
