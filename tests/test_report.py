"""``python -m fastcollab.report``: one table per threat model and test set, Markdown + HTML + scatter plot,
written from real (tiny) runs."""
from __future__ import annotations

import pytest
from conftest import train_cli

from fastcollab.evaluate import main as eval_main
from fastcollab.report import main as report_main

ARGS = ("--model", "smallcnn", "--dataset", "synthetic:64", "--epochs", "1", "--batch-size", "32",
        "--attack-steps", "1", "--eval-subset", "6", "--final-eval-size", "8", "--final-attacks", "clean,pgd20")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for method in ("at", "trades"):
        train_cli("--method", method, *ARGS, "--out", str(root / method))
    return root


def test_report_tables_scatter_and_refusal_to_mix(runs, tmp_path, capsys):
    # the same run evaluated under another eps: its numbers must not share a column with the others
    assert eval_main(["--run", str(runs / "trades"), "--attacks", "clean,pgd20", "--eps", "4/255", "--n", "8",
                      "--check-n", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert report_main([str(runs / "at"), str(runs / "trades"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    tables = [block for block in md.split("\n## ")[1:]]
    assert len(tables) == 2
    header = "| run | source | peer | method | model | epochs | clean | PGD-20 | AA | linf | l2 | l1 | worst | s/epoch | checks |"
    assert all(header in t for t in tables)
    eight = next(t for t in tables if t.startswith("threat model linf ε = 8/255"))
    four = next(t for t in tables if t.startswith("threat model linf ε = 4/255"))
    assert "| at | final.json | p0 | at |" in eight and "| trades | final.json | p0 | trades |" in eight
    assert "eval.json" in four and "eval.json" not in eight
    assert "separate tables" in md and "trades/eval.json" in md
    html = (out / "report.html").read_text()
    assert html.count("<table>") == 2 and "<th>PGD-20</th>" in html
    assert (out / "scatter.png").stat().st_size > 1000


def test_report_bad_input(tmp_path, capsys):
    assert report_main([str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no final.json" in err and len(err.strip().splitlines()) == 1
