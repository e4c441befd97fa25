"""Multiple-perturbation evaluation: attack names and budgets, union metrics (per-norm, R_avg, R_worst), the
transfer matrix between peers (MAT Table 4) and CAT's prediction discrepancy (CAT Eq. 7)."""
import pytest
import torch
from torch import nn

from fastcollab.errors import FastcollabError
from fastcollab.evaluation import (MP_BUDGETS, evaluate_cohort, parse_attacks, prediction_discrepancy,
                                   transfer_matrix, union_metrics)


def test_attack_names_and_budgets():
    a = {x.name: x for x in parse_attacks("clean,pgd5,l2-pgd50,l1-pgd50,linf-pgd50,l2-cw10,msd20", eps=8 / 255)}
    assert a["l2-pgd50"].spec.norm == "l2" and (a["l2-pgd50"].spec.eps, a["l2-pgd50"].spec.step) == (0.5, 0.05)
    assert (a["l1-pgd50"].spec.eps, a["l1-pgd50"].spec.step, a["l1-pgd50"].spec.steps) == (12.0, 0.05, 50)
    assert (a["linf-pgd50"].spec.eps, a["linf-pgd50"].spec.step) == (0.03, 0.003)
    assert a["pgd5"].spec.eps == 8 / 255 and a["l2-cw10"].spec.objective == "cw"
    assert a["msd20"].spec.norm == "msd" and len(a["msd20"].spec.components) == 3
    assert MP_BUDGETS["l1"] == (12.0, 0.05)
    with pytest.raises(FastcollabError):
        parse_attacks("l3-pgd10")


def test_union_metrics_worst_case_per_example():
    attacks = parse_attacks("clean,pgd2,linf-pgd2,l2-pgd2,l1-pgd2")
    t, f = True, False
    correct = {"clean": torch.tensor([t, t, t, t]),
               "pgd2": torch.tensor([t, t, f, t]),
               "linf-pgd2": torch.tensor([t, f, t, t]),
               "l2-pgd2": torch.tensor([t, t, t, f]),
               "l1-pgd2": torch.tensor([f, t, t, f])}
    u = union_metrics(correct, attacks)
    assert u["linf"] == 50.0            # examples 0 and 3 survive both l_inf attacks
    assert u["l2"] == 75.0 and u["l1"] == 50.0
    assert u["avg"] == pytest.approx((50 + 75 + 50) / 3)
    assert u["worst"] == 0.0            # no example survives all four
    correct["l1-pgd2"] = torch.tensor([t, t, t, t])
    correct["l2-pgd2"] = torch.tensor([t, t, t, t])
    assert union_metrics(correct, attacks)["worst"] == 50.0
    assert union_metrics({"clean": correct["clean"]}, parse_attacks("clean")) == {}


class Const(nn.Module):
    """Predicts a fixed class whatever the input (plus a parameter so that a device can be read)."""

    def __init__(self, cls, n=10):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.cls, self.n = cls, n

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n) + self.w * x.flatten(1).sum(1, keepdim=True)
        out[:, self.cls] += 5.0
        return out


def test_discrepancy_is_one_minus_agreement():
    x = torch.rand(8, 3, 4, 4)
    models = {"a": Const(1), "b": Const(1), "c": Const(2)}
    d = prediction_discrepancy(models, x, batch_size=3)
    assert d == {"a|b": 0.0, "a|c": 100.0, "b|c": 100.0}


def test_transfer_matrix_and_cohort_report():
    torch.manual_seed(0)
    lin = lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 10))  # noqa: E731
    models = {"p0": lin(), "p1": lin()}
    x, y = torch.rand(12, 3, 4, 4), torch.randint(0, 10, (12,))
    attack = parse_attacks("pgd3", eps=0.1, step=0.05)[0]
    m = transfer_matrix(models, x, y, attack, batch_size=5)
    assert set(m) == {"p0", "p1"} and set(m["p0"]) == {"p0", "p1"}
    assert all(0 <= v <= 100 for row in m.values() for v in row.values())
    report = evaluate_cohort(models, x, y, parse_attacks("clean,pgd3,l2-pgd3,l1-pgd3", eps=0.1), batch_size=5)
    assert set(report) == {"peers", "union", "transfer", "discrepancy"}
    assert report["transfer"]["attack"] == "pgd3"
    for peer in models:
        u = report["union"][peer]
        assert u["worst"] <= min(u["linf"], u["l2"], u["l1"])
        assert report["peers"][peer]["clean"] >= 0
    single = evaluate_cohort({"p0": models["p0"]}, x, y, parse_attacks("clean,pgd3"), batch_size=5)
    assert "transfer" not in single and "discrepancy" not in single


def test_evaluate_cli_on_a_run_reports_union_and_transfer(tmp_path, mini_npz):
    import numpy as np

    from fastcollab.evaluate import main as eval_main
    from fastcollab.train import main as train_main
    d = np.load(mini_npz)
    npz = tmp_path / "m.npz"
    np.savez(npz, x_train=d["x_train"][:32], y_train=d["y_train"][:32], x_test=d["x_test"][:8],
             y_test=d["y_test"][:8])
    run = tmp_path / "mat"
    assert train_main(["--method", "mat", "--model", "smallcnn", "--dataset", f"npz:{npz}", "--epochs", "1",
                       "--batch-size", "32", "--attack-steps", "1", "--eval-subset", "4", "--final-eval-size", "4",
                       "--final-attacks", "clean", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "eval.json"
    assert eval_main(["--run", str(run), "--attacks", "clean,pgd2,l2-pgd2,l1-pgd2", "--n", "4", "--device", "cpu",
                      "--json", str(out)]) == 0
    import json
    report = json.loads(out.read_text())
    assert set(report["union"]["p0"]) == {"linf", "l2", "l1", "avg", "worst"}
    assert set(report["transfer"]["accuracy"]) == {"p0", "p1"} and "p0|p1" in report["discrepancy"]


def test_per_norm_attacks_take_restarts_and_mat_mp_defaults_to_the_papers_ten():
    """MAT Sec. 3.3.1: every attack of the multi-norm suite runs with 10 random starts."""
    from fastcollab.evaluation.core import robust_under
    from fastcollab.methods.mat_mp import MP_FINAL_ATTACKS

    a = {x.name: x for x in parse_attacks("l1-pgd50x10,l2-cw20x3,linf-pgd5", eps=8 / 255)}
    assert (a["l1-pgd50x10"].restarts, a["l1-pgd50x10"].spec.eps, a["l1-pgd50x10"].spec.steps) == (10, 12.0, 50)
    assert a["l2-cw20x3"].restarts == 3 and a["l2-cw20x3"].spec.objective == "cw"
    assert a["linf-pgd5"].restarts == 1
    assert all(parse_attacks(n)[0].restarts == 10 for n in MP_FINAL_ATTACKS.split(",") if "-pgd" in n)
    with pytest.raises(FastcollabError, match="restarts must be >= 1"):
        parse_attacks("l2-pgd10x0")
    # more restarts never leave an example robust that one start broke (each restart attacks the survivors)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    one = parse_attacks("l2-pgd3")[0]
    many = parse_attacks("l2-pgd3x4")[0]
    torch.manual_seed(1)
    r1, _ = robust_under(model, x, y, one)
    torch.manual_seed(1)
    r4, x4 = robust_under(model, x, y, many)
    assert not (r4 & ~r1).any()
    assert ((x4 - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
