"""fastcollab: a fast engine for collaborative adversarial training (MAT, CAT, distillation, ADT) and the
classic baselines, with fused ops for anyone's adversarial-training code."""
from .errors import FastcollabError

__version__ = "0.1.0"
__all__ = ["FastcollabError", "load_cohort", "__version__"]


def __getattr__(name):
    # ``import fastcollab`` stays light: the trainer's modules load on first use of load_cohort
    if name == "load_cohort":
        from .rundir import load_cohort

        return load_cohort
    raise AttributeError(f"module 'fastcollab' has no attribute {name!r}")
