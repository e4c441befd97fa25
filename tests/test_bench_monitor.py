"""bench.monitor: the cost of one per-epoch monitor per attack, measured as Trainer.monitor_epoch runs it."""
from __future__ import annotations

import json

from bench import monitor


def test_bench_monitor_times_each_attack_and_reports_accuracy(nat_run, tmp_path, capsys):
    path = tmp_path / "monitor.json"
    capsys.readouterr()  # the nat_run fixture's own output
    assert monitor.main(["--run", str(nat_run), "--n", "16", "--repeats", "1", "--device", "cpu",
                         "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result == json.JSONDecoder().raw_decode(capsys.readouterr().out)[0]  # printed, then "written: ..."
    assert result["n"] == 16 and set(result["time_s"]) == {"pgd10", "apgd-ce"}
    assert all(t > 0 for t in result["time_s"].values())
    assert result["ratio_to_pgd10"]["pgd10"] == 1.0
    for attack in ("pgd10", "apgd-ce"):
        for peer, acc in result["accuracy"][attack].items():
            assert 0 <= acc <= result["accuracy"]["clean"][peer] <= 100
