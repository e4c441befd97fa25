"""l2 / l1 PGD stay inside their balls and the [0, 1] box; random starts exist for every norm; MSD keeps, per
example, the candidate step of highest loss (DESIGN §3)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcollab import ops
from fastcollab.attacks import AttackSpec, MSDSpec, msd, msd_spec, pgd, random_init, run_attack
from fastcollab.errors import FastcollabError


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[0] = 0.0          # an image on the box edge
    x[1] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def norms(d):
    flat = d.flatten(1)
    return flat.abs().amax(1), flat.norm(dim=1), flat.abs().sum(1)


@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
@pytest.mark.parametrize("norm,eps,step", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1), ("l1", 12.0, 0.5)])
def test_pgd_stays_in_ball_and_box(norm, eps, step, init):
    x, y = batch()
    spec = AttackSpec(norm=norm, eps=eps, step=step, steps=5, init=init)
    x_adv = pgd(tiny_model(), x, y, spec)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    linf, l2, l1 = norms(x_adv - x)
    tol = 1e-4
    bound = {"linf": linf, "l2": l2, "l1": l1}[norm]
    assert (bound <= eps * (1 + tol) + tol).all(), (norm, bound.max().item())
    assert (x_adv != x).any(), "the attack did not move"


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l1", 12.0)])
def test_random_start_inside_ball(norm, eps):
    x, _ = batch(8)
    torch.manual_seed(0)
    start = random_init(x, AttackSpec(norm=norm, eps=eps, step=0.1, init="uniform"))
    _, l2, l1 = norms(start - x)
    r = l2 if norm == "l2" else l1
    assert (r <= eps + 1e-4).all() and (r > 0).any()
    assert start.min() >= 0 and start.max() <= 1


def test_l1_step_moves_twenty_steps_at_most_and_projects():
    x, _ = batch(4)
    x = x.clamp(0.2, 0.8)
    g = torch.randn_like(x)
    xa = x.clone()
    ops.pgd_step_(xa, g, x, 12.0, 0.05, "l1")
    _, _, l1 = norms(xa - x)
    assert torch.allclose(l1, torch.full_like(l1, 1.0), atol=1e-4)  # 20·step, away from the box
    xa = x.clone()
    ops.pgd_step_(xa, g, x, 0.3, 0.05, "l1")                        # small ball: projected onto it
    assert (norms(xa - x)[2] <= 0.3 + 1e-5).all()


def test_msd_picks_per_example_best_candidate():
    model = tiny_model(3)
    x, y = batch(8, seed=5)
    comps = [AttackSpec(norm="linf", eps=0.03, step=0.01, steps=1), AttackSpec(norm="l2", eps=0.5, step=0.2, steps=1),
             AttackSpec(norm="l1", eps=12.0, step=0.3, steps=1)]
    spec = msd_spec(comps, steps=1, objective="ce", init="zero")
    torch.manual_seed(11)
    out = msd(model, x, y, spec)
    # by hand: one gradient at x, the three candidate steps, per-example argmax of CE, kept if above the start
    torch.manual_seed(11)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    cands = []
    for c in comps:
        xc = x.clone()
        ops.pgd_step_(xc, grad, x, c.eps, c.step, c.norm)
        cands.append(xc)
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(c), y, reduction="none") for c in cands])
        start = F.cross_entropy(model(x), y, reduction="none")
    pick = losses.argmax(0)
    expected = torch.stack([cands[k][i] if losses[k, i] > start[i] else x[i] for i, k in enumerate(pick.tolist())])
    assert torch.equal(out, expected)
    assert len(set(pick.tolist())) >= 1
    with torch.no_grad():
        assert (F.cross_entropy(model(out), y, reduction="none") >= start - 1e-6).all()


def test_msd_returns_best_seen_and_each_example_in_some_ball():
    model = tiny_model(4)
    x, y = batch(6, seed=9)
    comps = [AttackSpec(norm="linf", eps=0.03, step=0.003), AttackSpec(norm="l2", eps=0.5, step=0.05),
             AttackSpec(norm="l1", eps=12.0, step=0.05)]
    out = run_attack(model, x, y, msd_spec(comps, steps=6))
    linf, l2, l1 = norms(out - x)
    inside = (linf <= 0.03 + 1e-5) | (l2 <= 0.5 + 1e-4) | (l1 <= 12.0 + 1e-3)
    assert inside.all() and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        assert (F.cross_entropy(model(out), y, reduction="none")
                >= F.cross_entropy(model(x), y, reduction="none") - 1e-6).all()


def test_msd_spec_validation():
    with pytest.raises(FastcollabError):
        MSDSpec(steps=3)                                   # no components
    with pytest.raises(FastcollabError):
        AttackSpec(norm="msd")                             # a plain spec cannot be msd
    assert run_attack(tiny_model(), *batch(2), AttackSpec(steps=0)).shape == (2, 3, 8, 8)
