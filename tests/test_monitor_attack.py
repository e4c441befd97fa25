"""--monitor-attack: the per-epoch monitor runs the evaluation's attacks (APGD-CE over the whole cohort), records
what it ran and how long it took, selects best.pt by it, never changes the training, and refuses bad names."""
from __future__ import annotations

import json

import pytest
import torch

from fastcollab import load_cohort, train
from fastcollab.checkpoint import best_of, load_checkpoint
from fastcollab.data import load_dataset
from fastcollab.evaluation import parse_attack
from fastcollab.evaluation.runner import Partial, run_attacks

BASE = ["--model", "smallcnn", "--dataset", "synthetic:96", "--batch-size", "32", "--attack-steps", "2",
        "--engine", "eager", "--eval-subset", "24", "--final-eval-size", "8", "--final-attacks", "clean",
        "--no-progress"]


def _train(out, *argv) -> list[dict]:
    assert train.main([*BASE, "--out", str(out), *argv]) == 0
    return [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]


def test_apgd_ce_monitor_is_the_evaluations_apgd_on_the_monitored_images(tmp_path):
    out = tmp_path / "mat"
    records = _train(out, "--method", "mat", "--epochs", "2", "--monitor-attack", "apgd-ce")
    for r in records:
        assert r["monitor_attack"] == "apgd-ce" and r["monitor"] == "test" and r["eval_subset"] == 24
        assert r["monitor_time_s"] > 0
        for acc in r["peers"].values():
            assert "pgd10_acc" not in acc
            assert 0 <= acc["apgd-ce_acc"] <= acc["clean_acc"] <= 100
    # the last epoch's monitor numbers are exactly fastcollab.evaluate's APGD-CE on the same images and seed
    data = load_dataset("synthetic:96")
    models = dict(zip(["p0", "p1"], load_cohort(out)))
    attack = parse_attack("apgd-ce", eps=8 / 255)
    again = run_attacks(models, data.x_test[:24], data.y_test[:24], [attack], batch_size=256, seed=0,
                        device="cpu", partial=Partial(None, {}), progress=False)
    for name, correct in again["correct"]["apgd-ce"].items():
        assert records[-1]["peers"][name]["apgd-ce_acc"] == pytest.approx(100.0 * float(correct.float().mean()))
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_monitoring_never_changes_the_training(tmp_path):
    """The monitor's random starts come from its own seed in a forked RNG: the weights after two epochs are the
    same whichever attack monitored them."""
    weights = {}
    for monitor in ("pgd10", "apgd-ce"):
        _train(tmp_path / monitor, "--method", "at", "--epochs", "2", "--monitor-attack", monitor)
        weights[monitor] = load_checkpoint(tmp_path / monitor / "checkpoint.pt")["models"]["p0"]
    for key, value in weights["pgd10"].items():
        assert torch.equal(value, weights["apgd-ce"][key]), key


def test_best_pgd_selects_by_the_monitor_attack():
    records = [{"epoch": e, "monitor": "val", "monitor_attack": "apgd-ce",
                "peers": {"p0": {"clean_acc": 50.0, "apgd-ce_acc": acc, "pgd10_acc": 100 - acc}}}
               for e, acc in [(1, 10.0), (2, 30.0), (3, 20.0)]]
    assert best_of(records) == (2, 30.0)
    old = [{"epoch": 1, "monitor": "val", "peers": {"p0": {"pgd10_acc": 12.5}}}]  # written before the flag
    assert best_of(old) == (1, 12.5)


@pytest.mark.parametrize("name, message", [
    ("aa", "cannot be the per-epoch monitor"),
    ("clean", "cannot be the per-epoch monitor"),
    ("apgd-cee", "apgd-ce"),
])
def test_bad_monitor_attacks_are_refused_before_training(tmp_path, capsys, name, message):
    out = tmp_path / "run"
    code = train.main([*BASE, "--method", "at", "--epochs", "1", "--monitor-attack", name, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--monitor-attack" in err and message in err
    assert not (out / "checkpoint.pt").exists()


def test_resume_keeps_the_monitor_attack(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "--method", "at", "--epochs", "1")
    code = train.main([*BASE, "--method", "at", "--epochs", "1", "--monitor-attack", "apgd-ce", "--out", str(out),
                       "--resume"])
    assert code == 2 and "monitor_attack='pgd10'" in capsys.readouterr().err
