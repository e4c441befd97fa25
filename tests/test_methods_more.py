"""MAT-MP, ARD, RSLAD, IAD, MMARD, ADT, AODT: losses against hand-written formulas, teacher loading and its
errors, and every method trained end-to-end through the CLI on cifar10_mini with teachers from tiny earlier
runs; the trained cohorts are then attacked through ``load_cohort`` by a PGD written here, not fastcollab's."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcollab import load_cohort
from fastcollab.errors import FastcollabError
from fastcollab.methods import CLEAN, LogitTable, StepContext, adv_key, get_method
from fastcollab.teachers import load_teacher
from fastcollab.train import main as train_main

C = 10


# ------------------------------------------------------------------------------------ hand formulas
def kl(p_logits, q_logits, T=1.0):
    """Per-example KL(softmax(p/T) ‖ softmax(q/T))."""
    lp, lq = F.log_softmax(p_logits / T, 1), F.log_softmax(q_logits / T, 1)
    return (lp.exp() * (lp - lq)).sum(1)


def bce(z, y):
    p = F.softmax(z, 1)
    py = p.gather(1, y[:, None]).squeeze(1)
    other = p.masked_fill(F.one_hot(y, z.shape[1]).bool(), -1.0).amax(1)
    return -torch.log(py) - torch.log(1.0001 - other)


def cos_tri(nat, adv, y):
    oh = F.one_hot(y, nat.shape[1]).float()
    u, v = F.softmax(nat, 1) - oh, F.softmax(adv, 1) - oh
    return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))


def huber(r, d=1.0):
    a = r.abs()
    return torch.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d))


def make(name, **hp):
    cls = get_method(name)
    return cls({**cls.defaults_for("smallcnn"), **hp})


def fill(method, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = {(v.model, v.input): torch.randn(B, C, generator=g) * 3 for v in method.views()}
    return LogitTable(table), torch.randint(0, C, (B,), generator=g)


# ------------------------------------------------------------------------------------ MAT-MP
@pytest.mark.parametrize("strategy", ["avg", "max", "msd"])
def test_mat_mp_loss_matches_eq_6_to_10(strategy):
    m = make("mat-mp", strategy=strategy, alpha=0.6)
    t, y = fill(m)
    a, specs = 0.6, m.specialists
    M, everyone = len(specs), ["g"] + specs
    expected = 0.0
    for s in specs:                                          # Eq. 6
        z = t[s, adv_key(s)]
        expected += (1 - a) * bce(z, y).mean() + a / M * sum(kl(t[n, CLEAN], z).mean() for n in everyone if n != s)
    if strategy == "msd":                                    # Eq. 9
        z = t["g", adv_key("g", "msd")]
        expected += sum((1 - a) * bce(z, y).mean() + a * kl(t[s, CLEAN], z).mean() for s in specs) / M
    else:
        br = torch.stack([(1 - a) * bce(t["g", adv_key("g", s)], y) + a * kl(t[s, CLEAN], t["g", adv_key("g", s)])
                          for s in specs])                   # [M, B]
        if strategy == "avg":                                # Eq. 7
            expected += br.mean(0).mean()
        else:                                                # Eq. 8, k = argmax_m BCE per example
            b = torch.stack([bce(t["g", adv_key("g", s)], y) for s in specs])
            expected += br.gather(0, b.argmax(0, keepdim=True)).mean()
    got = m.loss(t, y, StepContext()).total
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_mat_mp_declarations_and_options():
    m = make("mat-mp", strategy="avg", specialist_steps=[3, 4, 5], specialist_eps=[0.03, 0.5, 12])
    assert [p.name for p in m.peers()] == ["g", "s1-linf", "s2-l2", "s3-l1"]
    plans = {p.key: p for p in m.attacks()}
    assert plans[adv_key("s2-l2")].spec.norm == "l2" and plans[adv_key("s3-l1")].spec.steps == 5
    assert len([p for p in plans.values() if p.peer == "g"]) == 3
    msd = make("mat-mp", strategy="msd", msd_steps=7)
    (gplan,) = [p for p in msd.attacks() if p.peer == "g"]
    assert gplan.spec.norm == "msd" and gplan.spec.steps == 7 and len(gplan.spec.components) == 3
    with pytest.raises(FastcollabError):
        make("mat-mp", specialist_steps=[1, 2])
    with pytest.raises(FastcollabError):
        make("mat-mp", specialist_norms=["linf", "l3", "l1"])
    with pytest.raises(FastcollabError):
        make("mat-mp", strategy="min")


# ------------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize("reduction,factor", [("batchmean", 1.0), ("mean", 1.0 / C)])
def test_ard_loss(reduction, factor):
    m = make("ard", alpha=0.7, temperature=4.0, kl_reduction=reduction)
    t, y = fill(m)
    s_adv, t_nat, s_nat = t["p0", adv_key("p0")], t["teacher", CLEAN], t["p0", CLEAN]
    expected = 0.7 * 16.0 * kl(t_nat, s_adv, T=4.0).mean() * factor + 0.3 * F.cross_entropy(s_nat, y)
    assert torch.allclose(m.loss(t, y, StepContext()).total, expected, rtol=1e-5)
    assert make("ard").hp["temperature"] == 30 and make("ard").hp["alpha"] == 1


def test_rslad_loss():
    m = make("rslad", kl_reduction="batchmean")
    t, y = fill(m)
    tn = t["teacher", CLEAN]
    expected = 5 / 6 * kl(tn, t["p0", adv_key("p0")]).mean() + 1 / 6 * kl(tn, t["p0", CLEAN]).mean()
    assert torch.allclose(m.loss(t, y, StepContext()).total, expected, rtol=1e-5)
    (plan,) = m.attacks()
    assert plan.spec.objective == "teacher_kl" and plan.guide == "teacher"


def test_iad_loss_and_start_epoch():
    m = make("iad", kl_reduction="batchmean", iad_start=60.0)
    t, y = fill(m)
    s_adv, s_nat = t["p0", adv_key("p0")], t["p0", CLEAN]
    first = kl(t["teacher", CLEAN], s_adv).mean()
    w = F.softmax(t["teacher", adv_key("p0")], 1).gather(1, y[:, None]).squeeze(1) ** 0.1
    full = first + ((1 - w) * kl(s_nat, s_adv)).mean()
    # 60 of 200 paper epochs -> epoch 3 of a 10-epoch run
    assert torch.allclose(m.loss(t, y, StepContext(epoch=2, epochs=10)).total, first, rtol=1e-5)
    assert torch.allclose(m.loss(t, y, StepContext(epoch=3, epochs=10)).total, full, rtol=1e-5)


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_mmard_loss(space):
    m = make("mmard", triangle_space=space)
    t, y = fill(m)
    sa, sn, ta, tn = t["p0", adv_key("p0")], t["p0", CLEAN], t["teacher", adv_key("p0")], t["teacher", CLEAN]
    got = m.loss(t, y, StepContext()).total
    if space == "probs":
        expected = kl(ta, sa).mean() + huber(cos_tri(sn, sa, y) - cos_tri(tn, ta, y)).mean()
        assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.isfinite(got)
    (plan,) = m.attacks()
    assert plan.spec.objective == "guide_kl" and plan.guide == "teacher"
    assert m.hp["schedule"] == "cosine" and m.hp["weight_decay"] == 2e-4 and m.hp["attack_init"] == "normal"


def test_adt_and_aodt_losses():
    m = make("adt")
    t, y = fill(m)
    expected = ((t["p0", adv_key("p0")] - t["teacher", CLEAN]) ** 2).mean()
    assert torch.allclose(m.loss(t, y, StepContext()).total, expected, rtol=1e-5)
    for variant, extra in (("plain", lambda t: 0.0),
                           ("alp", lambda t: 1.0 * ((t["p0", adv_key("p0")] - t["p0", CLEAN]) ** 2).mean()),
                           ("trades", lambda t: 6.0 * kl(t["p0", CLEAN], t["p0", adv_key("p0")]).mean())):
        m = make("aodt", variant=variant)
        t, y = fill(m)
        ra, nn_ = t["p0", adv_key("p0")], t["p1", CLEAN]
        expected = ((ra - nn_) ** 2).mean() + F.cross_entropy(nn_, y) + extra(t)
        assert torch.allclose(m.loss(t, y, StepContext()).total, expected, rtol=1e-5), variant
    # the natural peer's logits are not detached: the MSE pulls N too
    m = make("aodt")
    t, y = fill(m)
    n = t["p1", CLEAN].requires_grad_(True)
    m.loss(t, y, StepContext()).total.backward()
    assert n.grad is not None and n.grad.abs().sum() > 0
    assert make("aodt", attack="trades").attacks()[0].spec.objective == "trades_kl"


# ------------------------------------------------------------------------------------ end to end
def _tiny_npz(tmp: Path, mini: Path) -> str:
    d = np.load(mini)
    path = tmp / "mini64.npz"   # 64 training images: two steps of batch 32; 16 test images
    np.savez(path, x_train=d["x_train"][:64], y_train=d["y_train"][:64], x_test=d["x_test"][:16],
             y_test=d["y_test"][:16])
    return f"npz:{path}"


COMMON = ["--model", "smallcnn", "--epochs", "1", "--batch-size", "32", "--attack-steps", "2", "--eval-subset", "8",
          "--final-eval-size", "8", "--final-attacks", "clean,pgd2", "--no-progress", "--device", "cpu"]


def _train(dataset, out, *args):
    common = COMMON if "nat" not in args else [a for a in COMMON if a not in ("--attack-steps", "2")]  # no attack
    assert train_main(["--dataset", dataset, *common, *args, "--out", str(out)]) == 0, args
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, mini_npz):
    tmp = tmp_path_factory.mktemp("teachers")
    dataset = _tiny_npz(tmp, mini_npz)
    return {"dataset": dataset,
            "robust": _train(dataset, tmp / "trades", "--method", "trades"),
            "natural": _train(dataset, tmp / "nat", "--method", "nat")}


MP_FAST = ["--specialist-steps", "2,2,2", "--msd-steps", "2"]
RUNS = {
    "mat-mp-avg": ["--method", "mat-mp", "--strategy", "avg", *MP_FAST,
                   "--final-attacks", "clean,linf-pgd2,l2-pgd2,l1-pgd2"],
    "mat-mp-max": ["--method", "mat-mp", "--strategy", "max", *MP_FAST],
    "mat-mp-msd": ["--method", "mat-mp", "--strategy", "msd", *MP_FAST],
    "ard": ["--method", "ard", "--teacher", "{robust}"],
    "rslad": ["--method", "rslad", "--teacher", "{robust}:0"],
    "iad": ["--method", "iad", "--teacher", "{robust}", "--iad-start", "0"],
    "mmard": ["--method", "mmard", "--teacher", "{robust}"],
    "adt": ["--method", "adt", "--teacher", "{natural}"],
    "aodt": ["--method", "aodt"],
    "aodt-trades": ["--method", "aodt", "--variant", "trades", "--attack", "trades"],
}


@pytest.fixture(scope="module")
def runs(teachers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, args in RUNS.items():
        args = [a.format(robust=teachers["robust"], natural=teachers["natural"]) for a in args]
        out[name] = _train(teachers["dataset"], tmp / name, *args)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_method_trains_through_cli(runs, name):
    run = runs[name]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"])
    assert all(math.isfinite(v) for v in metrics[0]["terms"].values())
    final = json.loads((run / "final.json").read_text())
    assert "teacher" not in final["peers"]           # the frozen teacher is not a peer of the run
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert "teacher" not in ckpt["models"]


def test_mat_mp_final_reports_every_norm_and_union(runs):
    final = json.loads((runs["mat-mp-avg"] / "final.json").read_text())
    assert set(final["peers"]) == {"g", "s1-linf", "s2-l2", "s3-l1"}
    for peer in final["peers"]:
        assert {"clean", "linf-pgd2", "l2-pgd2", "l1-pgd2"} <= set(final["peers"][peer])
        assert {"linf", "l2", "l1", "avg", "worst"} <= set(final["union"][peer])
        u = final["union"][peer]
        assert u["worst"] <= min(u["linf"], u["l2"], u["l1"]) + 1e-9
    assert final["attacks"]["l1-pgd2"]["eps"] == 12.0 and final["attacks"]["l2-pgd2"]["eps"] == 0.5
    assert set(final["transfer"]["accuracy"]["g"]) == set(final["peers"])
    assert "g|s1-linf" in final["discrepancy"]


def hand_pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=3):
    """Independent l_inf PGD (Madry et al.), written here: no fastcollab code."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def test_load_cohort_attacked_by_hand_written_pgd(runs, mini_npz):
    d = np.load(mini_npz)
    x = torch.from_numpy(d["x_test"][:16]).float() / 255
    y = torch.from_numpy(d["y_test"][:16]).long()
    torch.manual_seed(0)
    for name, run in runs.items():
        cohort = load_cohort(run)
        assert len(cohort) == (4 if name.startswith("mat-mp") else 2 if name.startswith("aodt") else 1), name
        for model in cohort:
            assert not model.training
            with torch.no_grad():
                clean_loss = F.cross_entropy(model(x), y)
            x_adv = hand_pgd(model, x, y)
            assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
            with torch.no_grad():
                logits = model(x_adv)
            assert logits.shape == (16, C) and torch.isfinite(logits).all()
            assert F.cross_entropy(logits, y) >= clean_loss - 1e-4, name


