"""Classification metrics from stored probabilities (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

__all__ = ["compute_metrics", "MONITOR_METRICS", "METRIC_RANGES", "higher_is_better", "metric_range", "rung_metric"]

#: The metrics every record carries and a run can monitor (early stopping, best checkpoint).
MONITOR_METRICS: tuple[str, ...] = ("auc", "accuracy", "balanced_accuracy", "f1", "loss")

#: The range of each metric's values: an interval for a metric is kept inside it.
METRIC_RANGES: dict[str, tuple[float, float]] = {"auc": (0.0, 1.0), "accuracy": (0.0, 1.0),
                                                  "balanced_accuracy": (0.0, 1.0), "f1": (0.0, 1.0),
                                                  "loss": (0.0, float("inf"))}

# Metrics where a smaller value is better; every other metric is "higher is better".
_LOWER_IS_BETTER = frozenset({"loss"})


def _base_name(metric: str) -> str:
    for prefix in ("val_", "train_", "test_"):
        if metric.startswith(prefix):
            return metric[len(prefix):]
    return metric


def metric_range(metric: str) -> tuple[float, float]:
    """(low, high) of a metric's values; unbounded (-inf, inf) for an unknown one."""
    return METRIC_RANGES.get(_base_name(metric), (-float("inf"), float("inf")))


def higher_is_better(metric: str) -> bool:
    """False for loss-like metrics (``loss``, ``val_loss``, ``train_loss``), True otherwise."""
    return _base_name(metric) not in _LOWER_IS_BETTER


def _macro_auc(y_true: np.ndarray, prob: np.ndarray, class_names: list[str]) -> float:
    """One-vs-rest macro AUC over the classes that are present *and* absent somewhere in ``y_true``.

    A class with no positive (or no negative) sample has no ROC curve; it is skipped with a
    warning instead of crashing (sklearn's multi-class ``roc_auc_score`` raises there).
    """
    aucs, skipped = [], []
    for c in range(prob.shape[1]):
        positives = y_true == c
        if positives.all() or not positives.any():
            skipped.append(class_names[c] if c < len(class_names) else str(c))
            continue
        aucs.append(skm.roc_auc_score(positives, prob[:, c]))
    if skipped:
        warnings.warn(
            f"AUC skips class(es) {', '.join(skipped)}: absent (or alone) in the evaluated split.\n"
            "HINT: use a larger or stratified test split to score every class.",
            stacklevel=3,
        )
    if prob.shape[1] == 2 and len(aucs) == 2:
        return float(aucs[1])  # binary: the positive class's AUC (equal to class 0's)
    return float(np.mean(aucs)) if aucs else float("nan")


def compute_metrics(y_true: np.ndarray, prob: np.ndarray, *, task: str, class_names: list[str],
                    loss: float | None = None) -> dict[str, float]:
    """Metrics of one evaluation.

    Args:
        y_true: int array (N,) of class indices, or 0/1 array (N, L) for multi-label.
        prob: float array (N, K) of class probabilities (softmax), or (N, L) sigmoid outputs.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: one name per class/label.
        loss: mean loss, recorded as ``loss`` when given.

    Returns:
        accuracy, balanced_accuracy, auc (macro one-vs-rest), f1 (macro); for binary tasks also
        sensitivity and specificity of class 1; for multi-label, the mean over labels of
        accuracy and AUC.
    """
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        if task == "multilabel":
            pred = (prob > 0.5).astype(int)  # a label is present above 0.5, as MedMNIST's getACC
            y = y_true.astype(int)
            out["accuracy"] = float((pred == y).mean())
            aucs = [skm.roc_auc_score(y[:, j], prob[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
            out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
            out["f1"] = float(skm.f1_score(y, pred, average="macro", zero_division=0))
            out["balanced_accuracy"] = float(np.mean([
                skm.balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)
            ] or [float("nan")]))
        else:
            pred = prob.argmax(1)
            labels = list(range(prob.shape[1]))
            out["accuracy"] = float(skm.accuracy_score(y_true, pred))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
                out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, pred))
            out["f1"] = float(skm.f1_score(y_true, pred, labels=labels, average="macro", zero_division=0))
            out["auc"] = _macro_auc(y_true, prob, class_names)
            if task == "binary":
                tn, fp, fn, tp = skm.confusion_matrix(y_true, pred, labels=[0, 1]).ravel()
                out["sensitivity"] = float(tp / (tp + fn)) if tp + fn else float("nan")
                out["specificity"] = float(tn / (tn + fp)) if tn + fp else float("nan")
    if loss is not None:
        out["loss"] = float(loss)
    return out


def rung_metric(history: Sequence[dict], rung: int, monitor: str) -> float:
    """A run's validation metric at a rung: the best monitored value of its first ``rung`` epochs (what
    the run would report, by best-epoch selection, had it ended there); NaN if none is defined."""
    values = [h.get(f"val_{monitor}") for h in list(history)[:rung]]
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return float("nan")
    return max(values) if higher_is_better(monitor) else min(values)
