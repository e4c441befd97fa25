"""Run configuration: general settings, the method's paper defaults, a YAML file and the command line,
resolved into one flat dict that is saved as ``config.yaml`` beside every run.

Precedence: command line > ``--config FILE.yaml`` > the method's paper defaults (by architecture) > the
general defaults below. A YAML value goes through the same argparse conversion as its flag
(:func:`parse_file_values`). A setting the chosen method does not use is an error, not silently ignored, and
every setting is checked here, before any data is loaded or any step is taken.
"""
from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml

from .attacks import parse_number
from .checkpoint import atomic_write
from .data import FOLDER_DATASETS
from .errors import FastcollabError
from .evaluation import parse_attack, parse_attacks
from .methods import get_method, list_methods
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
    "peer_parallel": False,    # under torchrun: one peer (or replica group) per rank instead of data-parallel
    "sync_bn": False,          # under torchrun on CUDA: SyncBatchNorm in the trainable peers
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
    "allow_large_eps": False,  # opt-in for budgets above the plausible range (PLAUSIBLE_BUDGET)
    "eval_subset": 512,        # test images attacked by the monitor attack after every epoch
    "monitor_attack": "pgd10",  # the per-epoch monitor: pgd10 or any evaluation attack, e.g. apgd-ce
    "val_split": 0,            # training images held out for model selection (0: none)
    "select": "last",          # last | best-pgd (the epoch with the best validation monitor-attack accuracy)
    "final_eval_size": None,   # test images of the final evaluation (None: the whole test split)
    "final_attacks": "clean,fgsm,pgd20,cw20",
    "eval_batch_size": 256,
    "init": None,              # warm start: PATH for every trainable peer, or p0=PATH,p1=PATH (fastcollab.weights)
    "teacher_model": None,     # architecture of a --teacher checkpoint file
    "teacher_normalize": None,  # input normalisation of a --teacher file without buffers: none|cifar10|MEAN,STD
    "allow_partial_load": False,  # load only the fitting tensors of a --teacher / --init file
    "model_dir": None,         # --teacher robustbench:NAME reads MODEL_DIR/cifar10/Linf/NAME.pt
}
# keys set from the method's defaults but that every method has
ATTACK_AND_OPTIM = ("epochs", "lr", "weight_decay", "lr_drops", "eps", "step", "attack_steps",
                    "attack_init", "attack_bn")
# settings of the training attack only: an error for a method that trains on clean images (``--eps`` stays:
# it also sets the evaluation budget)
TRAINING_ATTACK = ("step", "attack_steps", "attack_init", "attack_bn", "attack_objective")
# not part of the saved configuration (how to run, not what to run)
TRANSIENT = ("resume", "config", "progress", "overwrite", "re_evaluate", "verbose")
# written into a run's config.yaml by the run itself: ignored when that file is reused as --config
DERIVED = ("num_classes", "image_size")
#: above these a budget is almost surely a unit slip (8 instead of 8/255): an error unless --allow-large-eps.
#: l_inf: the whole [0, 1] pixel range; l2 / l1: 20× MAT-MP's 0.5 / 12 (Maini et al.'s CIFAR-10 budgets)
PLAUSIBLE_BUDGET = {"linf": 1.0, "l2": 10.0, "l1": 255.0}


