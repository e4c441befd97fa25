"""fastcollab's own APGD-CE / APGD-T over a cohort, checked against Croce & Hein's code (pyautoattack).

The comparison uses a naturally trained smallcnn on real cifar10_mini images at a small eps (2/255), where
some points survive and some break, with 20 iterations (3 target classes for APGD-T) to stay fast.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastcollab.apgd import APGDSpec, aa_fast, apgd_cohort, check_aa_applicable
from fastcollab.attacks import AttackSpec, pgd
from fastcollab.errors import FastcollabError
from fastcollab.models import create_model

EPS = 2 / 255
STEPS = 20
N = 64


@pytest.fixture(scope="module")
def data(mini_test_batch):
    x, y = mini_test_batch
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def model(trained_nat_model):
    return trained_nat_model.eval()


def _in_ball_and_box(x_adv, x, eps, norm):
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    return bool((size <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1 and x_adv.isfinite().all())


def _reference(model, x, y, norm, eps, loss, n_targets=3):
    lib = pytest.importorskip("pyautoattack.autopgd_base", reason="pyautoattack is installed by the test extra")
    aa_norm = {"linf": "Linf", "l2": "L2"}[norm]
    if loss == "ce":
        ref = lib.APGDAttack(model, n_iter=STEPS, norm=aa_norm, eps=eps, seed=0, loss="ce", device=x.device)
    else:
        ref = lib.APGDAttack_targeted(model, n_iter=STEPS, norm=aa_norm, eps=eps, seed=0, device=x.device,
                                      n_target_classes=n_targets)
    with torch.random.fork_rng():
        x_ref = ref.perturb(x, y)
    with torch.no_grad():
        return model(x_ref).argmax(1) == y


# ------------------------------------------------------------------------------------------- spec / input
def test_checkpoints_follow_the_paper_schedule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), times N = 100
    assert APGDSpec(steps=100).checkpoints() == [22, 41, 57, 70, 80, 87, 93, 99]
    d = APGDSpec(loss="dlr-targeted").describe()
    assert d["attack"] == "apgd-t" and d["n_target_classes"] == 9 and d["initial_step"] == pytest.approx(16 / 255)
    assert {"norm", "eps", "steps", "restarts", "rho", "seed", "momentum", "checkpoints"} <= set(d)


@pytest.mark.parametrize("kwargs, words", [
    ({"norm": "l1"}, "aa"), ({"norm": "l3"}, "linf or l2"), ({"loss": "cw"}, "ce, dlr"),
    ({"steps": 0}, "steps"), ({"rho": 1.5}, "rho"), ({"eps": -1.0}, "eps")])
def test_bad_spec_is_one_clear_error(kwargs, words):
    with pytest.raises(FastcollabError, match=words):
        APGDSpec(**kwargs)


def test_class_count_checks():
    check_aa_applicable(3, ["apgd-dlr"])
    check_aa_applicable(4, ["apgd-t", "aa"])
    with pytest.raises(FastcollabError, match="at least 3 classes"):
        check_aa_applicable(2, ["apgd-ce", "apgd-dlr"])
    with pytest.raises(FastcollabError, match="at least 4 classes"):
        check_aa_applicable(3, ["aa-fast"])
    torch.manual_seed(0)
    two = create_model("smallcnn", num_classes=2).eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(FastcollabError, match="at least 3 classes"):
        aa_fast({"m": two}, x, torch.zeros(2, dtype=torch.long), steps=2)


def test_bad_inputs_raise_before_attacking():
    torch.manual_seed(0)
    net = create_model("smallcnn")
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(FastcollabError, match="eval mode"):
        apgd_cohort({"m": net.train()}, x, y, APGDSpec(steps=2))
    net.eval()
    with pytest.raises(FastcollabError, match=r"\[0, 1\]"):
        apgd_cohort({"m": net}, x * 255, y, APGDSpec(steps=2))
    with pytest.raises(FastcollabError, match="int64"):
        apgd_cohort({"m": net}, x, y.int(), APGDSpec(steps=2))
    with pytest.raises(FastcollabError, match="n_target_classes <= 9"):
        apgd_cohort({"m": net}, x, y, APGDSpec(steps=2, loss="dlr-targeted", n_target_classes=10))
    empty = aa_fast({"m": net}, x[:0], y[:0], steps=2)["m"]  # an empty shard is no error
    assert empty.shape == (0,) and empty.dtype == torch.bool


# ------------------------------------------------------------------------------------ against pyautoattack
@pytest.mark.parametrize("norm, eps, loss", [("linf", EPS, "ce"), ("linf", EPS, "dlr-targeted"),
                                             ("l2", 0.1, "ce")])
def test_matches_pyautoattack(model, data, norm, eps, loss):
    x, y = data
    spec = APGDSpec(norm=norm, eps=eps, steps=STEPS, loss=loss, n_target_classes=3)
    robust, x_adv = apgd_cohort({"m": model}, x, y, spec)["m"]
    ref = _reference(model, x, y, norm, eps, loss)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        assert torch.equal(robust, model(x_adv).argmax(1) == y)  # the flags are what the images show
    assert 0 < int(robust.sum()) < int(clean.sum())  # a non-trivial case: some points break, some survive
    assert abs(int(robust.sum()) - int(ref.sum())) <= 2
    assert int((robust != ref).sum()) <= 3
    assert _in_ball_and_box(x_adv, x, eps, norm)


def test_apgd_at_least_as_strong_as_pgd(model, data):
    x, y = data
    robust, _ = apgd_cohort({"m": model}, x, y, APGDSpec(eps=EPS, steps=STEPS))["m"]
    torch.manual_seed(0)
    x_pgd = pgd(model, x, y, AttackSpec(eps=EPS, step=EPS / 4, steps=20))
    with torch.no_grad():
        pgd_robust = int((model(x_pgd).argmax(1) == y).sum())
    assert int(robust.sum()) <= pgd_robust + 1


# ------------------------------------------------------------------------------------------ the cohort
def test_cohort_equals_solo_runs_and_is_deterministic(model, data):
    x, y = data
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    spec = APGDSpec(eps=EPS, steps=10, seed=3)
    both = apgd_cohort({"a": model, "b": other}, x, y, spec)
    solo_a = apgd_cohort({"a": model}, x, y, spec)["a"]
    solo_b = apgd_cohort({"b": other}, x, y, spec)["b"]
    for (r, xa), (rs, xs) in ((both["a"], solo_a), (both["b"], solo_b)):
        assert torch.equal(r, rs)
        torch.testing.assert_close(xa, xs, rtol=0, atol=1e-6)
    assert not torch.equal(both["a"][0], both["b"][0])  # two different models: different outcomes
    with torch.no_grad():  # each flag is what its model says about its adversarial image
        for name, m in (("a", model), ("b", other)):
            assert torch.equal(both[name][0], m(both[name][1]).argmax(1) == y)
    # points marked broken are not attacked: not robust, image left clean; the others are unchanged
    broken = torch.zeros(N, dtype=torch.bool)
    broken[::2] = True
    skip = apgd_cohort({"a": model}, x, y, spec, already_broken={"a": broken})["a"]
    assert not skip[0][broken].any() and torch.equal(skip[1][broken], x[broken])
    assert torch.equal(skip[0][~broken], solo_a[0][~broken])


def test_aa_fast_is_the_worst_case_of_both(model, data):
    x, y = data
    fast = aa_fast({"m": model}, x, y, eps=EPS, steps=5)["m"]
    ce, _ = apgd_cohort({"m": model}, x, y, APGDSpec(eps=EPS, steps=5))["m"]
    assert not (fast & ~ce).any() and int(fast.sum()) <= int(ce.sum())
    zero = aa_fast({"m": model}, x, y, eps=0.0, steps=5)["m"]
    with torch.no_grad():
        assert torch.equal(zero, model(x).argmax(1) == y)  # eps 0: clean accuracy
