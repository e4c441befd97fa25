"""fastcollab.study: methods × seeds, resumed, aggregated as mean ± std; bad specs refused before any run."""
import json

import pytest

from fastcollab import study

COMMON = ("--model smallcnn --dataset synthetic:96 --epochs 1 --batch-size 32 "
          "--eval-subset 8 --final-eval-size 16 --final-attacks clean,pgd2 --engine eager")


def run_study(tmp_path, *extra):
    return study.main(["--out", str(tmp_path / "s"), "--common", COMMON, "--seeds", "0,1",
                       "--variant", "nat=--method nat", "--variant", "at=--method at --attack-steps 1", *extra])


def test_study_runs_resumes_and_aggregates(tmp_path, capsys):
    assert run_study(tmp_path) == 0
    out = tmp_path / "s"
    result = json.loads((out / study.RESULTS_JSON).read_text())
    assert result["runs"] == {"nat/seed0": "ok", "nat/seed1": "ok", "at/seed0": "ok", "at/seed1": "ok"}
    assert list(result["runs"]) == ["nat/seed0", "at/seed0", "nat/seed1", "at/seed1"]  # seed-major order
    for variant in ("nat", "at"):
        entry = result["table"][variant]
        assert entry["seeds"] == [0, 1]
        clean = entry["peers"]["p0"]["clean"]
        finals = [json.loads((out / variant / f"seed{s}" / "final.json").read_text())["peers"]["p0"]["clean"]
                  for s in (0, 1)]
        assert clean == finals
        summary = entry["summary"]["p0"]["clean"]
        assert summary["n"] == 2 and summary["mean"] == pytest.approx(sum(finals) / 2)
        assert summary["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    md = (out / study.RESULTS_MD).read_text()
    assert "| at | p0 | 2 |" in md and "±" in md
    assert (out / study.RESULTS_PNG).stat().st_size > 0
    # the same command again trains nothing
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/seed*/checkpoint.pt")}
    capsys.readouterr()
    assert run_study(tmp_path) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime for p in out.glob("*/seed*/checkpoint.pt")}
    # `--out` alone reports the saved study; a run without its final.json is not averaged in
    (out / "at" / "seed1" / "final.json").unlink()
    assert study.main(["--out", str(out), "--report-only"]) == 1
    report = json.loads((out / study.RESULTS_JSON).read_text())
    assert report["runs"]["at/seed1"] == "not run" and report["table"]["at"]["seeds"] == [0]
    assert report["table"]["nat"]["seeds"] == [0, 1]


@pytest.mark.parametrize("argv, message", [
    (["--variant", "at=--lr 0.1"], "has no --method"),
    (["--variant", "at"], "NAME=FLAGS"),
    (["--variant", "at=--method at --seed 3"], "set by the study itself"),
    (["--variant", "at=--method at", "--seeds", "0,0"], "distinct"),
    (["--variant", "at=--method at", "--seeds", "a"], "whole numbers"),
    ([], "at least one --variant"),
])
def test_bad_specs_are_one_line_errors(tmp_path, capsys, argv, message):
    assert study.main(["--out", str(tmp_path / "s"), "--common", COMMON, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s" / "at").exists()


def test_a_changed_budget_is_refused_and_foreign_folders_protected(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert study.main(["--out", str(out), "--common", COMMON, "--variant", "nat=--method nat"]) == 2
    assert "not a fastcollab study" in capsys.readouterr().err
    out2 = tmp_path / "s2"
    study.check_or_save_spec(study.normalise_spec({"common": COMMON, "seeds": [0], "variants": {"nat": "--method nat"},
                                                   "evaluate": "", "jobs": 1}), out2)
    assert study.main(["--out", str(out2), "--common", COMMON + " --lr 0.5", "--variant", "nat=--method nat",
                       "--report-only"]) == 2
    assert "different common/evaluate flags" in capsys.readouterr().err


def test_val_split_selects_the_best_validated_epoch_without_the_test_set(tmp_path):
    """--val-split holds out training images (seeded), the monitor runs on them, --select best-pgd keeps the
    epoch with the best mean validation PGD-10 accuracy: final.json and load_cohort use those weights."""
    import torch

    from fastcollab import load_cohort, train
    from fastcollab.checkpoint import best_of, load_checkpoint

    out = tmp_path / "run"
    argv = ["--method", "at", "--model", "smallcnn", "--dataset", "synthetic:160", "--epochs", "3", "--batch-size",
            "32", "--attack-steps", "1", "--final-eval-size", "16", "--final-attacks", "clean,pgd2", "--engine",
            "eager", "--val-split", "40", "--select", "best-pgd", "--no-progress", "--out", str(out)]
    assert train.main(argv) == 0
    metrics = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["monitor"] for r in metrics] == ["val"] * 3 and all(r["eval_subset"] == 40 for r in metrics)
    epoch, score = best_of(metrics)
    final = json.loads((out / "final.json").read_text())
    assert final["selected_epoch"] == epoch and final["selected_val_robust_acc"] == pytest.approx(score)
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == epoch
    for model, name in zip(load_cohort(out), ["p0"]):
        for k, v in model.state_dict().items():
            assert torch.equal(v, best["models"][name][k])


@pytest.mark.parametrize("argv, message", [
    (["--select", "best-pgd"], "--select best-pgd needs held-out training images"),
    (["--val-split", "-3"], "--val-split must be a whole number >= 0"),
    (["--val-split", "96"], "must leave training images"),
])
def test_bad_selection_settings_are_refused_before_training(tmp_path, capsys, argv, message):
    from fastcollab import train

    out = tmp_path / "run"
    code = train.main(["--method", "nat", "--model", "smallcnn", "--dataset", "synthetic:96", "--epochs", "1",
                       "--no-progress", "--out", str(out), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()
