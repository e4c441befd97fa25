"""Mutual adversarial training, MAT (Liu et al., shared/papers/mat_mutual_adversarial_training.txt).

N ≥ 2 peers train together; each crafts its own adversarial example with MART's boosted cross-entropy and is
distilled towards the other peers' predictions on the **clean** image (the paper's choice: adversarial inputs
mislead the peer that provides the soft label).
"""
from __future__ import annotations

import torch

from .. import ops
from ..errors import FastcollabError
from .base import CLEAN, AttackPlan, LogitTable, LossResult, Method, Peer, StepContext, View, accuracy_of, adv_key
from .baselines import mart_schedule
from .registry import register_method


def peer_names(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


@register_method
class MAT(Method):
    """MAT, Eq. 4 (N = 2) and Eq. 5 (N ≥ 2):

    ``L = (1−a)·Σ_n BCE(f_n(x'_n), y) + a/(N−1)·Σ_n Σ_{m≠n} T²·KL(sg p_m^T(x) ‖ p_n^T(x'_n))``

    with ``x'_n`` the boosted-CE PGD example of peer n (Eq. 1), BCE = MART's boosted cross-entropy, and
    ``p^T = softmax(z/T)`` (T = 1 in the paper, where the T² factor is 1). Options: the soft label from the
    peer's prediction on ``x'_n`` instead of ``x`` (``peer_target: adv``), and not detaching it.

    Paper settings (Sec. 3.1, 3.2.1): a = 0.6 on CIFAR-10 and **0.45 on CIFAR-100** (the default follows
    ``--dataset cifar100``; any other dataset gets 0.6), BCE-PGD with eps 8/255, 10 steps of 0.007.

    Detaching (``--no-detach-peer``): Eq. 4 writes the KL without a stop-gradient, and Alg. 1 updates θ1
    and θ2 with the gradient of the **joint** loss L_MAT (lines 9–10), so read literally the KL term
    ``KL(p_m(x) ‖ p_n(x'_n))`` also pulls peer m — the "no detach" reading. The default keeps the soft
    label a constant (``detach_peer: True``), as the paper's KD framing ("learn from the soft labels of the
    peer") and DESIGN §2.2 (``sg p_m``) state; no official MAT code was
    available to settle it. ``--no-detach-peer`` is the literal Alg. 1.

    BatchNorm of the peer's soft-label forward: eval mode, one batched no-grad forward (default, cheaper);
    ``--peer-view-bn train`` (the same switch as ``--view-bn``) runs it in train mode, as CAT's official
    code computes its peers' logits inside the training step.
    """

    name = "mat"
    summary = "mutual adversarial training (Liu et al.)"
    defaults = {"peers": 2, "alpha": 0.6, "temperature": 1.0, "peer_target": "clean", "detach_peer": True,
                "eps": 8 / 255, "step": 0.007, "attack_steps": 10, "attack_init": "normal",
                "attack_bn": "eval", **mart_schedule("resnet18")}

    cli_options = {
        "--peers": {"dest": "peers", "type": int, "help": "mat: number of peers (2)"},
        "--alpha": {"dest": "alpha", "type": float,
                    "help": "mat: weight a of the peer KL (0.6; 0.45 on cifar100); cat: weight α of the base "
                            "losses (0.05); adt / aodt: weight α of the variant's term (alp 1, trades 6)"},
        "--temperature": {"dest": "temperature", "type": float, "help": "mat: distillation temperature T (1)"},
        "--peer-target": {"dest": "peer_target", "choices": ["clean", "adv"],
                          "help": "mat: the peer's soft label on x (clean, the paper) or on x'"},
        "--no-detach-peer": {"dest": "detach_peer", "action": "store_false",
                             "help": "mat: let the KL pull the peer that gives the soft label too"},
        "--peer-view-bn": {"dest": "view_bn", "choices": ["eval", "train"],
                           "help": "mat: BN mode of the peers' no-grad soft-label forward (= --view-bn; eval)"},
    }

    @classmethod
    def defaults_for(cls, model, dataset=None):
        """MART's optimiser for ``model``; a = 0.45 on CIFAR-100, 0.6 otherwise (paper Sec. 3.2.1)."""
        return {**cls.defaults, **mart_schedule(model), "alpha": 0.45 if dataset == "cifar100" else 0.6}

    def __init__(self, hp):
        super().__init__(hp)
        if int(self.hp["peers"]) < 2:
            raise FastcollabError(f"mat needs at least 2 peers, got --peers {self.hp['peers']}: pass --peers 2")
        if self.hp["peer_target"] not in ("clean", "adv"):
            raise FastcollabError(f"--peer-target must be clean or adv, got {self.hp['peer_target']!r}")
        if not 0.0 <= self.hp["alpha"] <= 1.0:
            raise FastcollabError(f"mat's --alpha must lie in [0, 1], got {self.hp['alpha']}")
        if not self.hp["temperature"] > 0:
            raise FastcollabError(f"--temperature must be > 0, got {self.hp['temperature']}")
        self.names = peer_names(int(self.hp["peers"]))

    def peers(self):
        return [Peer(n, "peer") for n in self.names]

    def attacks(self):
        spec = self.attack_spec("bce")
        return [AttackPlan(adv_key(n), n, spec) for n in self.names]

    def _target(self, m: str, n: str) -> str:
        """The input on which peer m gives its soft label to peer n."""
        return CLEAN if self.hp["peer_target"] == "clean" else adv_key(n)

    def views(self):
        grad_peer = not self.hp["detach_peer"]
        own = [View(n, adv_key(n)) for n in self.names]
        peer = {View(m, self._target(m, n), grad_peer) for n in self.names for m in self.names if m != n}
        return own + sorted(peer, key=lambda v: (v.model, v.input))

    def loss(self, table: LogitTable, y: torch.Tensor, ctx: StepContext) -> LossResult:
        a, T = self.hp["alpha"], self.hp["temperature"]
        n_peers = len(self.names)
        bce_sum, kd_sum, terms, correct = 0.0, 0.0, {}, {}
        for n in self.names:
            logits_adv = table[n, adv_key(n)]
            bce = ops.boosted_ce(logits_adv, y)
            kd = sum(ops.kl_div(logits_adv, table[m, self._target(m, n)], T=T,
                                detach_teacher=self.hp["detach_peer"]) * T * T
                     for m in self.names if m != n)
            bce_sum, kd_sum = bce_sum + bce, kd_sum + kd
            terms[f"{n}/bce"], terms[f"{n}/kd"] = bce, kd
            correct[n] = accuracy_of(logits_adv, y)
        total = (1 - a) * bce_sum + a / (n_peers - 1) * kd_sum
        return LossResult(total, terms, correct)
