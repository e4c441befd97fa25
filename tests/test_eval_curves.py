"""Evaluation at scale and its outputs: best-iterate PGD, attack names and bad input, the seeded subset,
resume per attack, and ``python -m fastcollab.evaluate`` writing the checks block and the ε curves."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastcollab.errors import FastcollabError
from fastcollab.evaluation import parse_attacks, pgd_best_iterate, robust_under
from fastcollab.evaluation import runner
from fastcollab.evaluation.runner import evaluate_suite, pick_subset


def small_net(classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, classes)).eval()


def test_best_iterate_counts_any_misclassified_iterate():
    model = small_net()
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    (attack,) = parse_attacks("pgd6", eps=16 / 255)
    from fastcollab.attacks import pgd

    torch.manual_seed(1)
    robust, x_adv = pgd_best_iterate(model, x, y, attack.spec)
    torch.manual_seed(1)
    final_correct = model(pgd(model, x, y, attack.spec)).argmax(1) == y
    # the same trajectories: an example robust to every iterate is right at the last one, never the reverse
    assert bool((final_correct | ~robust).all())
    assert bool((model(x_adv).argmax(1) == y)[~robust].logical_not().all())   # x_adv: a misclassified iterate
    assert (x_adv - x).abs().max() <= 16 / 255 + 1e-6
    (restarts,) = parse_attacks("pgd6x3", eps=16 / 255)
    assert restarts.restarts == 3 and restarts.describe()["restarts"] == 3
    assert int(robust_under(model, x, y, restarts)[0].sum()) <= int(robust.sum()) + 2


def test_attack_names_and_bad_input():
    names = {a.name: a for a in parse_attacks("apgd-ce,apgd-t,aa-fast,aa,aa-lite,pgd20", norm="l2")}
    assert names["aa"].norm == "l2" and names["aa"].eps == 0.5 and names["pgd20"].spec.norm == "l2"
    assert names["aa-lite"].describe() == {"name": "aa-lite", "attack": "aa-lite", "norm": "l2", "eps": 0.5}
    assert parse_attacks("pgd20")[0].spec.eps == 8 / 255 and parse_attacks("pgd20")[0].spec.step == 2 / 255
    with pytest.raises(FastcollabError, match="did you mean 'apgd-ce'"):
        parse_attacks("apgd-cee")
    with pytest.raises(FastcollabError, match="did you mean 8/255"):
        parse_attacks("pgd20", eps=8)
    with pytest.raises(FastcollabError, match="listed twice"):
        parse_attacks("pgd20,pgd20")


def test_too_few_classes_for_dlr_fails_before_any_attack(monkeypatch):
    ran = []
    monkeypatch.setattr(runner, "evaluate_slice", lambda *a, **k: ran.append(1))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 2, (4,))
    for name, classes, message in (("apgd-t", 2, "at least 3 classes"), ("aa-fast", 3, "at least 4 classes")):
        with pytest.raises(FastcollabError, match=message):
            evaluate_suite({"m": small_net(classes)}, x, y, parse_attacks(f"clean,{name}"), num_classes=classes,
                           norm="linf", eps=8 / 255, check_n=0)
    assert ran == []


def test_subset_is_seeded_and_recorded():
    a, info = pick_subset(100, 10, seed=3)
    b, _ = pick_subset(100, 10, seed=3)
    c, _ = pick_subset(100, 10, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and len(set(a.tolist())) == 10
    assert info["random_subset"] and info["seed"] == 3 and len(info["indices_sha1"]) == 40
    full, info = pick_subset(100, None, seed=3)
    assert torch.equal(full, torch.arange(100)) and info["seed"] is None


def test_a_killed_evaluation_resumes_per_attack(tmp_path, monkeypatch):
    model = small_net()
    x, y = (torch.rand(12, 3, 8, 8) * 255).to(torch.uint8), torch.randint(0, 10, (12,))
    attacks = parse_attacks("clean,pgd3,cw3")
    partial = tmp_path / "eval.json.partial"
    calls = []
    real = runner.evaluate_slice

    def dies_at_cw(models, xs, ys, attack, **kw):
        calls.append(attack.name)
        if attack.name == "cw3":
            raise KeyboardInterrupt
        return real(models, xs, ys, attack, **kw)

    monkeypatch.setattr(runner, "evaluate_slice", dies_at_cw)
    kw = dict(num_classes=10, norm="linf", eps=8 / 255, check_n=0, partial_path=partial, fingerprint={"run": "x"})
    with pytest.raises(KeyboardInterrupt):
        evaluate_suite({"m": model}, x, y, attacks, **kw)
    assert set(json.loads(partial.read_text())["attacks"]) == {"clean", "pgd3"}
    monkeypatch.setattr(runner, "evaluate_slice", lambda *a, **k: (calls.append(a[3].name), real(*a, **k))[1])
    calls.clear()
    report = evaluate_suite({"m": model}, x, y, attacks, **kw)
    assert calls == ["cw3"] and not partial.exists()
    assert set(report["peers"]["m"]) == {"clean", "pgd3", "cw3"}
    fresh = evaluate_suite({"m": model}, x, y, attacks, **{**kw, "partial_path": None})
    assert fresh["peers"] == report["peers"]          # the same numbers as an uninterrupted evaluation


def test_evaluate_cli_writes_checks_and_eps_curves(tmp_path, capsys):
    from conftest import train_cli

    from fastcollab.evaluate import main as eval_main
    run = tmp_path / "at"
    train_cli("--method", "at", "--model", "smallcnn", "--dataset", "synthetic:64", "--epochs", "1",
              "--batch-size", "32", "--attack-steps", "1", "--eps", "4/255", "--eval-subset", "6",
              "--final-eval-size", "8", "--final-attacks", "clean,pgd2", "--out", str(run))
    final = json.loads((run / "final.json").read_text())
    assert final["threat_model"] == {"norm": "linf", "eps": 8 / 255} and final["train_eps"] == 4 / 255
    assert "checks" in final and (run / "final_eps_curves.png").stat().st_size > 1000
    capsys.readouterr()
    assert eval_main(["--run", str(run), "--attacks", "clean,fgsm,pgd3,apgd-ce", "--n", "10", "--check-n", "6",
                      "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "threat model linf eps 8/255 (training eps 4/255)" in out and "checks on 6 images" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["test_set"]["n"] == 10 and report["test_set"]["random_subset"]
    assert report["attacks"]["apgd-ce"]["meta"]["steps"] == 100
    assert set(report["time_s"]) == {"clean", "fgsm", "pgd3", "apgd-ce"}
    sweep = report["eps_sweep"]["p0"]["linf"]
    assert len(sweep["accuracy"]) == 7 and sweep["n"] == 6
    assert {c["name"] for c in report["checks"]["peers"]["p0"]} >= {"logits", "eps_sweep", "degenerate"}
    assert (run / "eval_eps_curves.png").stat().st_size > 1000
    assert not (run / "eval.json.partial").exists()
    for args, message in ((["--attacks", "pgd20,apgd-cee"], "did you mean 'apgd-ce'"),
                          (["--eps", "8"], "did you mean 8/255"),
                          (["--norm", "l2", "--eps", "100"], "does not fit l2")):
        assert eval_main(["--run", str(run), *args, "--device", "cpu", "--json", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.json.partial").exists()


def test_standard_autoattack_without_the_extra_is_one_clear_error(monkeypatch):
    import fastcollab.aa_standard as aa_standard

    monkeypatch.setattr(aa_standard, "autoattack_available", lambda: False)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(FastcollabError, match=r'pip install "fastcollab\[autoattack\]"'):
        evaluate_suite({"m": small_net()}, x, y, parse_attacks("clean,aa"), num_classes=10, norm="linf",
                       eps=8 / 255, check_n=0)


def _sharded_worker(rank, tmp):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        x, y = (torch.rand(11, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8), \
            torch.randint(0, 10, (11,), generator=torch.Generator().manual_seed(1))
        report = evaluate_suite({"a": small_net(), "b": small_net()}, x, y, parse_attacks("clean,fgsm,pgd3"),
                                num_classes=10, norm="linf", eps=8 / 255, check_n=4, progress=False,
                                partial_path=__import__("pathlib").Path(tmp) / "eval.json.partial")
        torch.save(report, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    x, y = (torch.rand(11, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8), \
        torch.randint(0, 10, (11,), generator=torch.Generator().manual_seed(1))
    one = evaluate_suite({"a": small_net(), "b": small_net()}, x, y, parse_attacks("clean,fgsm,pgd3"),
                         num_classes=10, norm="linf", eps=8 / 255, check_n=0, progress=False)
    assert r0["peers"] == r1["peers"] and r0["checks"] == r1["checks"]
    for peer in ("a", "b"):   # exact shards (5 + 6 images, none repeated): the deterministic attacks agree
        assert r0["peers"][peer]["clean"] == one["peers"][peer]["clean"]
        assert r0["peers"][peer]["fgsm"] == one["peers"][peer]["fgsm"]
    assert r0["discrepancy"] == pytest.approx(one["discrepancy"])
    assert not (tmp_path / "eval.json.partial").exists()
