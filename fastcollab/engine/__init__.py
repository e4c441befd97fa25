"""How a step is executed: ``eager`` (any device, the semantics reference) or ``fast``.

``fast`` is the CUDA-graphed engine on a GPU (:mod:`.graphed`: the whole cohort step captured once and
replayed; it falls back to eager, saying why, where capture is impossible) and the CPU fast path on a CPU
(:mod:`.fast`: folded BatchNorm twins for the attacks, channels_last, the fused C++ ops). Both compute the
eager engine's step. ``auto`` picks ``fast`` on either device: on the 2-core CPU it measured 1.3-1.5x the
eager engine's images/s with the same losses (bench/RESULTS.md, "Throughput").
"""
from __future__ import annotations

from ..cohort import Cohort
from ..errors import FastcollabError
from .distributed import make_distributed_engine
from .eager import EagerEngine, StepPlan, plan_step
from .fast import FastEngine
from .precision import Precision


def _fast(cohort: Cohort, precision: Precision, view_bn: str = "eval"):
    if precision.device.type == "cuda":
        from .graphed import GraphedEngine
        return GraphedEngine(cohort, precision, view_bn)
    return FastEngine(cohort, precision, view_bn)


ENGINES = {"eager": EagerEngine, "fast": _fast}


def make_engine(name: str, cohort: Cohort, precision: Precision, view_bn: str = "eval"):
    if name == "auto":
        name = "fast"
    try:
        factory = ENGINES[name]
    except KeyError:
        raise FastcollabError(f"unknown --engine {name!r}: use one of auto, {', '.join(ENGINES)}") from None
    return factory(cohort, precision, view_bn)


__all__ = ["ENGINES", "EagerEngine", "FastEngine", "Precision", "StepPlan", "make_distributed_engine", "make_engine",
           "plan_step"]