# ------------------------------------------------------------------------------------ teachers
def test_teacher_is_frozen_and_selectable(teachers):
    t = load_teacher(str(teachers["robust"]), "cpu")
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    t0 = load_teacher(f"{teachers['robust']}:0", "cpu")
    tp = load_teacher(f"{teachers['robust']}:p0", "cpu")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(t(x), t0(x)) and torch.equal(t(x), tp(x))
    assert load_teacher(str(teachers["natural"]), "cpu", num_classes=10) is not None


def test_teacher_errors(teachers, tmp_path):
    with pytest.raises(FastcollabError, match="--teacher RUN_DIR"):
        load_teacher(None, "cpu")
    with pytest.raises(FastcollabError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"), "cpu")
    with pytest.raises(FastcollabError, match="not a fastcollab run"):
        load_teacher(str(tmp_path), "cpu")
    with pytest.raises(FastcollabError, match="out of range"):
        load_teacher(f"{teachers['robust']}:3", "cpu")
    with pytest.raises(FastcollabError, match="no peer"):
        load_teacher(f"{teachers['robust']}:nope", "cpu")
    with pytest.raises(FastcollabError, match="classes"):
        load_teacher(str(teachers["robust"]), "cpu", num_classes=100)
    # through the CLI: a distillation method without --teacher is a one-line error, exit status 2
    assert train_main(["--method", "ard", "--dataset", teachers["dataset"], *COMMON,
                       "--out", str(tmp_path / "no-teacher")]) == 2
