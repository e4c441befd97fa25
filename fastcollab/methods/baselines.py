"""Single-model baselines (DESIGN §2.1): natural training, PGD-AT, TRADES, MART, ALP.

Each is written as a *recipe* for one peer — its attack objective and init, the views it reads and its
loss — so that CAT can give every peer of a cohort a different recipe. The single-peer methods below are
one recipe applied to peer ``p0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import ops
from .base import CLEAN, AttackPlan, LogitTable, LossResult, Method, Peer, StepContext, View, accuracy_of, adv_key
from .registry import register_method

LossFn = Callable[[LogitTable, str, str, torch.Tensor, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _nat_loss(t: LogitTable, peer: str, key: str, y, hp):
    """Natural training: ``CE(f(x), y)``."""
    ce = F.cross_entropy(t[peer, CLEAN], y)
    return ce, {"ce": ce}


def _at_loss(t: LogitTable, peer: str, key: str, y, hp):
    """PGD adversarial training (Madry et al. 2018, Eq. 2.1): ``CE(f(x'), y)``."""
    ce = F.cross_entropy(t[peer, key], y)
    return ce, {"ce_adv": ce}


def _trades_loss(t: LogitTable, peer: str, key: str, y, hp):
    """TRADES (Zhang et al. 2019, Eq. 5; CAT paper Eq. 3): ``CE(f(x), y) + β·KL(p(x) ‖ p(x'))``,
    KL averaged over the batch, gradient into both the clean and the adversarial logits."""
    ce = F.cross_entropy(t[peer, CLEAN], y)
    kl = ops.trades_kl(t[peer, CLEAN], t[peer, key])
    return ce + hp["beta"] * kl, {"ce": ce, "kl": kl}


def _mart_loss(t: LogitTable, peer: str, key: str, y, hp):
    """MART (Wang et al. 2020, Eq. 8): ``BCE(f(x'), y) + β·mean_i[KL(p(x_i) ‖ p(x'_i))·(1 − p_y(x_i))]``."""
    total = ops.mart_loss(t[peer, CLEAN], t[peer, key], y, beta=hp["beta"])
    return total, {"mart": total}


def _alp_loss(t: LogitTable, peer: str, key: str, y, hp):
    """Adversarial logit pairing (Kannan et al. 2018; CAT's ALP base):
    ``0.5·[CE(f(x'), y) + CE(f(x), y)] + λ·MSE(f(x'), f(x))``."""
    ce_adv = F.cross_entropy(t[peer, key], y)
    ce = F.cross_entropy(t[peer, CLEAN], y)
    mse = ops.logit_mse(t[peer, key], t[peer, CLEAN])
    return 0.5 * (ce_adv + ce) + hp["alp_lambda"] * mse, {"ce_adv": ce_adv, "ce": ce, "logit_mse": mse}


@dataclass(frozen=True)
class Recipe:
    """One peer's base method: how it attacks itself, what it reads, its loss."""

    name: str
    objective: str | None          # None: no attack (natural training)
    init: str
    bn_mode: str
    reads_clean: bool              # the loss reads f(x) with gradient
    reads_adv: bool                # the loss reads f(x') with gradient
    loss: LossFn
    # the input on which the peer's training accuracy is logged
    train_input: str = "adv"

    def views(self, peer: str, key: str) -> list[View]:
        return ([View(peer, CLEAN)] if self.reads_clean else []) + ([View(peer, key)] if self.reads_adv else [])


RECIPES: dict[str, Recipe] = {
    "nat": Recipe("nat", None, "zero", "eval", True, False, _nat_loss, train_input=CLEAN),
    "at": Recipe("at", "ce", "uniform", "train", False, True, _at_loss),
    "trades": Recipe("trades", "trades_kl", "normal", "eval", True, True, _trades_loss),
    "mart": Recipe("mart", "ce", "normal", "eval", True, True, _mart_loss),
    # ALP crafts x' with eval-mode BN, as the official ALP code and CAT's ALP peer (train_cat.py --BNeval) do
    "alp": Recipe("alp", "ce", "uniform", "eval", True, True, _alp_loss),
}

# shared schedule/optimizer defaults (CIFAR-10, l_inf): DESIGN §2.1
_MADRY = {"epochs": 200, "lr": 0.1, "lr_drops": [100, 150], "weight_decay": 5e-4,
          "eps": 8 / 255, "step": 2 / 255, "attack_steps": 10}
_TRADES = {"epochs": 100, "lr": 0.1, "lr_drops": [75, 90], "weight_decay": 2e-4,
           "eps": 0.031, "step": 0.007, "attack_steps": 10, "beta": 6.0}
# the official TRADES script (train_trades_cifar10.py) runs 76 epochs: ×0.1 from its 1-based epoch 75 (our
# 0-based 74), so its drops at 90/100 never happen — an implicit early stop two epochs after the first drop
_TRADES_CODE = {**_TRADES, "epochs": 76, "lr_drops": [74]}
# the official MART WRN-34-10 script (train_wideresnet.py): 90 epochs, lr 0.1, wd 7e-4, ×0.1 from 1-based
# epochs 75 and 90 (0-based 74 and 89), β = 6
_MART_WRN = {"epochs": 90, "lr": 0.1, "lr_drops": [74, 89], "weight_decay": 7e-4, "beta": 6.0}


def is_wide(model: str) -> bool:
    return model.startswith("wrn")


def mart_schedule(model: str) -> dict[str, Any]:
    """MART's (and MAT's) optimiser: ResNet-18 and smaller lr 0.01, wd 3.5e-3; WRN lr 0.1, wd 7e-4;
    120 epochs with ×0.1 at 75, 90 and 100."""
    wide = is_wide(model)
    return {"epochs": 120, "lr": 0.1 if wide else 0.01, "lr_drops": [75, 90, 100],
            "weight_decay": 7e-4 if wide else 3.5e-3}


class SinglePeerMethod(Method):
    """A baseline: one trainable peer ``p0`` trained with one recipe."""

    recipe: Recipe

    def peers(self):
        return [Peer("p0", "student")]

    def attacks(self):
        r = self.recipe
        if r.objective is None:
            return []
        spec = self.attack_spec(r.objective)
        return [AttackPlan(adv_key("p0"), "p0", spec)]

    def views(self):
        return self.recipe.views("p0", adv_key("p0"))

    def loss(self, table: LogitTable, y, ctx: StepContext) -> LossResult:
        r = self.recipe
        total, terms = r.loss(table, "p0", adv_key("p0"), y, self.hp)
        shown = CLEAN if r.train_input == CLEAN else adv_key("p0")
        return LossResult(total, terms, {"p0": accuracy_of(table["p0", shown], y)})


BETA_OPTION = {"--beta": {"dest": "beta", "type": float, "help": "trades / mart / cat: weight of the KL term"}}
ALP_OPTION = {"--alp-lambda": {"dest": "alp_lambda", "type": float, "help": "alp / cat: weight of logit pairing"}}


def _single(recipe_name: str, summary: str, defaults: dict, model_defaults=None, cli_options=None):
    recipe = RECIPES[recipe_name]
    attrs = {"name": recipe_name, "summary": summary, "recipe": recipe, "cli_options": cli_options or {},
             "defaults": {"attack_init": recipe.init, "attack_bn": recipe.bn_mode, **defaults}}
    if model_defaults is not None:
        attrs["defaults_for"] = classmethod(lambda cls, model, dataset=None: {**cls.defaults, **model_defaults(model)})
    cls = type(f"{recipe_name.capitalize()}Method", (SinglePeerMethod,), attrs)
    return register_method(cls)


_single("nat", "natural training, CE(f(x), y)",
        {"epochs": 100, "lr": 0.1, "lr_drops": [75, 90], "weight_decay": 5e-4,
         "eps": 8 / 255, "step": 2 / 255, "attack_steps": 10})
_single("at", "PGD adversarial training (Madry et al.)", _MADRY)
_single("trades", "TRADES (Zhang et al. 2019)", _TRADES_CODE, cli_options=BETA_OPTION)
_single("mart", "MART (Wang et al. 2020)",
        {**_TRADES, "beta": 6.0},
        model_defaults=lambda model: _MART_WRN if is_wide(model) else {**mart_schedule(model), "beta": 5.0},
        cli_options=BETA_OPTION)
_single("alp", "adversarial logit pairing (Kannan et al. 2018)", {**_MADRY, "alp_lambda": 1.0},
        cli_options=ALP_OPTION)
