"""Frozen teachers: a model of an earlier run, loaded to guide a student and never updated.

``--teacher RUN_DIR`` takes the run's first trainable peer; ``--teacher RUN_DIR:K`` its peer number K (0-based,
in the run's peer order) or the peer named K (``RUN_DIR:p1``). A ``trades`` or ``at`` run makes a robust
teacher (ARD, RSLAD, IAD, MMARD), a ``nat`` run a natural one (ADT). The teacher's architecture is whatever
that run trained; it may differ from the student's. The model comes back in eval mode with
``requires_grad=False`` on every parameter; it is not part of the student's optimizers or checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .cohort import freeze
from .errors import FastcollabError
from .rundir import load_run_models


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


def load_teacher(spec: str | None, device: torch.device | str = "cpu", what: str = "--teacher",
                 num_classes: int | None = None) -> nn.Module:
    """The frozen model named by ``spec`` (``RUN_DIR`` or ``RUN_DIR:K``), on ``device``, in eval mode with no
    parameter gradients. ``num_classes``, when given, must match the teacher's output size."""
    if spec is None:
        raise FastcollabError(f"this method needs a frozen teacher: pass {what} RUN_DIR (the --out directory of "
                              f"an earlier run, e.g. a trades or at run; a nat run for adt), or RUN_DIR:K for its "
                              "peer K")
    run_dir, selector = parse_teacher(spec, what)
    if not run_dir.is_dir():
        raise FastcollabError(f"{what} {spec}: directory {run_dir} does not exist: pass the --out directory of a "
                              "finished python -m fastcollab.train run")
    config, models = load_run_models(run_dir, device)
    names = list(models)
    if selector is None:
        name = names[0]
    elif selector in models:
        name = selector
    else:
        try:
            index = int(selector)
        except ValueError:
            raise FastcollabError(f"{what} {spec}: run {run_dir} has no peer {selector!r}; its peers are "
                                  f"{', '.join(names)} (or 0..{len(names) - 1})") from None
        if not 0 <= index < len(names):
            raise FastcollabError(f"{what} {spec}: peer index {index} is out of range; run {run_dir} has "
                                  f"{len(names)} trainable peer(s) ({', '.join(names)}): use 0..{len(names) - 1}")
        name = names[index]
    teacher_classes = int(config["num_classes"])
    if num_classes is not None and teacher_classes != int(num_classes):
        raise FastcollabError(f"{what} {spec}: the teacher predicts {teacher_classes} classes but this dataset has "
                              f"{num_classes}: use a teacher trained on the same dataset")
    model = freeze(models[name].to(device))
    model.fastcollab_source = f"{run_dir}:{name}"  # where it came from, for logs
    model.num_classes = teacher_classes
    return model
