"""Collaborative adversarial training, CAT (shared/papers/cat_collaborative_adversarial_training.txt).

Peers trained with **different** base methods (the paper's best pair: TRADES and ALP) teach each other: each
peer is distilled, on its own adversarial example, towards the other peers' predictions on that same example.
"""
from __future__ import annotations

import torch

from .. import ops
from ..errors import FastcollabError
from .base import AttackPlan, LogitTable, LossResult, Method, Peer, StepContext, View, accuracy_of, adv_key
from .baselines import ALP_OPTION, BETA_OPTION, RECIPES
from .registry import register_method

CAT_BASES = ("at", "trades", "alp", "mart")


@register_method
class CAT(Method):
    """CAT, Eq. 6 generalised to N peers:

    ``L = α·Σ_i L_base_i + (1−α)·Σ_i mean_{j≠i} KL(sg p_j(x'_i) ‖ p_i(x'_i))``

    where ``x'_i`` is crafted by peer i's own base method (AT: CE-PGD; TRADES: KL-PGD; ALP: CE-PGD;
    MART: CE-PGD) and the peer's logits are constants (the paper's ``ĝ``, ``f̂``). The paper writes
    ``D_KL(f(x'), ĝ(x'))`` in PyTorch's KLDivLoss argument order, i.e. the peer's distribution is the
    target: we follow that, ``KL(p_peer ‖ p_self)``. α = 0.05 (the paper's default, Sec. 4.2).

    BatchNorm follows CAT's official script (train_cat.py run by train_cat.sh with ``--BNeval``):

    - every peer crafts ``x'_i`` with **eval-mode** BN (``attack_bn: eval``): ``--BNeval`` puts the AT / ALP
      peer's PGD in eval mode and the TRADES peer's KL attack (trades.py) is always in eval mode.
      ``attack_bn: per-peer`` (YAML only) gives each peer its baseline's mode instead (AT: train);
    - the peer-side logits ``p_j(x'_i)`` are computed in **train** mode (``view_bn: train``), as the script
      does (``model1(x_adv2)`` inside the training step, then detached): batch statistics, and the peer's
      running statistics also see the other peer's adversarial batch. ``--view-bn eval`` is the cheaper
      variant (one batched eval forward per peer), not the paper's.
    """

    name = "cat"
    summary = "collaborative adversarial training (peers with different base methods)"
    defaults = {"peer_methods": ["trades", "alp"], "alpha": 0.05, "beta": 6.0, "alp_lambda": 1.0,
                "epochs": 200, "lr": 0.1, "lr_drops": [100, 150],
                "weight_decay": 5e-4, "eps": 8 / 255, "step": 2 / 255, "attack_steps": 10,
                "attack_init": "per-peer", "attack_bn": "eval", "view_bn": "train"}

    cli_options = {
        "--peer-methods": {"dest": "peer_methods", "type": lambda s: [t.strip() for t in s.split(",") if t.strip()],
                           "help": f"cat: base method per peer from {', '.join(CAT_BASES)} (trades,alp)"},
        **BETA_OPTION, **ALP_OPTION,
    }

    def __init__(self, hp):
        super().__init__(hp)
        bases = list(self.hp["peer_methods"])
        unknown = [b for b in bases if b not in CAT_BASES]
        if unknown:
            raise FastcollabError(f"cat cannot use base method(s) {', '.join(unknown)}: "
                                  f"--peer-methods takes a comma list of {', '.join(CAT_BASES)}")
        if len(bases) < 2:
            raise FastcollabError("cat needs at least 2 peers: pass e.g. --peer-methods trades,alp")
        if not 0.0 <= self.hp["alpha"] <= 1.0:
            raise FastcollabError(f"cat's --alpha must lie in [0, 1], got {self.hp['alpha']}")
        self.bases = {f"p{i}": RECIPES[b] for i, b in enumerate(bases)}

    def peers(self):
        return [Peer(n, f"peer ({r.name})") for n, r in self.bases.items()]

    def attacks(self):
        plans = []
        for n, r in self.bases.items():
            init = r.init if self.hp["attack_init"] == "per-peer" else self.hp["attack_init"]
            bn = r.bn_mode if self.hp["attack_bn"] == "per-peer" else self.hp["attack_bn"]
            plans.append(AttackPlan(adv_key(n), n, self.attack_spec(r.objective, init=init, bn_mode=bn)))
        return plans

    def views(self):
        own = [v for n, r in self.bases.items() for v in r.views(n, adv_key(n))]
        cross = [View(j, adv_key(i), grad=False) for i in self.bases for j in self.bases if j != i]
        return own + cross

    def loss(self, table: LogitTable, y: torch.Tensor, ctx: StepContext) -> LossResult:
        alpha = self.hp["alpha"]
        base_sum, kd_sum, terms, correct = 0.0, 0.0, {}, {}
        for i, r in self.bases.items():
            base, base_terms = r.loss(table, i, adv_key(i), y, self.hp)
            others = [j for j in self.bases if j != i]
            kd = sum(ops.kl_div(table[i, adv_key(i)], table[j, adv_key(i)]) for j in others) / len(others)
            base_sum, kd_sum = base_sum + base, kd_sum + kd
            terms.update({f"{i}/{k}": v for k, v in base_terms.items()})
            terms[f"{i}/kd"] = kd
            correct[i] = accuracy_of(table[i, adv_key(i)], y)
        return LossResult(alpha * base_sum + (1 - alpha) * kd_sum, terms, correct)
