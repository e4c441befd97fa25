"""Configuration: precedence, the paper defaults by architecture, scaled schedules, YAML files."""
from __future__ import annotations

import pytest

from fastcollab.config import read_yaml, resolve_config, write_yaml
from fastcollab.errors import FastcollabError
from fastcollab.schedule import LRSchedule


def test_paper_defaults_depend_on_the_architecture():
    small = resolve_config({"method": "mat", "model": "resnet18"})
    wide = resolve_config({"method": "mat", "model": "wrn-34-10"})
    assert (small["lr"], small["weight_decay"], small["epochs"]) == (0.01, 3.5e-3, 120)
    assert (wide["lr"], wide["weight_decay"]) == (0.1, 7e-4)
    assert small["alpha"] == 0.6 and small["lr_drops"] == [75, 90, 100]
    trades = resolve_config({"method": "trades"})
    assert (trades["eps"], trades["step"], trades["beta"], trades["attack_init"]) == (0.031, 0.007, 6.0, "normal")


def test_short_runs_keep_the_shape_of_the_schedule():
    c = resolve_config({"method": "mat", "model": "smallcnn", "epochs": 12})
    assert c["lr_drops"] == pytest.approx([7.5, 9.0, 10.0])
    sched = LRSchedule("piecewise", c["lr"], c["epochs"], c["lr_drops"])
    assert sched(7.4) == pytest.approx(0.01) and sched(7.5) == pytest.approx(0.001)
    assert sched(10.0) == pytest.approx(1e-5)
    assert resolve_config({"method": "mat", "epochs": 12, "lr_drops": [6]})["lr_drops"] == [6]
    cos = LRSchedule("cosine", 0.1, 10)
    assert cos(0) == pytest.approx(0.1) and cos(5) == pytest.approx(0.05) and cos(10) == pytest.approx(0.0)


def test_yaml_file_is_below_the_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: at\neps: 4/255\nattack-steps: 7\nlr: 0.2\n")
    c = resolve_config({"lr": 0.05}, read_yaml(f))
    assert c["method"] == "at" and c["eps"] == pytest.approx(4 / 255) and c["attack_steps"] == 7
    assert c["lr"] == 0.05
    write_yaml(tmp_path / "saved.yaml", c)
    assert read_yaml(tmp_path / "saved.yaml") == c


def test_config_file_errors(tmp_path):
    with pytest.raises(FastcollabError, match="does not exist"):
        read_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [at\n")
    with pytest.raises(FastcollabError, match="not valid YAML"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- at\n- mat\n")
    with pytest.raises(FastcollabError, match="mapping"):
        read_yaml(listy)
    with pytest.raises(FastcollabError, match="does not take --temperature"):
        resolve_config({"method": "trades"}, {"temperature": 2.0})


def test_attack_objective_override_is_an_ablation_switch():
    from fastcollab.methods import get_method

    paper = get_method("mat")(resolve_config({"method": "mat"}))
    assert {a.spec.objective for a in paper.attacks()} == {"bce"}
    ablated = get_method("mat")(resolve_config({"method": "mat", "attack_objective": "ce"}))
    assert {a.spec.objective for a in ablated.attacks()} == {"ce"}
