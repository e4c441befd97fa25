"""Paper / official-code fidelity of the methods' defaults and switches (issue 14), and configs/paper/.

Each test pins one behaviour that the previous code got wrong or left implicit; the source each follows is
named in the method's docstring.
"""
from pathlib import Path

import pytest
import torch

from fastcollab import ops
from fastcollab import reference as R
from fastcollab.attacks import OBJECTIVES
from fastcollab.config import read_yaml, resolve_config
from fastcollab.errors import FastcollabError
from fastcollab.methods import CLEAN, LogitTable, StepContext, View, adv_key, get_method
from fastcollab.schedule import LRSchedule
from fastcollab.train import build_parser

PAPER_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))


def method(name, **given):
    config = resolve_config({"method": name, "model": "smallcnn", **given})
    return get_method(name)(config), config


def table(views, n=6, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LogitTable({(v.model, v.input): torch.randn(n, classes, generator=g) for v in views})


# ------------------------------------------------------------------------------------------ CAT / ALP
def test_cat_attacks_in_eval_bn_and_peer_logits_in_train_bn():
    """CAT's train_cat.sh passes --BNeval: the AT / ALP peers attack in eval mode; peers' logits on the other
    peer's x' come from a train-mode forward inside the step."""
    m, config = method("cat", peer_methods=["at", "alp", "trades"])
    assert [p.spec.bn_mode for p in m.attacks()] == ["eval", "eval", "eval"]
    assert config["view_bn"] == "train"
    per_peer, _ = method("cat", peer_methods=["at", "trades"], attack_bn="per-peer")
    assert [p.spec.bn_mode for p in per_peer.attacks()] == ["train", "eval"]


def _plan(name, **given):
    from fastcollab.cohort import Cohort, sgd_for
    from fastcollab.engine import plan_step
    from fastcollab.models import create_model
    from fastcollab.schedule import LRSchedule as Schedule

    m, config = method(name, **given)
    models = {p: create_model("smallcnn", num_classes=10) for p in m.trainable_peers()}
    cohort = Cohort(m, models, {p: sgd_for(mod, 0.1, 0.9, 0.0) for p, mod in models.items()},
                    {p: Schedule("piecewise", 0.1, 1) for p in models})
    return plan_step(cohort, config["view_bn"])


def test_peer_views_in_train_bn_where_the_official_code_has_them():
    """CAT's cross views p_j(x'_i) and MAT's soft labels with --peer-view-bn train run as single train-mode
    forwards (nograd_single), not in the batched eval forward."""
    cat = _plan("cat")
    assert {(v.model, v.input) for v in cat.nograd_single} == {("p1", adv_key("p0")), ("p0", adv_key("p1"))}
    assert not cat.nograd_batched
    assert {(v.model, v.input) for v in _plan("mat", view_bn="train").nograd_single} == {("p0", CLEAN), ("p1", CLEAN)}
    assert not _plan("mat").nograd_single


def test_alp_baseline_attacks_in_eval_bn():
    m, config = method("alp")
    assert config["attack_bn"] == "eval" and m.attacks()[0].spec.bn_mode == "eval"
    assert method("at")[0].attacks()[0].spec.bn_mode == "train"  # Madry-style AT keeps train mode


# ------------------------------------------------------------------------------------------ ADT / AODT
def test_aodt_trades_variant_uses_the_trades_kl_attack():
    m, _ = method("aodt", variant="trades", alpha=0.0)
    spec = m.attacks()[0].spec
    assert (spec.objective, spec.init) == ("trades_kl", "normal")
    assert method("aodt", variant="trades", attack="ce")[0].attacks()[0].spec.objective == "ce"
    assert method("aodt")[0].attacks()[0].spec.objective == "ce"


@pytest.mark.parametrize("variant, alpha, objective", [("alp", 1.0, "ce"), ("trades", 6.0, "trades_kl")])
def test_adt_variants(variant, alpha, objective):
    m, _ = method("adt", variant=variant)
    assert m.hp["alpha"] == alpha and m.attacks()[0].spec.objective == objective
    assert View("p0", CLEAN) in m.views()
    t = table(m.views())
    y = torch.arange(6) % 10
    mse = ops.logit_mse(t["p0", adv_key("p0")], t["teacher", CLEAN])
    extra = (ops.logit_mse(t["p0", adv_key("p0")], t["p0", CLEAN]) if variant == "alp"
             else ops.trades_kl(t["p0", CLEAN], t["p0", adv_key("p0")]))
    torch.testing.assert_close(m.loss(t, y, StepContext()).total, mse + alpha * extra)
    with pytest.raises(FastcollabError, match="--variant"):
        method("adt", variant="mart")


def test_aodt_warmup_is_lbgats_first_epoch_at_0_02():
    _, config = method("aodt")
    sched = LRSchedule.from_config(config)
    assert sched(0.0) == pytest.approx(0.02) and sched(0.99) == pytest.approx(0.02)
    assert sched(1.0) == pytest.approx(0.1)
    at = LRSchedule.from_config(method("at")[1])
    assert at(0.0) == pytest.approx(0.1)
    with pytest.raises(FastcollabError, match="does not take --lr-warmup-epochs"):
        method("at", lr_warmup_epochs=1.0)


# ------------------------------------------------------------------------------------------ MAT-MP
def test_l1_step_masks_coordinates_within_one_step_of_the_box_edge():
    """Maini et al.'s l1_dir_topk (gap = step): no move towards an edge closer than one step, none from an
    edge whatever the gradient; the freed budget goes to the next-largest movable coordinates."""
    step = 0.05
    x = torch.full((1, 1, 1, 8), 0.5)
    xa = x.clone()
    xa[..., 0], xa[..., 1], xa[..., 2], xa[..., 3] = 0.03, 0.98, 0.0, 1.0
    g = torch.tensor([-8.0, 7.0, 6.0, -5.0, 0.4, 0.3, 0.2, 0.1]).view(1, 1, 1, 8)
    for backend in [b for b in ops.available_backends() if b != "triton"]:
        ops.set_backend(backend)
        try:
            out = ops.pgd_step_(xa.clone(), g, x, 1000.0, step, "l1", l1_k=5)
        finally:
            ops.set_backend(None)
        torch.testing.assert_close(out[..., :4], xa[..., :4], msg=backend)  # the four masked coordinates
        torch.testing.assert_close(out[..., 4:], xa[..., 4:] + step * 20 / 5 * torch.sign(g[..., 4:]), msg=backend)
    # an interior coordinate more than one step from the edges moves
    inner = R.pgd_step_(torch.full((1, 1, 1, 5), 0.5), torch.ones(1, 1, 1, 5), torch.full((1, 1, 1, 5), 0.5),
                        1000.0, step, "l1", l1_k=5)
    assert (inner > 0.5).all()


def test_mat_mp_honours_the_attack_objective():
    m, _ = method("mat-mp", attack_objective="ce")
    assert {p.spec.objective for p in m.attacks()} == {"ce"}
    msd, _ = method("mat-mp", strategy="msd", attack_objective="cw")
    assert {p.spec.objective for p in msd.attacks()} == {"cw"}
    assert {p.spec.objective for p in method("mat-mp")[0].attacks()} == {"bce"}


# ------------------------------------------------------------------------------------------ MAT
def test_mat_alpha_follows_the_dataset_and_peer_view_bn_switch():
    assert method("mat", dataset="cifar100")[1]["alpha"] == 0.45
    assert method("mat", dataset="cifar10")[1]["alpha"] == 0.6
    assert method("mat", dataset="cifar100", alpha=0.3)[1]["alpha"] == 0.3
    args = build_parser().parse_args(["--method", "mat", "--peer-view-bn", "train"])
    assert args.view_bn == "train"


# ------------------------------------------------------------------------------------------ baselines, KD
def test_official_epoch_budgets():
    trades = method("trades")[1]
    assert trades["epochs"] == 76 and trades["lr_drops"] == [74]
    mart_wrn = resolve_config({"method": "mart", "model": "wrn-34-10"})
    assert (mart_wrn["epochs"], mart_wrn["lr"], mart_wrn["weight_decay"], mart_wrn["beta"]) == (90, 0.1, 7e-4, 6.0)
    assert method("mart")[1]["epochs"] == 120


def test_ard_runs_the_clean_student_forward_at_alpha_1():
    m, _ = method("ard", teacher="unused")
    assert m.hp["alpha"] == 1.0 and View("p0", CLEAN) in m.views()
    t = table(m.views())
    y = torch.arange(6) % 10
    kd = ops.kl_div(t["p0", adv_key("p0")], t["teacher", CLEAN], T=30.0, reduction="mean") * 900
    torch.testing.assert_close(m.loss(t, y, StepContext()).total, kd)


def test_mmard_switches():
    m, _ = method("mmard", teacher="unused")
    assert m.attacks()[0].spec.objective == "guide_kl"
    assert method("mmard", teacher="unused", guide_grad="student")[0].attacks()[0].spec.objective == "guide_kl_sg"
    # the two inner objectives differ exactly by the gradient through the teacher
    torch.manual_seed(0)
    x = torch.rand(4, 6, requires_grad=True)
    w_s, w_t = torch.randn(6, 5), torch.randn(6, 5)
    grads = []
    for name in ("guide_kl", "guide_kl_sg"):
        loss = OBJECTIVES[name]({"attacked": x @ w_s, "guide": x @ w_t}, None, {}).sum()
        grads.append(torch.autograd.grad(loss, x)[0])
    torch.testing.assert_close(OBJECTIVES["guide_kl"]({"attacked": x @ w_s, "guide": x @ w_t}, None, {}),
                               OBJECTIVES["guide_kl_sg"]({"attacked": x @ w_s, "guide": x @ w_t}, None, {}))
    assert not torch.allclose(grads[0], grads[1])
    mean, _ = method("mmard", teacher="unused")
    total, _ = method("mmard", teacher="unused", triangle_reduction="sum")
    t = table(mean.views())
    y = torch.arange(6) % 10
    trd_mean = mean.loss(t, y, StepContext()).terms["triangle"]
    torch.testing.assert_close(total.loss(t, y, StepContext()).terms["triangle"], 6 * trd_mean)


# ------------------------------------------------------------------------------------------ configs/paper
def test_paper_configs_exist():
    assert len(PAPER_CONFIGS) >= 40


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_resolves(path):
    """Every file parses as ``python -m fastcollab.train --config FILE`` would (no training) and carries the
    paper's number and a one-line GPU command."""
    text = path.read_text()
    assert "# paper: " in text and "# GPU: " in text and f"--config configs/paper/{path.name}" in text
    args = build_parser().parse_args(["--config", str(path)])
    given = {k: v for k, v in vars(args).items() if v is not None}
    given.pop("progress", None)
    config = resolve_config(given, read_yaml(path))
    get_method(config["method"])(config)
