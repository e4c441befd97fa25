"""What a method is: math over a table of logits (DESIGN §2).

A method declares
- its **peers** (name, role, trainable or frozen),
- one **attack plan** per adversarial input it needs (which peer is attacked, with which spec, and which
  frozen model guides the objective),
- the **views** ``logits[model, input]`` it reads, each with or without gradient,
- the **loss**: a map from the filled view table and the labels to one scalar and named terms for logging.

It never calls a model and knows nothing about streams, graphs or dtypes; the engine plans and executes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..attacks import AttackSpec

CLEAN = "clean"


def adv_key(peer: str, tag: str | None = None) -> str:
    """Name of the adversarial input crafted against ``peer`` (``tag`` tells several apart)."""
    return f"adv:{peer}" if tag is None else f"adv:{peer}:{tag}"


@dataclass(frozen=True)
class Peer:
    """A model of the cohort. ``role`` is descriptive (student, peer, teacher, specialist, generalist,
    natural); ``trainable`` peers get an optimizer, frozen ones (teachers) stay in eval mode and are loaded
    from the run named by the hyper-parameter ``source`` (e.g. ``teacher``: ``RUN_DIR`` or ``RUN_DIR:K``)."""

    name: str
    role: str = "peer"
    trainable: bool = True
    source: str | None = None


@dataclass(frozen=True)
class AttackPlan:
    """Craft the input ``key`` by attacking ``peer`` with ``spec``; ``guide`` names a frozen model that the
    objective reads (its clean logits for ``teacher_kl``, its logits on ``x'`` for ``guide_kl``)."""

    key: str
    peer: str
    spec: AttackSpec
    guide: str | None = None


@dataclass(frozen=True)
class View:
    model: str
    input: str = CLEAN
    grad: bool = True


@dataclass
class StepContext:
    """What a loss may know besides logits: where training is (IAD switches on at an epoch)."""

    epoch: int = 0
    epochs: int = 1


class LogitTable:
    """``table[model, input] -> logits`` (fp32), filled by the engine with exactly the declared views."""

    def __init__(self, logits: Mapping[tuple[str, str], torch.Tensor]):
        self._logits = dict(logits)

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor:
        try:
            return self._logits[key]
        except KeyError:
            raise KeyError(f"view {key} was not declared by the method") from None

    def __contains__(self, key) -> bool:
        return key in self._logits

    def keys(self):
        return self._logits.keys()


@dataclass
class LossResult:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    # per-peer training accuracy on the input it is trained on (logged, never differentiated)
    correct: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``name`` and ``defaults`` and implement the four declarations."""

    name: str = ""
    summary: str = ""
    #: hyper-parameters and their paper defaults; ``defaults_for(model, dataset)`` may refine them by
    #: architecture and dataset (MAT's a = 0.45 on CIFAR-100)
    defaults: dict[str, Any] = {}
    #: command-line options of the method's own hyper-parameters: ``{flag: argparse keyword arguments}``
    #: (``dest`` must be the hyper-parameter's key); the train CLI adds each flag once across methods
    cli_options: dict[str, dict[str, Any]] = {}

    def __init__(self, hp: Mapping[str, Any]):
        self.hp = dict(hp)

    @classmethod
    def defaults_for(cls, model: str, dataset: str | None = None) -> dict[str, Any]:
        return dict(cls.defaults)

    # --- declarations -------------------------------------------------------------------------
    def peers(self) -> list[Peer]:
        raise NotImplementedError

    def attacks(self) -> list[AttackPlan]:
        raise NotImplementedError

    def views(self) -> list[View]:
        raise NotImplementedError

    def loss(self, table: LogitTable, y: torch.Tensor, ctx: StepContext) -> LossResult:
        raise NotImplementedError

    # --- helpers shared by the methods ------------------------------------------------------------
    def attack_spec(self, objective: str, **overrides) -> AttackSpec:
        """The method's attack from its resolved hyper-parameters (``eps``, ``step``, ``attack_steps``,
        ``attack_init``, ``attack_bn``, and ``attack_objective`` when the user overrides the method's
        ``objective``) with ``overrides``."""
        hp = self.hp
        fields = {"norm": hp.get("norm", "linf"), "eps": hp["eps"], "step": hp["step"],
                  "steps": hp["attack_steps"], "init": hp["attack_init"],
                  "objective": hp.get("attack_objective") or objective,
                  "bn_mode": hp["attack_bn"]}
        return AttackSpec(**{**fields, **overrides})

    def trainable_peers(self) -> list[str]:
        return [p.name for p in self.peers() if p.trainable]


def accuracy_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(1) == y).float().mean()
