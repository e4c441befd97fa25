"""Frozen teachers: a trained model, loaded to guide a student and never updated.

``--teacher`` takes one of:

- ``RUN_DIR``: the first trainable peer of an earlier fastcollab run; ``RUN_DIR:K`` its peer number K (0-based,
  in the run's peer order) or the peer named K (``RUN_DIR:p1``). A ``trades`` or ``at`` run makes a robust
  teacher (ARD, RSLAD, IAD, MMARD), a ``nat`` run a natural one (ADT).
- ``PATH.pt`` / ``PATH.pth`` / ``PATH.safetensors``: a checkpoint of another code base (or a
  ``python -m fastcollab.export``), read by :mod:`fastcollab.weights`; ``--teacher-model NAME`` names its
  architecture (a fastcollab safetensors export records it), ``--teacher-normalize`` its input normalisation
  when the file carries none.
- ``robustbench:NAME`` (or ``robustbench:DATASET/THREAT/NAME``): the file RobustBench keeps for that model,
  ``MODEL_DIR/cifar10/Linf/NAME.pt`` (its folder layout; MODEL_DIR from ``--model-dir``, else ``$MODEL_DIR``,
  else ``./models``). Nothing is downloaded at run time. Entries built from RobustBench's plain
  ``WideResNet`` need no ``--teacher-model`` (see ``ROBUSTBENCH_ARCHS``).

The teacher's architecture may differ from the student's. The model comes back in eval mode with
``requires_grad=False`` on every parameter; it is not part of the student's optimizers or checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .cohort import freeze
from .errors import FastcollabError
from .rundir import load_run_models
from .weights import model_from_file

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")
ZOO_PREFIX = "robustbench:"

# RobustBench cifar10/Linf entries whose model is its plain WideResNet (TRADES code: inputs in [0, 1], no
# normalisation), from robustbench/model_zoo/cifar10.py: name -> (fastcollab architecture, --teacher-normalize)
ROBUSTBENCH_ARCHS = {
    "Zhang2019Theoretically": ("wrn-34-10", "none"),  # TRADES
    "Huang2020Self": ("wrn-34-10", "none"),
    "Zhang2019You": ("wrn-34-10", "none"),
    "Zhang2020Attacks": ("wrn-34-10", "none"),
    "Wu2020Adversarial": ("wrn-34-10", "none"),
    "Carmon2019Unlabeled": ("wrn-28-10", "none"),
    "Sehwag2020Hydra": ("wrn-28-10", "none"),
    "Wang2020Improving": ("wrn-28-10", "none"),
    "Wu2020Adversarial_extra": ("wrn-28-10", "none"),
}


def parse_teacher(spec: str, what: str = "--teacher") -> tuple[Path, str | None]:
    """``RUN_DIR`` or ``RUN_DIR:K`` -> (run directory, peer selector or None)."""
    text = str(spec).strip()
    if not text:
        raise FastcollabError(f"{what} is empty: pass the --out directory of an earlier run, e.g. {what} runs/trades")
    path = Path(text)
    if not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if head and tail and "/" not in tail:
            return Path(head), tail
    return path, None


def pick_peer(models: dict[str, nn.Module], selector: str | None, where: str, what: str) -> str:
    """The peer named or numbered by ``selector`` (None: the first)."""
    names = list(models)
    if selector is None:
        return names[0]
    if selector in models:
        return selector
    try:
        index = int(selector)
    except ValueError:
        raise FastcollabError(f"{what}: run {where} has no peer {selector!r}; its peers are {', '.join(names)} "
                              f"(or 0..{len(names) - 1})") from None
    if not 0 <= index < len(names):
        raise FastcollabError(f"{what}: peer index {index} is out of range; run {where} has {len(names)} trainable "
                              f"peer(s) ({', '.join(names)}): use 0..{len(names) - 1}")
    return names[index]


def model_dir(given: str | os.PathLike | None = None) -> Path:
    """``--model-dir``, else ``$MODEL_DIR``, else ``./models`` (RobustBench's default)."""
    return Path(given or os.environ.get("MODEL_DIR") or "models").expanduser()


def zoo_path(name: str, models_root: str | os.PathLike | None = None, what: str = "--teacher") -> Path:
    """``robustbench:NAME`` -> ``MODEL_DIR/cifar10/Linf/NAME.pt``; ``robustbench:DATASET/THREAT/NAME`` likewise."""
    parts = [p for p in name.split("/") if p]
    if len(parts) == 1:
        parts = ["cifar10", "Linf", parts[0]]
    if len(parts) != 3:
        raise FastcollabError(f"{what} {ZOO_PREFIX}{name}: write {ZOO_PREFIX}NAME or {ZOO_PREFIX}DATASET/THREAT/NAME, "
                              f"e.g. {ZOO_PREFIX}Zhang2019Theoretically")
    root = model_dir(models_root)
    path = root.joinpath(parts[0], parts[1], parts[2] + ".pt")
    if not path.is_file():
        raise FastcollabError(
            f"{what} {ZOO_PREFIX}{name}: no file at {path}; fastcollab never downloads at run time: put the "
            f"RobustBench checkpoint there (the file robustbench.utils.load_model(model_name='{parts[2]}', "
            f"dataset='{parts[0]}', threat_model='{parts[1]}', model_dir='{root}') saves), or point --model-dir / "
            "$MODEL_DIR at the folder that holds "
            f"{parts[0]}/{parts[1]}/")
    return path


def load_teacher(spec: str | None, device: torch.device | str = "cpu", what: str = "--teacher",
                 num_classes: int | None = None, arch: str | None = None, normalize: str | None = None,
                 models_root: str | os.PathLike | None = None, allow_partial: bool = False,
                 image_size: int = 32) -> nn.Module:
    """The frozen model named by ``spec`` (see the module docstring), on ``device``, in eval mode with no
    parameter gradients. ``num_classes``, when given, must match the teacher's output size; ``arch``,
    ``normalize``, ``allow_partial`` and ``image_size`` apply to checkpoint files."""
    if spec is None:
        raise FastcollabError(f"this method needs a frozen teacher: pass {what} RUN_DIR (the --out directory of "
                              f"an earlier run, e.g. a trades or at run; a nat run for adt), RUN_DIR:K for its "
                              f"peer K, a checkpoint file with --teacher-model NAME, or {ZOO_PREFIX}NAME")
    text = str(spec).strip()
    if text.startswith(ZOO_PREFIX):
        name = text[len(ZOO_PREFIX):]
        path = zoo_path(name, models_root, what)
        known_arch, known_norm = ROBUSTBENCH_ARCHS.get(Path(name).name, (None, None))
        return _from_file(path, arch or known_arch, normalize if normalize is not None else known_norm,
                          num_classes, device, what, allow_partial, image_size)
    if Path(text).expanduser().is_file() or text.lower().endswith(CHECKPOINT_SUFFIXES):
        return _from_file(Path(text).expanduser(), arch, normalize, num_classes, device, what, allow_partial,
                          image_size)
    for flag, value in (("--teacher-model", arch), ("--teacher-normalize", normalize)):
        if value is not None:
            raise FastcollabError(f"{flag} applies to a checkpoint file, but {what} {spec} is a run directory "
                                  f"(its config.yaml names the model): drop {flag}")
    run_dir, selector = parse_teacher(spec, what)
    if not run_dir.is_dir():
        raise FastcollabError(f"{what} {spec}: directory {run_dir} does not exist: pass the --out directory of a "
                              "finished python -m fastcollab.train run, or a checkpoint file")
    config, models = load_run_models(run_dir, device)
    name = pick_peer(models, selector, str(run_dir), f"{what} {spec}")
    teacher_classes = int(config["num_classes"])
    if num_classes is not None and teacher_classes != int(num_classes):
        raise FastcollabError(f"{what} {spec}: the teacher predicts {teacher_classes} classes but this dataset has "
                              f"{num_classes}: use a teacher trained on the same dataset")
    model = freeze(models[name].to(device))
    model.fastcollab_source = f"{run_dir}:{name}"  # where it came from, for logs
    model.num_classes = teacher_classes
    return model


def _from_file(path: Path, arch, normalize, num_classes, device, what, allow_partial, image_size) -> nn.Module:
    if num_classes is None:
        raise FastcollabError(f"{what} {path}: the dataset's class count is needed to load a checkpoint file")
    model = model_from_file(path, arch, int(num_classes), image_size, normalize, what, allow_partial)
    model = freeze(model.to(device))
    model.fastcollab_source = str(path)
    return model
