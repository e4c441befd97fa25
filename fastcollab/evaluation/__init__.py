"""Evaluation a reviewer can trust: attacks by name (:mod:`.core`), fastcollab's APGD and the standard
AutoAttack over a cohort (:mod:`.library`), sanity checks beside every number (:mod:`.checks`), and the
evaluation of a whole test set — subsets, progress, resume, shards (:mod:`.runner`)."""
from .core import (DEFAULT_ATTACKS, DEFAULT_EPS, LIBRARY_ATTACKS, MP_BUDGETS, STEP_FRACTION, EvalAttack,
                   attack_norm, correct_under, eps_fits_norm, evaluate_cohort, evaluate_model, parse_attack,
                   parse_attacks, per_example_correct, pgd_best_iterate, pick_transfer_attack,
                   prediction_discrepancy, robust_under, transfer_matrix, union_metrics)

__all__ = ["DEFAULT_ATTACKS", "DEFAULT_EPS", "LIBRARY_ATTACKS", "MP_BUDGETS", "STEP_FRACTION", "EvalAttack",
           "attack_norm", "correct_under", "eps_fits_norm", "evaluate_cohort", "evaluate_model", "parse_attack",
           "parse_attacks", "per_example_correct", "pgd_best_iterate", "pick_transfer_attack",
           "prediction_discrepancy", "robust_under", "transfer_matrix", "union_metrics"]
