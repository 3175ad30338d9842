"""Calibration: expected calibration error, Brier score, the reliability curve and temperature scaling.

Single-label tasks are measured on the top label (confidence = the largest probability, correct =
the arg-max is the label), as Guo et al. 2017 and torchmetrics' multiclass calibration error; the
reliability curve is scikit-learn's ``calibration_curve`` of (correct, confidence) with uniform bins
(computed here with its counts, which sklearn does not return), and the ECE is the count-weighted mean |accuracy − confidence| over the same bins. Multi-label
tasks average the per-label (positive-class) values. The Brier score is scikit-learn's
``brier_score_loss`` (binary: mean (p₁ − y)²; multi-class: mean Σₖ (pₖ − 1[y = k])²).

Temperature scaling (Guo et al. 2017) divides the logits by one T > 0 fitted on the validation
split by minimising the negative log-likelihood; the logits are recovered from the stored
probabilities (log p differs from the logits by a per-image constant that softmax cancels; multi-label:
log(p / (1 − p))). T changes no arg-max, so accuracy stays; a binary (or per-label) ranking and
so its AUC stay too.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax
from sklearn.metrics import brier_score_loss

__all__ = ["expected_calibration_error", "brier_score", "reliability_curve", "fit_temperature",
           "apply_temperature", "calibration_summary", "NUM_BINS"]

#: Bins of the ECE and the reliability curve (uniform on [0, 1]).
NUM_BINS = 15
_EPS = 1e-12


def _top_label(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(correct 0/1, confidence) of each image's arg-max prediction."""
    return (prob.argmax(1) == np.asarray(y_true).astype(int)).astype(float), prob.max(1)


def _ece(correct: np.ndarray, confidence: np.ndarray, num_bins: int) -> float:
    total, hits, conf = _bins(correct, confidence, num_bins)
    return float(np.abs(hits - conf).sum() / max(1, total.sum()))  # Σ_b n_b/N · |acc_b − conf_b|


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, *, task: str,
                               num_bins: int = NUM_BINS) -> float:
    """Expected calibration error in [0, 1] (top label; multi-label: mean over labels)."""
    if task == "multilabel":
        y = np.asarray(y_true).astype(float)
        return float(np.mean([_ece(y[:, j], prob[:, j], num_bins) for j in range(prob.shape[1])]))
    return _ece(*_top_label(y_true, prob), num_bins)


def brier_score(y_true: np.ndarray, prob: np.ndarray, *, task: str) -> float:
    """scikit-learn's Brier score (multi-label: mean over labels)."""
    if task == "multilabel":
        y = np.asarray(y_true).astype(int)
        return float(np.mean([brier_score_loss(y[:, j], prob[:, j], labels=[0, 1]) for j in range(prob.shape[1])]))
    return float(brier_score_loss(np.asarray(y_true).astype(int), prob, labels=list(range(prob.shape[1]))))


def _bins(correct: np.ndarray, confidence: np.ndarray, num_bins: int) -> tuple[np.ndarray, ...]:
    """Per bin: images, correct ones, summed confidence — the bins of sklearn's ``calibration_curve``
    (uniform edges, ``np.searchsorted`` on the inner edges), which does not return its counts."""
    ids = np.searchsorted(np.linspace(0.0, 1.0, num_bins + 1)[1:-1], confidence)
    return (np.bincount(ids, minlength=num_bins), np.bincount(ids, weights=correct, minlength=num_bins),
            np.bincount(ids, weights=confidence, minlength=num_bins))


def reliability_curve(y_true: np.ndarray, prob: np.ndarray, *, task: str,
                      num_bins: int = NUM_BINS) -> dict[str, list[float]]:
    """Accuracy and mean confidence of each non-empty bin (equal to scikit-learn's ``calibration_curve``
    with uniform bins, tested) and its share of the images: the reliability diagram. Multi-label:
    every label's (outcome, probability) pairs pooled."""
    if task == "multilabel":
        correct, confidence = np.asarray(y_true).astype(float).ravel(), prob.ravel()
    else:
        correct, confidence = _top_label(y_true, prob)
    total, hits, conf = _bins(correct, confidence, num_bins)
    keep = total > 0
    return {"confidence": (conf[keep] / total[keep]).tolist(), "accuracy": (hits[keep] / total[keep]).tolist(),
            "share": (total[keep] / total.sum()).tolist()}


def _logits(prob: np.ndarray, task: str) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1.0)
    if task == "multilabel":
        return np.log(p) - np.log(np.clip(1.0 - p, _EPS, 1.0))
    return np.log(p)


def apply_temperature(prob: np.ndarray, temperature: float, *, task: str) -> np.ndarray:
    """Probabilities of the logits divided by ``temperature``."""
    z = _logits(prob, task) / temperature
    return expit(z) if task == "multilabel" else softmax(z, axis=1)


def _nll(y_true: np.ndarray, prob: np.ndarray, temperature: float, task: str) -> float:
    z = _logits(prob, task) / temperature
    if task == "multilabel":
        y = np.asarray(y_true).astype(float)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))  # BCE with logits
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(z)), np.asarray(y_true).astype(int)]))


def fit_temperature(y_true: np.ndarray, prob: np.ndarray, *, task: str) -> float:
    """The T > 0 minimising the negative log-likelihood of ``y_true`` under ``prob``'s logits / T
    (searched in log T ∈ [−4, 4], i.e. T ∈ [0.018, 55]); 1.0 for fewer than two images."""
    if len(prob) < 2:
        return 1.0
    res = minimize_scalar(lambda log_t: _nll(y_true, prob, float(np.exp(log_t)), task), bounds=(-4.0, 4.0),
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def calibration_summary(val_true: np.ndarray, val_prob: np.ndarray, test_true: np.ndarray, test_prob: np.ndarray,
                        *, task: str, num_bins: int = NUM_BINS) -> dict:
    """A run's calibration: test ECE, Brier and reliability curve; the temperature fitted on
    validation and the test ECE and Brier after it (test images never fit anything)."""
    t = fit_temperature(val_true, val_prob, task=task)
    scaled = apply_temperature(test_prob, t, task=task)
    return {"ece": expected_calibration_error(test_true, test_prob, task=task, num_bins=num_bins),
            "brier": brier_score(test_true, test_prob, task=task),
            "temperature": t,
            "ece_scaled": expected_calibration_error(test_true, scaled, task=task, num_bins=num_bins),
            "brier_scaled": brier_score(test_true, scaled, task=task),
            "num_bins": num_bins,
            "reliability": reliability_curve(test_true, test_prob, task=task, num_bins=num_bins)}
