"""Run configuration: general settings, the method's paper defaults, a YAML file and the command line,
resolved into one flat dict that is saved as ``config.yaml`` beside every run.

Precedence: command line > ``--config FILE.yaml`` > the method's paper defaults (by architecture) > the
general defaults below. A setting the chosen method does not use is an error, not silently ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from .attacks import parse_number
from .errors import FastcollabError
from .methods import get_method
from .schedule import scaled_drops

# settings every run has; method hyper-parameters come from the method's ``defaults``
GENERAL: dict[str, Any] = {
    "method": "mat",
    "model": "resnet18",
    "dataset": "cifar10",
    "data_dir": None,
    "epochs": None,            # the method's paper default
    "batch_size": 128,
    "amp": False,
    "amp_dtype": "bf16",
    "out": None,
    "seed": 0,
    "device": "auto",
    "engine": "auto",
    "view_bn": "eval",
    "normalize": False,
    "momentum": 0.9,
    "nesterov": False,
    "schedule": "piecewise",
    "lr": None,
    "weight_decay": None,
    "lr_drops": None,
    "eps": None,
    "step": None,
    "attack_steps": None,
    "attack_init": None,
    "attack_bn": None,
    "attack_objective": None,  # None: the method's own (e.g. MAT's boosted CE); else overrides every attack
    "eval_subset": 512,        # test images attacked with PGD-10 after every epoch
    "final_eval_size": None,   # test images of the final evaluation (None: the whole test split)
    "final_attacks": "clean,fgsm,pgd20,cw20",
    "eval_batch_size": 256,
}
# keys set from the method's defaults but that every method has
ATTACK_AND_OPTIM = ("epochs", "lr", "weight_decay", "lr_drops", "eps", "step", "attack_steps",
                    "attack_init", "attack_bn")
# not part of the saved configuration (how to run, not what to run)
TRANSIENT = ("resume", "config", "progress")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FastcollabError(f"config file {path} does not exist: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FastcollabError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}): fix it") from None
    if not isinstance(data, dict):
        raise FastcollabError(f"config file {path} must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def write_yaml(path: Path, config: Mapping[str, Any]) -> None:
    Path(path).write_text(yaml.safe_dump(dict(config), sort_keys=True))


def resolve_config(given: Mapping[str, Any], file_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge general defaults, the method's paper defaults, a config file and the explicitly ``given``
    settings (those the user typed: ``None`` means not given)."""
    user = {**(file_values or {}), **{k: v for k, v in given.items() if v is not None}}
    for k in ("eps", "step"):  # a YAML file may write budgets as papers do: 8/255
        if isinstance(user.get(k), str):
            user[k] = parse_number(user[k], f"{k} in the config file")
    method_name = user.get("method", GENERAL["method"])
    model = user.get("model", GENERAL["model"])
    method_cls = get_method(method_name)
    method_defaults = method_cls.defaults_for(model)

    allowed = set(GENERAL) | set(method_defaults) | set(TRANSIENT)
    unknown = sorted(k for k in user if k not in allowed)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise FastcollabError(f"method {method_name} does not take {flags}: drop it, or choose a method that "
                              f"uses it (python -m fastcollab.train --help lists them)")
    config = {**GENERAL, **method_defaults, **user}
    for k in TRANSIENT:
        config.pop(k, None)
    # a shorter (or longer) run than the paper's keeps the shape of its schedule
    if "lr_drops" not in user:
        config["lr_drops"] = scaled_drops(method_defaults.get("lr_drops", []),
                                          method_defaults.get("epochs", config["epochs"]), config["epochs"])
    for k in ATTACK_AND_OPTIM:
        if config.get(k) is None:
            raise FastcollabError(f"method {method_name} has no default for {k}: pass --{k.replace('_', '-')}")
    check_general(config)
    return config


def check_general(c: Mapping[str, Any]) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise FastcollabError(msg)

    need(isinstance(c["epochs"], int) and c["epochs"] >= 1, f"--epochs must be a whole number >= 1, got {c['epochs']}")
    need(isinstance(c["batch_size"], int) and c["batch_size"] >= 1, f"--batch-size must be >= 1, got {c['batch_size']}")
    need(c["lr"] > 0, f"--lr must be > 0, got {c['lr']}")
    need(c["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {c['weight_decay']}")
    need(0 <= c["momentum"] < 1, f"--momentum must lie in [0, 1), got {c['momentum']}")
    need(c["eps"] >= 0, f"--eps must be >= 0, got {c['eps']}: pass e.g. --eps 8/255")
    need(c["step"] > 0, f"--step-size must be > 0, got {c['step']}: pass e.g. --step-size 2/255")
    need(isinstance(c["attack_steps"], int) and c["attack_steps"] >= 1,
         f"--attack-steps must be a whole number >= 1, got {c['attack_steps']}")
    need(c["eval_subset"] >= 0, f"--eval-subset must be >= 0, got {c['eval_subset']}")
    need(c["device"] in ("auto", "cpu", "cuda") or str(c["device"]).startswith("cuda:"),
         f"--device must be auto, cpu or cuda[:N], got {c['device']!r}")
