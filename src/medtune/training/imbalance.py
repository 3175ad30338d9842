"""Imbalanced classes: loss weights, a balanced sampler, per-class metrics and a decision threshold
chosen on validation for a target sensitivity.

The weights are scikit-learn's (``compute_class_weight("balanced")``: n / (K · n_k)); a multi-label
task gets PyTorch's ``pos_weight`` (negatives / positives per label). The sampler is PyTorch's
``WeightedRandomSampler`` (each image drawn with probability ∝ 1 / its class's count, with
replacement) over the in-memory training batches.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn import metrics as skm
from sklearn.utils.class_weight import compute_class_weight

from medtune.errors import ConfigError

__all__ = ["CLASS_WEIGHTS", "SAMPLERS", "class_weights", "balanced_order", "per_class_metrics",
           "threshold_for_sensitivity", "operating_point"]

CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("none", "balanced")


def class_weights(labels: np.ndarray, task: str, num_classes: int, mode: str) -> list[float] | None:
    """Loss weights of the training labels: per class (CE ``weight``) or per label (BCE ``pos_weight``).

    Returns None for ``mode="none"``. A class without training images gets weight 0 (it cannot occur).
    """
    if mode == "none":
        return None
    labels = np.asarray(labels)
    if task == "multilabel":
        pos = labels.sum(0)
        neg = len(labels) - pos
        return [float(n / p) if p > 0 else 1.0 for p, n in zip(pos, neg)]
    present = np.unique(labels)
    weights = dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=labels)))
    return [float(weights.get(k, 0.0)) for k in range(num_classes)]


def balanced_order(labels: torch.Tensor, task: str, generator: torch.Generator) -> torch.Tensor:
    """An epoch's sample order with ``WeightedRandomSampler`` semantics: ``len(labels)`` draws with
    replacement, each image with probability ∝ 1 / (images of its class).

    Raises:
        ConfigError: a multi-label task (a balanced sampler is defined per class only).
    """
    from torch.utils.data import WeightedRandomSampler

    if task == "multilabel":
        raise ConfigError("sampler=balanced is defined for single-label tasks; use class_weight=balanced "
                          "(pos_weight per label) for multi-label data.")
    y = labels.cpu().long()
    counts = torch.bincount(y).double()
    sampler = WeightedRandomSampler(1.0 / counts[y], num_samples=len(y), replacement=True, generator=generator)
    return torch.tensor(list(sampler), dtype=torch.long)


def per_class_metrics(y_true: np.ndarray, prob: np.ndarray, *, task: str, class_names: list[str],
                      threshold: float | None = None) -> dict[str, dict[str, float]]:
    """Per class (one-vs-rest): ``sensitivity`` (recall), ``specificity``, ``ppv`` (precision),
    ``pr_auc`` (average precision) and ``support``.

    The prediction is the arg-max (multi-label: p ≥ 0.5; binary with ``threshold``: class 1 when
    p₁ ≥ threshold). Undefined values (no positives or negatives) are NaN.
    """
    y_true = np.asarray(y_true)
    if task == "multilabel":
        y_bin, pred_bin = y_true.astype(int), (prob > 0.5).astype(int)
    else:
        k = prob.shape[1]
        pred = (prob[:, 1] >= threshold).astype(int) if (threshold is not None and k == 2) else prob.argmax(1)
        y_bin = np.eye(k, dtype=int)[y_true.astype(int)]
        pred_bin = np.eye(k, dtype=int)[pred]
    out = {}
    for j, name in enumerate(class_names):
        y, p = y_bin[:, j], pred_bin[:, j]
        tp, fn = int(((y == 1) & (p == 1)).sum()), int(((y == 1) & (p == 0)).sum())
        tn, fp = int(((y == 0) & (p == 0)).sum()), int(((y == 0) & (p == 1)).sum())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ap = float(skm.average_precision_score(y, prob[:, j])) if 0 < y.sum() < len(y) else math.nan
        out[name] = {"sensitivity": tp / (tp + fn) if tp + fn else math.nan,
                     "specificity": tn / (tn + fp) if tn + fp else math.nan,
                     "ppv": tp / (tp + fp) if tp + fp else math.nan,
                     "pr_auc": ap, "support": int(y.sum())}
    return out


def threshold_for_sensitivity(y_true: np.ndarray, p_pos: np.ndarray, target: float) -> float:
    """The highest threshold t whose rule ``p ≥ t`` reaches sensitivity ≥ ``target`` on these labels
    (the validation split): the most specific operating point that meets the target there.

    Raises:
        ConfigError: no positive image to measure sensitivity on.
    """
    y = np.asarray(y_true).astype(int)
    if y.sum() == 0:
        raise ConfigError("Cannot choose a threshold for a target sensitivity: the validation split has no "
                          "positive images.")
    fpr, tpr, thresholds = skm.roc_curve(y, p_pos, drop_intermediate=False)
    idx = int(np.flatnonzero(tpr >= target)[0])
    return float(min(thresholds[idx], 1.0))


def operating_point(val_true: np.ndarray, val_prob: np.ndarray, test_true: np.ndarray, test_prob: np.ndarray,
                    target: float) -> dict[str, float]:
    """A binary task's threshold chosen on validation for ``target`` sensitivity, and its sensitivity,
    specificity, PPV and NPV on validation and on test (the test numbers are only reported)."""
    t = threshold_for_sensitivity(val_true, val_prob[:, 1], target)
    out: dict[str, float] = {"target_sensitivity": float(target), "threshold": t}
    for split, y, p in (("val", val_true, val_prob), ("test", test_true, test_prob)):
        y, pred = np.asarray(y).astype(int), (p[:, 1] >= t).astype(int)
        tp, fn = int(((y == 1) & (pred == 1)).sum()), int(((y == 1) & (pred == 0)).sum())
        tn, fp = int(((y == 0) & (pred == 0)).sum()), int(((y == 0) & (pred == 1)).sum())
        out[f"{split}_sensitivity"] = tp / (tp + fn) if tp + fn else math.nan
        out[f"{split}_specificity"] = tn / (tn + fp) if tn + fp else math.nan
        out[f"{split}_ppv"] = tp / (tp + fp) if tp + fp else math.nan
        out[f"{split}_npv"] = tn / (tn + fn) if tn + fn else math.nan
    return out
