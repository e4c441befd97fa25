"""Sanity checks beside every robust number: a normally trained model raises no flag; each deliberately broken
model (softmax output, randomised forward, quantised input, gradient steps inside forward, a constant
predictor) fails its own check."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastcollab.evaluation.checks import CheckBudget, run_checks, summary_line, warning_for

BUDGET = CheckBudget(steps=5, restarts=2, square_queries=50)
N = 24


class Softmax(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class Randomised(Softmax):
    def forward(self, x):
        z = self.inner(x)
        return z + 0.5 * torch.randn_like(z)


class Quantised(Softmax):
    """Rounds its input to 16 levels: the input gradient is zero everywhere (gradient masking)."""

    def forward(self, x):
        return self.inner(torch.round(x * 15) / 15)


class StepsInForward(Softmax):
    """Takes an SGD step on its own parameters at every forward pass with gradients on."""

    def forward(self, x):
        z = self.inner(x)
        if torch.is_grad_enabled():
            params = [p for p in self.inner.parameters() if p.requires_grad]
            grads = torch.autograd.grad(z.logsumexp(1).sum(), params, retain_graph=True)
            for p, g in zip(params, grads):
                p.data.sub_(1e-3 * g)         # as test-time-adaptation code does
        return z


class Constant(nn.Module):
    def __init__(self, cls=3, classes=10):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.cls, self.classes = cls, classes

    def forward(self, x):
        z = torch.zeros(x.shape[0], self.classes, device=x.device) + 0.01 * self.w * x.flatten(1).mean(1, keepdim=True)
        z[:, self.cls] += 3.0
        return z


@pytest.fixture(scope="module")
def batch(mini_test_batch):
    x, y = mini_test_batch
    return x[:N], y[:N]


def statuses(model, batch, **kw):
    x, y = batch
    report = run_checks({"m": model}, x, y, 10, BUDGET, seed=0, **kw)
    return {c["name"]: c for c in report["peers"]["m"]}, report


def test_a_normal_model_raises_no_flag(trained_nat_model, batch):
    checks, report = statuses(trained_nat_model, batch)
    assert {c["status"] for c in checks.values()} <= {"pass", "skipped"}, \
        {n: (c["status"], c["value"], c["explain"]) for n, c in checks.items() if c["status"] not in ("pass", "skipped")}
    assert checks["transfer"]["status"] == "skipped"          # one peer: nothing to transfer from
    assert set(checks) >= {"eval_mode", "logits", "deterministic", "no_side_effects", "input_range", "degenerate",
                           "zero_gradient", "perturbations_valid", "fgsm_vs_pgd", "more_steps", "restarts",
                           "eps_sweep", "random_noise", "transfer", "square"}
    for c in checks.values():
        assert set(c) == {"name", "status", "value", "threshold", "explain"}
    sweep = report["eps_sweep"]["m"]["linf"]
    assert sweep["eps"][0] == 0 and sweep["eps"][-1] == 1.0 and len(sweep["eps"]) == 7
    assert sweep["accuracy"][-1] == 0.0 and sweep["accuracy"][0] > 30
    assert report["meaningless"] == [] and warning_for(report, "m") == ""
    assert summary_line(report).startswith(f"checks on {N} images · m: ")


@pytest.mark.parametrize("wrap,flag", [(Softmax, "logits"), (Randomised, "deterministic"),
                                       (Quantised, "zero_gradient"), (StepsInForward, "no_side_effects")],
                         ids=["softmax", "randomised", "quantised", "steps-in-forward"])
def test_each_broken_model_fails_its_own_check(trained_nat_model, batch, wrap, flag):
    model = wrap(copy.deepcopy(trained_nat_model))
    checks, report = statuses(model, batch, square=False)
    assert checks[flag]["status"] == "fail", checks[flag]
    assert flag in warning_for(report, "m") and "CHECKS FAILED" in warning_for(report, "m")


def test_a_constant_predictor_is_degenerate_and_its_numbers_meaningless(batch):
    checks, report = statuses(Constant(), batch, square=False)
    assert checks["degenerate"]["status"] == "fail"
    assert report["meaningless"] == ["m"] and "meaningless" in warning_for(report, "m")


def test_transfer_check_compares_peers(trained_nat_model, batch):
    x, y = batch
    report = run_checks({"a": trained_nat_model, "b": copy.deepcopy(trained_nat_model)}, x, y, 10, BUDGET,
                        square=False)
    for peer in ("a", "b"):
        (t,) = [c for c in report["peers"][peer] if c["name"] == "transfer"]
        assert t["status"] == "pass", t
