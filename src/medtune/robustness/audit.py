"""The UAP audit: for each image source × budget, a UAP, its random control and their metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medtune._checks import check_fraction, check_positive_int
from medtune._tensors import eval_mode, model_device
from medtune.errors import ConfigError
from medtune.robustness._common import check_images, check_target, num_outputs, resolve_norm
from medtune.robustness._registry import create_attack
from medtune.robustness.config import SOURCES, check_sources, check_zetas
from medtune.robustness.evaluate import evaluate_perturbation
from medtune.robustness.sources import natural_images
from medtune.robustness.uap import budget_xi, perturbation_norm, random_control

__all__ = ["AuditResult", "audit"]


@dataclass
class AuditResult:
    """What :func:`audit` returns.

    Attributes:
        records: one flat JSON-serialisable dict per (source, zeta, target); see :func:`audit`.
        perturbations: {record["perturbation_key"]: UAP, float32 CPU tensor (3, H, W)}.
        random_perturbations: {record["perturbation_key"]: its random control, same shape}.
    """

    records: list[dict] = field(default_factory=list)
    perturbations: dict[str, torch.Tensor] = field(default_factory=dict)
    random_perturbations: dict[str, torch.Tensor] = field(default_factory=dict)


def _resolve_targets(targeted: object, num_classes: int) -> list[int | None]:
    target = check_target(targeted, "audit", num_classes=num_classes, allow_all=True)
    return list(range(num_classes)) if target == "all" else [target]


def _perturbation_key(source: str, zeta: float, norm: str, target: int | None) -> str:
    return f"{source}/zeta={zeta:g}/norm={norm}/target={'none' if target is None else target}"


def audit(
    model: nn.Module,
    *,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    train_images: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    zetas: Sequence[float] = (0.02, 0.04, 0.08),
    norm: object = 2,
    sources: Sequence[str] = SOURCES,
    targeted: int | str | None = None,
    natural_folder: str | Path | None = None,
    num_source_images: int = 512,
    step_size_fraction: float | None = None,
    max_passes: int = 10,
    goal_rate: float = 0.8,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> AuditResult:
    """UAP audit of one model (Hirano et al. 2021; Minagi et al. 2022).

    For each source in ``sources`` and each ζ in ``zetas`` (and each target class when
    ``targeted="all"``): compute a UAP from the source images, draw a random control with the same
    Lp norm, and evaluate both on the test set.

    Args:
        model: maps float (N, 3, H, W) in [0, 1] to logits (N, K); normalisation inside.
        test_images: uint8 (N, 3, H, W) or float in [0, 1]; the UAPs are evaluated here.
        test_labels: int64 (N,) true classes.
        train_images: the "train" source; at most ``num_source_images`` are drawn (seeded).
        class_names: K names for the per-class rates; default "0".."K-1".
        zetas: budgets as fractions of the mean Lp norm of each source's images.
        norm: 2 or "inf".
        sources: any of "train" and "natural" (random crops of ``natural_folder``, or of the photos
            scikit-image ships when it is None).
        targeted: None (non-targeted), a class index, or "all" (one targeted UAP per class).
        natural_folder: folder of natural photos for the "natural" source.
        num_source_images: images per source.
        step_size_fraction: FGSM step as a fraction of ξ; default that of :func:`compute_uap`.
        max_passes, goal_rate, batch_size: as in :func:`compute_uap`.
        seed: seeds source sampling, crops, UAP shuffling and random controls.
        device: default the model's device.

    Returns:
        An :class:`AuditResult`. Each record has the keys ``source``, ``zeta``, ``xi`` (pixel
        units), ``norm`` ("2" or "inf"), ``targeted``, ``perturbation_key``, ``perturbation_norm``,
        ``num_source_images``, ``num_test_images``, ``num_passes``, ``goal_reached``,
        ``fooling_rate_source`` (per pass), ``step_size``, ``seconds``, ``seed``; for the UAP:
        ``fooling_rate``, ``fooling_ci_low``, ``fooling_ci_high``, ``ci_method``,
        ``targeted_success`` (+ ``targeted_ci_low``/``_high``), ``clean_target_share``,
        ``clean_accuracy``, ``perturbed_accuracy``, ``per_class``, ``confusion``; for the random
        control the same with the prefix ``random_`` (``random_fooling_rate``, ``random_ci_low``,
        ``random_ci_high``, ``random_targeted_success``, ``random_perturbed_accuracy``,
        ``random_per_class``, ``random_confusion``).

    Raises:
        ConfigError: unknown source, "train" without train_images, empty zetas or sources, bad
            targeted, or any parameter the registered ``uap`` attack (``UAPAttack``) rejects.
        DataError: bad images or labels, or an unreadable natural-image file.
    """
    norm = resolve_norm(norm, owner="audit")
    test_images = check_images(test_images, "test_images")
    zetas = check_zetas(zetas, "audit")
    sources = check_sources(sources, "audit")
    if "train" in sources and train_images is None:
        raise ConfigError(
            "The 'train' UAP source needs train_images; pass them or use sources=('natural',)."
        )
    num_source_images = check_positive_int(num_source_images, "num_source_images", "audit")
    if step_size_fraction is not None:
        step_size_fraction = check_fraction(step_size_fraction, "step_size_fraction", "audit")
    dev = model_device(model, device)
    with eval_mode(model):
        num_classes = num_outputs(model, test_images, dev)
    targets = _resolve_targets(targeted, num_classes)

    result = AuditResult()
    for source_idx, source in enumerate(sources):
        if source == "train":
            train_images = check_images(train_images, "train_images")
            generator = torch.Generator().manual_seed(int(seed))
            pick = torch.randperm(train_images.shape[0], generator=generator)[:num_source_images]
            attack_images = train_images[pick.sort().values]
        else:
            attack_images = natural_images(
                num_source_images, tuple(test_images.shape[-2:]), folder=natural_folder, seed=seed
            )
        for zeta_idx, zeta in enumerate(zetas):
            for target in targets:
                uap_seed = (
                    seed
                    + 1000 * source_idx
                    + 100 * zeta_idx
                    + (0 if target is None else target + 1)
                )
                step = (
                    None
                    if step_size_fraction is None
                    else step_size_fraction * budget_xi(attack_images, zeta, norm)
                )
                uap = create_attack(
                    "uap",
                    zeta=zeta,
                    norm=norm,
                    targeted=target,
                    step_size=step,
                    max_passes=max_passes,
                    goal_rate=goal_rate,
                    batch_size=batch_size,
                    seed=uap_seed,
                    device=dev,
                ).compute(model, attack_images)
                control = random_control(uap.perturbation, norm, seed=uap_seed)
                metrics = evaluate_perturbation(
                    model,
                    test_images,
                    test_labels,
                    uap.perturbation,
                    targeted=target,
                    class_names=class_names,
                    batch_size=batch_size,
                    device=dev,
                )
                random_metrics = evaluate_perturbation(
                    model,
                    test_images,
                    test_labels,
                    control,
                    targeted=target,
                    class_names=class_names,
                    batch_size=batch_size,
                    device=dev,
                )
                key = _perturbation_key(source, zeta, norm, target)
                record = {
                    "source": source,
                    "zeta": zeta,
                    "xi": uap.xi,
                    "norm": norm,
                    "targeted": target,
                    "perturbation_key": key,
                    "perturbation_norm": perturbation_norm(uap.perturbation, norm),
                    "num_source_images": uap.num_source_images,
                    "num_test_images": metrics["num_images"],
                    "num_passes": uap.num_passes,
                    "goal_reached": uap.goal_reached,
                    "fooling_rate_source": uap.fooling_rate_source,
                    "step_size": uap.step_size,
                    "seconds": uap.seconds,
                    "seed": uap_seed,
                }
                record.update(
                    {k: v for k, v in metrics.items() if k not in ("num_images", "targeted")}
                )
                record.update(
                    {
                        "random_fooling_rate": random_metrics["fooling_rate"],
                        "random_ci_low": random_metrics["fooling_ci_low"],
                        "random_ci_high": random_metrics["fooling_ci_high"],
                        "random_targeted_success": random_metrics["targeted_success"],
                        "random_perturbed_accuracy": random_metrics["perturbed_accuracy"],
                        "random_per_class": random_metrics["per_class"],
                        "random_confusion": random_metrics["confusion"],
                    }
                )
                result.records.append(record)
                result.perturbations[key] = uap.perturbation
                result.random_perturbations[key] = control
    return result