def read_yaml(path: str | Path, flag: str = "--config") -> dict:
    """The mapping of a YAML file given with ``flag``; keys with ``-`` read as ``_``."""
    path = Path(path)
    if not path.is_file():
        raise FastcollabError(f"config file {path} does not exist: pass an existing YAML file to {flag}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FastcollabError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}): fix it") from None
    if not isinstance(data, dict):
        raise FastcollabError(f"config file {path} must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def write_yaml(path: Path, config: Mapping[str, Any]) -> None:
    text = yaml.safe_dump(dict(config), sort_keys=True)
    atomic_write(Path(path), lambda f: f.write(text.encode()))


# ------------------------------------------------------------------------------------ one parser, two sources
class RaisingParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`FastcollabError` (one line, no usage dump), with the
    closest valid option suggested for a mistyped one. Abbreviated options are not accepted (``--lr-drop``
    is a typo, not ``--lr-drops``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            first = message.split(":", 1)[1].split()[0].split("=")[0]
            message += closest_hint(first, [s for a in self._actions for s in a.option_strings])
        raise FastcollabError(f"{message}: see python -m {self.prog.split()[-1]} --help")


def closest_hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _options_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option by its setting key (``dest``) and by its long flag spelled as a key (``step_size``)."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if not long or action.dest == "help":
            continue
        keys.setdefault(action.dest, action)
        for flag in long:
            keys.setdefault(flag[2:].replace("-", "_"), action)
    return keys


def parse_file_values(parser: argparse.ArgumentParser, raw: Mapping[str, Any], source: str | Path) -> dict:
    """Run a YAML file's values through ``parser``, exactly as if each had been typed as its flag: ``lr: 1e-2``,
    ``eps: 8/255``, ``lr_drops: 2,3`` and ``peer_methods: trades,alp`` work as on the command line (and YAML
    numbers, lists and booleans too). An error names the file and the key."""
    options = _options_by_key(parser)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in DERIVED or value is None:
            continue
        action = options.get(key)
        if action is None:
            raise FastcollabError(f"config file {source}: unknown key {key!r}{closest_hint(key, options)}: fix or "
                                  "drop it (keys are the long options of python -m fastcollab.train --help)")
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if action.nargs == 0:  # a switch: store_true / store_false
            if not isinstance(value, bool):
                raise FastcollabError(f"config file {source}, key {key}: expected true or false, got {value!r}")
            if key == action.dest:
                values[action.dest] = value
            elif value:
                values[action.dest] = action.const
            continue
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        try:
            parsed = parser.parse_args([f"{flag}={text}"])
        except FastcollabError as e:
            raise FastcollabError(f"config file {source}, key {key}: {e}") from None
        values[action.dest] = getattr(parsed, action.dest)
    return values


# ------------------------------------------------------------------------------------------- resolution
def resolve_config(given: Mapping[str, Any], file_values: Mapping[str, Any] | None = None,
                   source: str | Path | None = None) -> dict[str, Any]:
    """Merge general defaults, the method's paper defaults, a config file (``source``) and the explicitly
    ``given`` settings (those the user typed: ``None`` means not given), then check the result."""
    from_file = {k: v for k, v in (file_values or {}).items() if k not in DERIVED}
    user = {**from_file, **{k: v for k, v in given.items() if v is not None}}
    origin = {k: source or "the config file" for k in from_file if k not in given or given[k] is None}
    for k in ("eps", "step"):  # a YAML file read without the parser may write budgets as papers do: 8/255
        if isinstance(user.get(k), str):
            user[k] = parse_number(user[k], f"{k} in the config file")
    method_name = user.get("method", GENERAL["method"])
    model = user.get("model", GENERAL["model"])
    method_cls = get_method(method_name)
    method_defaults = method_cls.defaults_for(model, user.get("dataset", GENERAL["dataset"]))

    allowed = set(GENERAL) | set(method_defaults) | set(TRANSIENT)
    unknown = sorted(k for k in user if k not in allowed)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        users = [m for m in list_methods() if all(k in get_method(m).defaults_for(model) for k in unknown)]
        hint = f" ({', '.join(users)} use{'s' if len(users) == 1 else ''} it)" if users else ""
        raise FastcollabError(_from(origin, unknown[0], f"method {method_name} does not take {flags}{hint}: drop "
                                    "it, or choose a method that uses it (python -m fastcollab.train --help "
                                    "lists them)"))
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
    check_general(config, origin)
    check_applies(config, user, origin)
    config.update(absolute_paths(config))
    return config


def _from(origin: Mapping[str, Any], key: str, message: str) -> str:
    """``message``, prefixed by the file and key when ``key``'s value came from a config file."""
    return f"config file {origin[key]}, key {key}: {message}" if key in origin else message


def flag_of(key: str) -> str:
    return "--step-size" if key == "step" else "--" + key.replace("_", "-")


def check_applies(c: Mapping[str, Any], user: Mapping[str, Any], origin: Mapping[str, Any] = {}) -> None:
    """A flag the run would not use is an error, for every method (the README's promise)."""
    def refuse(keys: tuple[str, ...], why: str, fix: str):
        given = [k for k in keys if k in user]
        if given:
            flags = ", ".join(flag_of(k) for k in given)
            raise FastcollabError(_from(origin, given[0], f"{flags} {'does' if len(given) == 1 else 'do'} not "
                                                          f"apply: {why}; {fix}"))

    if not get_method(c["method"])(c).attacks():
        refuse(TRAINING_ATTACK, f"method {c['method']} trains without an attack",
               "drop it (--eps still sets the evaluation budget)")
    if not c["amp"]:
        refuse(("amp_dtype",), "mixed precision is off", "add --amp, or drop it")
    if c["schedule"] == "cosine":
        refuse(("lr_drops",), "the cosine schedule has no drops", "drop it, or pass --schedule piecewise")
    if str(c["dataset"]).strip().lower() not in FOLDER_DATASETS:
        refuse(("data_dir",), f"dataset {c['dataset']} is not read from a data folder",
               "drop it (it is where cifar10 / cifar100 / svhn / tiny-imagenet live)")


def check_budget(norm: str, value: float, flag: str, allow_large: bool) -> None:
    """A budget above :data:`PLAUSIBLE_BUDGET` for its norm is an error unless deliberately allowed."""
    limit = PLAUSIBLE_BUDGET.get(norm, math.inf)
    if value > limit and not allow_large:
        fix = "e.g. 8/255 (images are in [0, 1])" if norm == "linf" else f"e.g. MAT-MP's {norm} budgets"
        name = {"linf": "l_inf"}.get(norm, norm)
        raise FastcollabError(f"{flag} {value:g} is implausible for an {name} budget (above {limit:g}): write it "
                              f"as a fraction of the pixel range, {fix}; or pass --allow-large-eps if it is "
                              "deliberate")


def check_sizes(**sizes: tuple[Any, int]) -> None:
    """``flag=(value, minimum)``: whole numbers >= minimum (``None`` passes: the default)."""
    for flag, (value, least) in sizes.items():
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise FastcollabError(f"--{flag.replace('_', '-')} must be a whole number >= {least}, got {value!r}")


def check_general(c: Mapping[str, Any], origin: Mapping[str, Any] = {}) -> None:
    def need(key: str, ok: bool, msg: str):
        if not ok:
            raise FastcollabError(_from(origin, key, msg))

    need("epochs", isinstance(c["epochs"], int) and c["epochs"] >= 1,
         f"--epochs must be a whole number >= 1, got {c['epochs']}")
    need("batch_size", isinstance(c["batch_size"], int) and c["batch_size"] >= 1,
         f"--batch-size must be >= 1, got {c['batch_size']}")
    need("lr", c["lr"] > 0, f"--lr must be > 0, got {c['lr']}")
    need("weight_decay", c["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {c['weight_decay']}")
    need("momentum", 0 <= c["momentum"] < 1, f"--momentum must lie in [0, 1), got {c['momentum']}")
    need("eps", c["eps"] >= 0, f"--eps must be >= 0, got {c['eps']}: pass e.g. --eps 8/255")
    need("step", c["step"] > 0, f"--step-size must be > 0, got {c['step']}: pass e.g. --step-size 2/255")
    need("attack_steps", isinstance(c["attack_steps"], int) and c["attack_steps"] >= 1,
         f"--attack-steps must be a whole number >= 1, got {c['attack_steps']}")
    need("eval_subset", isinstance(c["eval_subset"], int) and c["eval_subset"] >= 1,
         f"--eval-subset must be a whole number >= 1, got {c['eval_subset']}")
    need("final_eval_size", c["final_eval_size"] is None or (isinstance(c["final_eval_size"], int)
                                                             and c["final_eval_size"] >= 1),
         f"--final-eval-size must be a whole number >= 1 (or left out for the whole test split), got "
         f"{c['final_eval_size']}")
    need("val_split", isinstance(c["val_split"], int) and c["val_split"] >= 0,
         f"--val-split must be a whole number >= 0 (training images held out), got {c['val_split']}")
    need("select", c["select"] in ("last", "best-pgd"), f"--select must be last or best-pgd, got {c['select']!r}")
    need("select", c["select"] == "last" or c["val_split"] > 0,
         "--select best-pgd needs held-out training images to select on (never the test set): add e.g. "
         "--val-split 1000")
    need("eval_batch_size", isinstance(c["eval_batch_size"], int) and c["eval_batch_size"] >= 1,
         f"--eval-batch-size must be a whole number >= 1, got {c['eval_batch_size']}")
    need("device", c["device"] in ("auto", "cpu", "cuda") or str(c["device"]).startswith("cuda:"),
         f"--device must be auto, cpu or cuda[:N], got {c['device']!r}")
    allow = bool(c.get("allow_large_eps"))
    norm = c.get("norm", "linf")
    for key in ("eps", "step"):
        try:
            check_budget(norm, c[key], flag_of(key), allow)
        except FastcollabError as e:
            raise FastcollabError(_from(origin, key, str(e))) from None
    if "specialist_norms" in c and "specialist_eps" in c:  # MAT-MP: one budget per specialist norm
        for key in ("specialist_eps", "specialist_step_sizes"):
            for n, value in zip(c["specialist_norms"], c.get(key) or []):
                check_budget(n, float(value), flag_of(key), allow)
    try:
        parse_attacks(c["final_attacks"])
    except FastcollabError as e:
        raise FastcollabError(_from(origin, "final_attacks", f"--final-attacks: {e}")) from None
    try:
        monitor_attack(c)
    except FastcollabError as e:
        raise FastcollabError(_from(origin, "monitor_attack", f"--monitor-attack: {e}")) from None


# the standard AutoAttack logs pages and takes minutes per peer: an evaluation, not a per-epoch monitor
NOT_MONITORS = ("clean", "aa", "aa-lite")


def monitor_attack(c: Mapping[str, Any]):
    """The per-epoch monitor attack of a run (``--monitor-attack``) as an evaluation attack in the training
    threat model (l_inf, the training eps; PGD step eps/4). ``pgd10`` by default; ``apgd-ce`` runs
    fastcollab's APGD over the whole cohort at once (:mod:`fastcollab.apgd`)."""
    name = str(c["monitor_attack"]).strip().lower()
    if name in NOT_MONITORS:
        raise FastcollabError(f"{name!r} cannot be the per-epoch monitor: pass one white-box attack, e.g. pgd10 "
                              "or apgd-ce (run the standard AutoAttack with --final-attacks or evaluate)")
    return parse_attack(name, eps=c["eps"])


def absolute_paths(c: Mapping[str, Any]) -> dict[str, Any]:
    """The run's input paths made absolute (``npz:PATH``, ``--data-dir``, ``--teacher RUN[:K]``, ``--init``), so
    that its ``config.yaml`` works from any folder (``evaluate``, ``--resume``)."""
    def absolute(text: str) -> str:
        head, sep, tail = text.rpartition(":")
        if sep and tail.isdigit() and Path(head).expanduser().exists():  # RUN_DIR:K
            return f"{Path(head).expanduser().resolve()}:{tail}"
        return str(Path(text).expanduser().resolve()) if Path(text).expanduser().exists() else text

    out = {}
    kind, sep, arg = str(c["dataset"]).partition(":")
    if kind.strip().lower() == "npz" and sep and arg:
        out["dataset"] = f"{kind}:{absolute(arg)}"
    if c.get("data_dir"):
        out["data_dir"] = str(Path(c["data_dir"]).expanduser().resolve())
    if isinstance(c.get("teacher"), str):
        out["teacher"] = absolute(c["teacher"])
    if isinstance(c.get("init"), str):  # PATH, or p0=PATH,p1=PATH
        out["init"] = ",".join(f"{name}{eq}{absolute(path)}" for name, eq, path in
                               (part.rpartition("=") for part in c["init"].split(",")))
    return out


def pick_device(name: str | torch.device, what: str = "--device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]`` (or a ``torch.device``) as a usable device, or one clear error."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise FastcollabError(f"{what} {name!r} is not a device: use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastcollabError(f"{what} {name} was asked for but no CUDA GPU is visible: use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FastcollabError(f"{what} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible: "
                              "use cuda:0")
    return device
