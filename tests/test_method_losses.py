"""Each method's loss against a hand-written formula on small random logit tables."""
from __future__ import annotations

import pytest
import torch

from fastcollab.config import resolve_config
from fastcollab.methods import CLEAN, LogitTable, StepContext, adv_key, get_method

B, C = 6, 10


def kl(p_logits, q_logits, T=1.0):
    """Σ p (log p − log q) per example, p = softmax(p_logits / T), averaged over the batch."""
    lp = torch.log_softmax(p_logits / T, 1)
    lq = torch.log_softmax(q_logits / T, 1)
    return (lp.exp() * (lp - lq)).sum(1).mean()


def bce(z, y):
    p = torch.softmax(z, 1)
    py = p[torch.arange(len(y)), y]
    other = p.clone()
    other[torch.arange(len(y)), y] = -1
    return (-torch.log(py) - torch.log(1.0001 - other.max(1).values)).mean()


def ce(z, y):
    return -torch.log_softmax(z, 1)[torch.arange(len(y)), y].mean()


def make(name, **given):
    cfg = resolve_config({"method": name, "model": "smallcnn", **given})
    return get_method(name)(cfg)


def table_for(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = {(v.model, v.input) for v in method.views()}
    return {k: torch.randn(B, C, generator=g) * 2 for k in keys}


@pytest.fixture
def y():
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))


def loss_of(method, logits, y):
    return method.loss(LogitTable(logits), y, StepContext()).total


def test_nat_and_at(y):
    m = make("nat")
    t = table_for(m)
    assert torch.allclose(loss_of(m, t, y), ce(t["p0", CLEAN], y), atol=1e-6)
    m = make("at")
    t = table_for(m)
    assert torch.allclose(loss_of(m, t, y), ce(t["p0", adv_key("p0")], y), atol=1e-6)


def test_trades(y):
    m = make("trades", beta=6.0)
    t = table_for(m)
    nat, adv = t["p0", CLEAN], t["p0", adv_key("p0")]
    assert torch.allclose(loss_of(m, t, y), ce(nat, y) + 6.0 * kl(nat, adv), atol=1e-5)


def test_mart(y):
    m = make("mart", beta=5.0)
    t = table_for(m)
    nat, adv = t["p0", CLEAN], t["p0", adv_key("p0")]
    lp, lq = torch.log_softmax(nat, 1), torch.log_softmax(adv, 1)
    per_kl = (lp.exp() * (lp - lq)).sum(1)
    p_true = torch.softmax(nat, 1)[torch.arange(B), y]
    expected = bce(adv, y) + 5.0 * (per_kl * (1 - p_true)).mean()
    assert torch.allclose(loss_of(m, t, y), expected, atol=1e-5)


def test_alp(y):
    m = make("alp", alp_lambda=0.5)
    t = table_for(m)
    nat, adv = t["p0", CLEAN], t["p0", adv_key("p0")]
    expected = 0.5 * (ce(adv, y) + ce(nat, y)) + 0.5 * ((adv - nat) ** 2).mean()
    assert torch.allclose(loss_of(m, t, y), expected, atol=1e-5)


@pytest.mark.parametrize("peers", [2, 3])
def test_mat_eq5(peers, y):
    a = 0.6
    m = make("mat", peers=peers, alpha=a)
    t = table_for(m)
    names = [f"p{i}" for i in range(peers)]
    at = sum(bce(t[n, adv_key(n)], y) for n in names)
    kd = sum(kl(t[mm, CLEAN], t[n, adv_key(n)]) for n in names for mm in names if mm != n)
    expected = (1 - a) * at + a / (peers - 1) * kd
    assert torch.allclose(loss_of(m, t, y), expected, atol=1e-5)


def test_mat_soft_label_is_detached_and_adv_target(y):
    m = make("mat", peer_target="adv", temperature=2.0)
    t = {k: v.requires_grad_() for k, v in table_for(m).items()}
    assert ("p1", adv_key("p0")) in t and ("p1", CLEAN) not in t
    loss = loss_of(m, t, y)
    expected = 0.4 * (bce(t["p0", adv_key("p0")], y) + bce(t["p1", adv_key("p1")], y)) + 0.6 * 4.0 * (
        kl(t["p1", adv_key("p0")], t["p0", adv_key("p0")], 2.0) + kl(t["p0", adv_key("p1")], t["p1", adv_key("p1")], 2.0))
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert t["p1", adv_key("p0")].grad is None or t["p1", adv_key("p0")].grad.abs().max() == 0


def test_mat_without_detach_pulls_the_peer(y):
    m = make("mat", detach_peer=False)
    views = {(v.model, v.input): v.grad for v in m.views()}
    assert views["p1", CLEAN] is True
    t = {k: v.requires_grad_() for k, v in table_for(m).items()}
    loss_of(m, t, y).backward()
    assert t["p1", CLEAN].grad.abs().max() > 0


@pytest.mark.parametrize("bases", [["trades", "alp"], ["at", "alp", "trades"], ["mart", "at"]])
def test_cat_eq6(bases, y):
    alpha = 0.05
    m = make("cat", peer_methods=bases, beta=6.0, alp_lambda=1.0)
    t = table_for(m)
    names = [f"p{i}" for i in range(len(bases))]
    base_sum = 0
    for n, b in zip(names, bases):
        nat, adv = t.get((n, CLEAN)), t[n, adv_key(n)]
        if b == "at":
            base_sum += ce(adv, y)
        elif b == "trades":
            base_sum += ce(nat, y) + 6.0 * kl(nat, adv)
        elif b == "alp":
            base_sum += 0.5 * (ce(adv, y) + ce(nat, y)) + ((adv - nat) ** 2).mean()
        else:
            lp, lq = torch.log_softmax(nat, 1), torch.log_softmax(adv, 1)
            w = 1 - torch.softmax(nat, 1)[torch.arange(B), y]
            base_sum += bce(adv, y) + 6.0 * ((lp.exp() * (lp - lq)).sum(1) * w).mean()
    kd = sum(sum(kl(t[j, adv_key(i)], t[i, adv_key(i)]) for j in names if j != i) / (len(names) - 1)
             for i in names)
    expected = alpha * base_sum + (1 - alpha) * kd
    assert torch.allclose(loss_of(m, t, y), expected, atol=1e-5)


def test_cat_attacks_use_each_peers_base_objective():
    m = make("cat", peer_methods=["trades", "alp", "at"])
    objectives = {a.peer: a.spec.objective for a in m.attacks()}
    assert objectives == {"p0": "trades_kl", "p1": "ce", "p2": "ce"}
    inits = {a.peer: a.spec.init for a in m.attacks()}
    assert inits == {"p0": "normal", "p1": "uniform", "p2": "uniform"}
