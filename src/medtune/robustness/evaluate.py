"""How much a fixed perturbation changes a model's predictions, and transfer between models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix
from torch import nn

from medtune._checks import check_positive_int
from medtune._tensors import eval_mode, model_device
from medtune.errors import ConfigError, DataError
from medtune.robustness._common import check_images, check_target, num_outputs, predict

__all__ = ["evaluate_perturbation", "mcnemar_test", "rate_ci", "transfer_matrix"]

CI_METHOD = "wilson"


def rate_ci(successes: int, total: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy ``binomtest(...).proportion_ci``).

    Wilson rather than Clopper-Pearson ("exact"): it is not over-conservative and stays inside
    [0, 1] at rates of 0 and 1, which fooling rates often are.
    """
    ci = binomtest(int(successes), int(total)).proportion_ci(
        confidence_level=confidence, method=CI_METHOD
    )
    return float(ci.low), float(ci.high)


def mcnemar_test(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> dict:
    """McNemar's exact test of two paired binary outcomes on the same images (e.g. UAP vs random).

    Only the discordant pairs count: ``only_a`` images where ``a`` holds and ``b`` does not, ``only_b``
    the reverse; under H0 each discordant pair goes either way with probability 1/2, so the
    two-sided p-value is scipy's exact ``binomtest(only_a, only_a + only_b, 0.5)`` (1.0 without
    discordant pairs).

    Args:
        a: bool (N,), e.g. fooled by the UAP.
        b: bool (N,), e.g. fooled by the random control, on the same images.

    Returns:
        {"p_value": float, "only_a": int, "only_b": int}.

    Raises:
        DataError: ``a`` and ``b`` differ in length.
    """
    a = np.asarray(torch.as_tensor(a).cpu(), dtype=bool).reshape(-1)
    b = np.asarray(torch.as_tensor(b).cpu(), dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise DataError(f"mcnemar_test needs paired outcomes of equal length; got {a.size} and {b.size}.")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p_value = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"p_value": p_value, "only_a": only_a, "only_b": only_b}


def evaluate_perturbation(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    perturbation: torch.Tensor,
    *,
    targeted: int | None = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    clip: bool = True,
) -> dict:
    """Fooling rate, targeted success, accuracies and confusion of ``clip(x + v, 0, 1)`` (``clip=False``: x + v).

    Fooled means a prediction on x+v other than on x, whatever the label (Moosavi-Dezfooli et al.).

    Args:
        model: maps float (N, 3, H, W) in [0, 1] to logits (N, K).
        images: uint8 (N, 3, H, W) or float in [0, 1], or a ``DiskImages`` (read in batches).
        labels: int64 (N,) true classes, or None (then accuracies and per-class rates are None).
        perturbation: float tensor (3, H, W) in [0, 1] pixel units.
        targeted: a target class t to report the share predicted t on x+v and on x.
        class_names: keys of ``per_class``; default the class indices as strings.
        batch_size: images per forward pass.
        device: default the model's device; clip: clip x+v to [0, 1] (default).

    Returns:
        A JSON-serialisable dict: ``num_images``, ``fooling_rate``, ``fooling_ci_low``,
        ``fooling_ci_high`` (95% Wilson), ``ci_method``, ``targeted``, ``targeted_success`` (share
        predicted t on x+v) with ``targeted_ci_low``/``targeted_ci_high``, ``clean_target_share``
        (share predicted t on x), ``clean_accuracy``, ``perturbed_accuracy``, ``per_class``
        ({class name: fooling rate among images of that true class}), ``confusion`` (K×K list, rows
        = clean prediction, columns = prediction on x+v).

    Raises:
        DataError: bad images, labels of the wrong length or out of range, or a perturbation whose
            shape is not (C, H, W) of the images.
        ConfigError: bad targeted, batch_size or class_names.
    """
    images = check_images(images, stream=True)
    batch_size = check_positive_int(batch_size, "batch_size", "evaluate_perturbation")
    if tuple(perturbation.shape) not in (tuple(images.shape[1:]), (1, *images.shape[1:])):
        raise DataError(f"The perturbation has shape {tuple(perturbation.shape)} but the images are "
                        f"{tuple(images.shape[1:])}; compute the UAP at the model's input size.")
    perturbation = perturbation.reshape(images.shape[1:])
    dev = model_device(model, device)
    with eval_mode(model):
        num_classes = num_outputs(model, images, dev)
        target = check_target(targeted, "evaluate_perturbation", num_classes=num_classes)
        clean = predict(model, images, batch_size=batch_size, device=dev).numpy()
        adv = predict(model, images, perturbation=perturbation, batch_size=batch_size, device=dev, clip=clip).numpy()
    if class_names is None:
        class_names = [str(k) for k in range(num_classes)]
    elif len(class_names) != num_classes:
        raise ConfigError(f"class_names has {len(class_names)} names but the model outputs {num_classes} classes.")
    no_labels = {"clean_accuracy": None, "perturbed_accuracy": None, "per_class": None}
    return {**_fooling(clean, adv), **_targeted(clean, adv, target),
            **(no_labels if labels is None else _against_labels(clean, adv, labels, class_names)),
            "confusion": confusion_matrix(clean, adv, labels=np.arange(num_classes)).tolist()}


def _fooling(clean: np.ndarray, adv: np.ndarray) -> dict:
    """The fooling rate with its CI."""
    fooled = clean != adv
    low, high = rate_ci(int(fooled.sum()), clean.shape[0])
    return {
        "num_images": int(clean.shape[0]),
        "fooling_rate": float(fooled.mean()),
        "fooling_ci_low": low,
        "fooling_ci_high": high,
        "ci_method": CI_METHOD,
    }


def _targeted(clean: np.ndarray, adv: np.ndarray, target: int | None) -> dict:
    """The share predicted as the target on x+v (with its CI) and on x; None without a target."""
    out = {"targeted": target, "targeted_success": None, "targeted_ci_low": None, "targeted_ci_high": None,
           "clean_target_share": None}
    if target is not None:
        hits = adv == target
        out["targeted_success"] = float(hits.mean())
        out["targeted_ci_low"], out["targeted_ci_high"] = rate_ci(int(hits.sum()), clean.shape[0])
        out["clean_target_share"] = float((clean == target).mean())
    return out


def _against_labels(clean: np.ndarray, adv: np.ndarray, labels, class_names: Sequence[str]) -> dict:
    """Clean and perturbed accuracy, and the fooling rate per true class."""
    num, num_classes = clean.shape[0], len(class_names)
    y = torch.as_tensor(labels).reshape(-1).cpu().numpy()
    if y.shape[0] != num:
        raise DataError(f"labels has {y.shape[0]} entries but there are {num} images.")
    if y.size and (y.min() < 0 or y.max() >= num_classes or not np.issubdtype(y.dtype, np.integer)):
        raise DataError(
            f"labels must be integer class indices in [0, {num_classes - 1}]. Got values in "
            f"[{y.min()}, {y.max()}] of dtype {y.dtype} instead."
        )
    fooled = clean != adv
    return {
        "clean_accuracy": float((clean == y).mean()),
        "perturbed_accuracy": float((adv == y).mean()),
        "per_class": {str(class_names[k]): (float(fooled[y == k].mean()) if (y == k).any() else None)
                      for k in range(num_classes)},
    }


def transfer_matrix(
    models: Mapping[str, nn.Module],
    uaps: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    *,
    targeted: int | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Fooling rate (targeted: success rate) of each UAP on each model (transferability).

    Args:
        models: {name: model}; every model takes the same input size.
        uaps: {name of the model the UAP was computed on: perturbation (3, H, W)}.
        images: uint8 (N, 3, H, W) or float in [0, 1], the evaluation images.
        targeted: None for fooling rates, or the target class the UAPs aim at: the share of images
            predicted as it.
        batch_size: images per forward pass.
        device: default each model's own device.

    Returns:
        DataFrame, index ``uap_from`` (keys of ``uaps``), columns ``evaluated_on`` (keys of
        ``models``), values the rate in [0, 1].

    Raises:
        ConfigError: ``models`` or ``uaps`` is empty, or a bad ``targeted``.
        DataError: as :func:`evaluate_perturbation`.
    """
    if not models or not uaps:
        raise ConfigError(
            "transfer_matrix needs at least one model and one UAP; got an empty mapping."
        )
    table = pd.DataFrame(
        index=pd.Index(list(uaps), name="uap_from"),
        columns=pd.Index(list(models), name="evaluated_on"),
        dtype=float,
    )
    key = "fooling_rate" if targeted is None else "targeted_success"
    for src, v in uaps.items():
        for dst, model in models.items():
            res = evaluate_perturbation(
                model, images, None, v, targeted=targeted, batch_size=batch_size, device=device
            )
            table.loc[src, dst] = res[key]
    return table
