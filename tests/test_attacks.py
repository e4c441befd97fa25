"""Attacks: inside the eps ball and the [0, 1] box, input gradients only, BN modes, PGD stronger than FGSM."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcollab.attacks import AttackSpec, fgsm, parse_number, pgd
from fastcollab.errors import FastcollabError
from fastcollab.models import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("smallcnn").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    x[0] = 0.0  # an image at the box edge
    x[1] = 1.0
    return x, torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("objective", ["ce", "bce", "cw"])
@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
def test_linf_pgd_stays_in_ball_and_box(model, batch, objective, init):
    x, y = batch
    eps = 8 / 255
    x_adv = pgd(model, x, y, AttackSpec(eps=eps, step=2 / 255, steps=3, init=init, objective=objective))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > eps / 2  # it moved


def test_trades_kl_objective_reads_reference_logits(model, batch):
    x, y = batch
    with torch.no_grad():
        ref = {"attacked_clean": model(x)}
    spec = AttackSpec(eps=0.031, step=0.007, steps=5, init="normal", objective="trades_kl")
    x_adv = pgd(model, x, y, spec, ref=ref)
    with torch.no_grad():
        kl_after = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(ref["attacked_clean"], 1), reduction="sum")
    assert kl_after > 1e-4
    with pytest.raises(KeyError):
        pgd(model, x, y, spec)  # the objective needs the clean logits


def test_attack_takes_input_gradients_only(batch):
    torch.manual_seed(0)
    net = create_model("smallcnn").train()
    x, y = batch
    pgd(net, x, y, AttackSpec(steps=2))
    assert all(p.grad is None for p in net.parameters())


def test_bn_mode_eval_leaves_running_stats_and_train_updates_them(batch):
    torch.manual_seed(0)
    net = create_model("smallcnn").train()
    x, y = batch
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    pgd(net, x, y, AttackSpec(steps=2, bn_mode="eval"))
    assert torch.equal(bn.running_mean, before) and net.training  # mode restored
    pgd(net, x, y, AttackSpec(steps=2, bn_mode="train"))
    assert not torch.equal(bn.running_mean, before)


def test_fgsm_is_one_signed_step(model, batch):
    x, y = batch
    eps = 4 / 255
    x_adv = fgsm(model, x, y, eps)
    xr = x.clone().requires_grad_()
    g, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    expected = (x + eps * g.sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def test_pgd_is_stronger_than_fgsm_on_a_trained_model(trained_nat_model, mini_test_batch):
    model = trained_nat_model
    x, y = mini_test_batch
    eps = 2 / 255
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
    x_f = fgsm(model, x, y, eps)
    x_p = pgd(model, x, y, AttackSpec(eps=eps, step=eps / 4, steps=10))
    with torch.no_grad():
        acc_f = (model(x_f).argmax(1) == y).float().mean()
        acc_p = (model(x_p).argmax(1) == y).float().mean()
        loss_f = F.cross_entropy(model(x_f), y)
        loss_p = F.cross_entropy(model(x_p), y)
    assert clean > 0.3, "the fixture model should have learnt something"
    assert acc_f < clean
    assert acc_p < acc_f
    assert loss_p > loss_f


@pytest.mark.parametrize("bad,match", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(step=0.0), "step must be > 0"),
    (dict(norm="l3"), "unknown attack norm"),
    (dict(init="laplace"), "unknown attack init"),
    (dict(objective="nope"), "unknown attack objective"),
    (dict(bn_mode="frozen"), "BN mode"),
    (dict(steps=1.5), "whole number"),
])
def test_bad_attack_specs(bad, match):
    with pytest.raises(FastcollabError, match=match):
        AttackSpec(**bad)


def test_parse_number():
    assert parse_number("8/255", "eps") == pytest.approx(8 / 255)
    assert parse_number("0.031", "eps") == pytest.approx(0.031)
    with pytest.raises(FastcollabError, match="fraction"):
        parse_number("eight", "--eps")
