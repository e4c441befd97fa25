"""Training methods, one module per family; importing this package registers them all."""
from . import baselines, cat, mat  # noqa: F401  (registration side effect)
from . import mat_mp  # noqa: F401
from . import distill  # noqa: F401
from . import adt  # noqa: F401
from .base import CLEAN, AttackPlan, LogitTable, LossResult, Method, Peer, StepContext, View, adv_key
from .registry import get_method, list_methods, register_method

__all__ = ["CLEAN", "AttackPlan", "LogitTable", "LossResult", "Method", "Peer", "StepContext", "View",
           "adv_key", "get_method", "list_methods", "register_method"]
