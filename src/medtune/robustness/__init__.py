"""Robustness of fine-tuned classifiers to universal adversarial perturbations (UAPs).

Perturbations live in the model's input space before normalisation: pixels in [0, 1], budgets in
the same units. See README.md, section "DEFT and the UAP audit". ``medtune.attack`` (the
store-side driver, :mod:`medtune.robustness.driver`) audits stored runs with an :class:`AuditConfig`.
"""

from medtune.robustness._registry import create_attack, list_attacks, register_attack
from medtune.robustness.audit import audit, resolve_channels
from medtune.robustness.config import AuditConfig
from medtune.robustness.params import UAPParams
from medtune.robustness.evaluate import evaluate_perturbation, mcnemar_test, rate_ci, transfer_matrix
from medtune.robustness.plots import (
    perturbation_to_image,
    save_examples_png,
    save_perturbation_png,
)
from medtune.robustness.sources import (
    BUILTIN_PHOTOS,
    mixed_source,
    natural_image_chunks,
    natural_images,
    rgb_to_grey,
)
from medtune.robustness.uap import (
    ALGORITHMS,
    UAPAttack,
    apply_perturbation,
    budget_xi,
    compute_targeted_uaps,
    compute_uap,
    is_grey,
    perturbation_norm,
    project_perturbation,
    project_to_grey,
    random_control,
)

__all__ = [
    "ALGORITHMS",
    "AuditConfig",
    "BUILTIN_PHOTOS",
    "UAPAttack",
    "UAPParams",
    "apply_perturbation",
    "audit",
    "budget_xi",
    "compute_targeted_uaps",
    "compute_uap",
    "create_attack",
    "evaluate_perturbation",
    "is_grey",
    "list_attacks",
    "mcnemar_test",
    "mixed_source",
    "natural_image_chunks",
    "natural_images",
    "perturbation_norm",
    "perturbation_to_image",
    "project_perturbation",
    "project_to_grey",
    "random_control",
    "rate_ci",
    "register_attack",
    "resolve_channels",
    "rgb_to_grey",
    "save_examples_png",
    "save_perturbation_png",
    "transfer_matrix",
]
