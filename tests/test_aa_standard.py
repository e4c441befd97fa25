"""The standard AutoAttack adapter (optional extra fastcollab[autoattack] = pyautoattack 0.2.0)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from fastcollab import aa_standard
from fastcollab.aa_standard import autoattack_available, run_standard_autoattack
from fastcollab.apgd import aa_fast
from fastcollab.attacks import AttackSpec, pgd
from fastcollab.errors import FastcollabError


def _tiny(num_classes=10, softmax=False):
    """A linear classifier on 3x8x8 images: fast enough to run the whole AutoAttack in a test."""
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes)] + ([nn.Softmax(dim=1)] if softmax else [])
    return nn.Sequential(*layers).eval()


def _images(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g)


def test_missing_extra_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes `import pyautoattack` fail
    assert not autoattack_available()
    with pytest.raises(FastcollabError, match=r'pip install "fastcollab\[autoattack\]"'):
        run_standard_autoattack(_tiny(), _images(), torch.zeros(8, dtype=torch.long), eps=8 / 255)


@pytest.mark.parametrize("kwargs, words", [
    ({"norm": "l3"}, "Linf, L2 or L1"), ({"version": "plus"}, "standard or lite"), ({"eps": 0.0}, "eps"),
    ({"seed": None}, "seed"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments_raise_before_attacking(kwargs, words):
    args = {"eps": 8 / 255, **kwargs}
    with pytest.raises(FastcollabError, match=words):
        run_standard_autoattack(_tiny(), _images(), torch.zeros(8, dtype=torch.long), **args)


def test_few_classes_and_training_mode_are_refused():
    pytest.importorskip("pyautoattack", reason="pyautoattack is installed by the test extra")
    x, y = _images(), torch.zeros(8, dtype=torch.long)
    with pytest.raises(FastcollabError, match="at least 3 classes"):
        run_standard_autoattack(_tiny(num_classes=2), x, y, eps=8 / 255)
    with pytest.raises(FastcollabError, match="at least 4 classes"):
        run_standard_autoattack(_tiny(num_classes=3), x, y, eps=8 / 255, version="lite")
    with pytest.raises(FastcollabError, match="eval mode"):
        run_standard_autoattack(_tiny().train(), x, y, eps=8 / 255)


# budgets large enough that APGD-CE breaks every point of the linear model: FAB-T and Square are skipped
@pytest.mark.parametrize("norm, eps", [("linf", 0.5), ("L2", 8.0), ("l1", 100.0)])
def test_standard_version_records_everything(norm, eps):
    lib = pytest.importorskip("pyautoattack", reason="pyautoattack is installed by the test extra")
    model = _tiny()
    x = _images()
    with torch.no_grad():
        y = model(x).argmax(1)  # every point clean-correct
    state = torch.random.get_rng_state()
    out = run_standard_autoattack(model, x, y, norm=norm, eps=eps, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    meta = out["meta"]
    assert meta["library"] == "pyautoattack" and meta["version"] == lib.__version__ == "0.2.0"
    assert meta["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert meta["norm"] == aa_standard.aa_norm(norm) and meta["eps"] == eps and meta["seed"] == 1
    hp = meta["hyperparameters"]
    assert hp["apgd-ce"]["n_iter"] == 100 and hp["square"]["n_queries"] == 5000 and hp["fab-t"]["n_target_classes"] == 9
    assert hp["apgd-t"]["n_target_classes"] == (5 if norm == "l1" else 9)
    assert any("initial accuracy" in line for line in meta["log"]) and isinstance(meta["warnings"], list)
    assert not out["robust"].any()
    d = (out["x_adv"] - x).flatten(1)
    size = {"Linf": d.abs().amax(1), "L2": d.norm(dim=1), "L1": d.abs().sum(1)}[meta["norm"]]
    assert (size <= eps * (1 + 1e-4) + 1e-5).all() and out["x_adv"].min() >= 0 and out["x_adv"].max() <= 1
    with torch.no_grad():
        assert torch.equal(out["robust"], model(out["x_adv"]).argmax(1) == y)
    assert meta["robust_accuracy"] == pytest.approx(100.0 * float(out["robust"].float().mean()))


def test_autoattack_warnings_are_recorded():
    pytest.importorskip("pyautoattack", reason="pyautoattack is installed by the test extra")
    model = _tiny(softmax=True)
    x = _images(4)
    with torch.no_grad():
        y = model(x).argmax(1)
    meta = run_standard_autoattack(model, x, y, eps=8 / 255, version="lite")["meta"]
    assert any("probability distribution" in w for w in meta["warnings"])


def test_lite_on_a_trained_model_agrees_with_aa_fast_and_pgd(trained_nat_model, mini_test_batch):
    pytest.importorskip("pyautoattack", reason="pyautoattack is installed by the test extra")
    model = trained_nat_model.eval()
    x, y = mini_test_batch
    x, y = x[:32], y[:32]
    eps = 8 / 255  # most points break early: AutoAttack's 100 + 9 x 100 iterations stay cheap
    out = run_standard_autoattack(model, x, y, eps=eps, version="lite")
    assert out["meta"]["attacks"] == ["apgd-ce", "apgd-t"]
    fast = aa_fast({"m": model}, x, y, eps=eps)["m"]
    torch.manual_seed(0)
    x_pgd = pgd(model, x, y, AttackSpec(eps=eps, step=eps / 4, steps=20))
    with torch.no_grad():
        pgd_robust = model(x_pgd).argmax(1) == y
    assert int(out["robust"].sum()) <= int(pgd_robust.sum())
    assert abs(int(fast.sum()) - int(out["robust"].sum())) <= 1
    assert int((fast != out["robust"]).sum()) <= 2
