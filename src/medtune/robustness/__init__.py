"""Robustness of fine-tuned classifiers to universal adversarial perturbations (UAPs).

Perturbations live in the model's input space before normalisation: pixels in [0, 1], budgets in
the same units. See README.md, section "DEFT and the UAP audit". ``medtune.attack`` (the
store-side driver, :mod:`medtune.robustness.driver`) audits stored runs with an :class:`AuditConfig`.
"""

from medtune.robustness._registry import create_attack, list_attacks, register_attack
from medtune.robustness.audit import audit
from medtune.robustness.config import AuditConfig
from medtune.robustness.evaluate import evaluate_perturbation, rate_ci, transfer_matrix
from medtune.robustness.plots import (
    perturbation_to_image,
    save_examples_png,
    save_perturbation_png,
)
from medtune.robustness.sources import BUILTIN_PHOTOS, mixed_source, natural_images
from medtune.robustness.uap import (
    UAPAttack,
    apply_perturbation,
    budget_xi,
    compute_targeted_uaps,
    compute_uap,
    perturbation_norm,
    project_perturbation,
    random_control,
)

__all__ = [
    "AuditConfig",
    "BUILTIN_PHOTOS",
    "UAPAttack",
    "apply_perturbation",
    "audit",
    "budget_xi",
    "compute_targeted_uaps",
    "compute_uap",
    "create_attack",
    "evaluate_perturbation",
    "list_attacks",
    "mixed_source",
    "natural_images",
    "perturbation_norm",
    "perturbation_to_image",
    "project_perturbation",
    "random_control",
    "rate_ci",
    "register_attack",
    "save_examples_png",
    "save_perturbation_png",
    "transfer_matrix",
]
