"""Uncertainty over the evaluated images: per-run confidence intervals and paired comparisons.

A run's test metric is an estimate from a finite test set; these functions give its interval
(DeLong for a binary AUC, a percentile bootstrap over the images otherwise, via
``scipy.stats.bootstrap``) and compare two configurations evaluated on the *same* images (DeLong's
test for two correlated binary AUCs; a paired bootstrap of the seed-averaged metric difference for
any metric). Every interval stays inside the metric's range.

scipy and scikit-learn have no DeLong implementation, hence the hand-written one (Sun & Xu 2014,
"Fast implementation of DeLong's algorithm", IEEE SPL 21:1389, with midranks for ties); the metrics
are re-implemented vectorised over bootstrap resamples because calling scikit-learn once per
resample costs ~1000× more. Both are checked against scikit-learn / direct definitions in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

__all__ = ["delong_auc", "delong_test", "metric_intervals", "paired_bootstrap", "resampled_metric",
           "INTERVAL_METRICS"]

#: Metrics whose per-run intervals are computed (single-label tasks).
INTERVAL_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their mean rank."""
    return sps.rankdata(x, axis=-1)


def _structural_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (k,) and DeLong's placement values V10 (k, m) and V01 (k, n) of k score vectors."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg], axis=1))
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def _check_binary(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y).astype(int).ravel()
    if set(np.unique(y)) - {0, 1} or y.min() == y.max():
        raise ValueError("DeLong needs binary labels with both classes present.")
    return y


def delong_auc(y_true: Sequence[int], score: Sequence[float]) -> tuple[float, float]:
    """AUC of a binary score and DeLong's variance of it.

    Args:
        y_true: 0/1 labels, both present.
        score: the positive class's score (higher = more positive).

    Returns:
        (auc, variance).
    """
    y = _check_binary(np.asarray(y_true))
    aucs, v10, v01 = _structural_components(y, np.asarray(score, dtype=float)[None, :])
    var = v10.var(axis=1, ddof=1) / v10.shape[1] + v01.var(axis=1, ddof=1) / v01.shape[1]
    return float(aucs[0]), float(var[0])


def delong_test(y_true: Sequence[int], score_a: Sequence[float], score_b: Sequence[float]) -> dict[str, float]:
    """DeLong's test of two correlated AUCs (same images): difference, z and two-sided p.

    Returns:
        dict with ``auc_a``, ``auc_b``, ``diff`` (a − b), ``z`` and ``pvalue`` (1.0 when the
        difference has zero variance and is zero).
    """
    y = _check_binary(np.asarray(y_true))
    scores = np.stack([np.asarray(score_a, float), np.asarray(score_b, float)])
    aucs, v10, v01 = _structural_components(y, scores)
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 0:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / math.sqrt(var)
        p = float(2 * sps.norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "z": float(z), "pvalue": p}


def resampled_metric(metric: str, y: np.ndarray, prob: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``metric`` of (y[idx], prob[idx]) for every row of an index matrix ``idx`` (B, n), as
    :func:`medtune.training.metrics.compute_metrics` defines it for single-label tasks."""
    idx = np.atleast_2d(idx)
    yy, num_classes = y[idx], prob.shape[1]
    if metric == "auc":
        aucs = []
        for c in (range(1, 2) if num_classes == 2 else range(num_classes)):
            pos = yy == c
            m = pos.sum(axis=1)
            n = pos.shape[1] - m
            ranks = _midranks(prob[idx, c])
            with np.errstate(invalid="ignore", divide="ignore"):
                aucs.append(((ranks * pos).sum(axis=1) - m * (m + 1) / 2) / (m * n))
        return np.nanmean(np.stack(aucs), axis=0) if num_classes > 2 else aucs[0]
    pred = prob.argmax(axis=1)[idx]
    if metric == "accuracy":
        return (yy == pred).mean(axis=1)
    recalls, f1s, present = [], [], []
    for c in range(num_classes):
        t, p = yy == c, pred == c
        tp, support, predicted = (t & p).sum(axis=1), t.sum(axis=1), p.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(support > 0, tp / support, np.nan))
            f1s.append(np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0))
        present.append(support > 0)
    if metric == "balanced_accuracy":
        return np.nanmean(np.stack(recalls), axis=0)
    if metric == "f1":
        return np.stack(f1s).mean(axis=0)
    raise ValueError(f"No resampled form of metric {metric!r}.")


def metric_intervals(y_true: np.ndarray, prob: np.ndarray, *, task: str, confidence: float = 0.95,
                     num_resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Per-run confidence intervals of the metrics over the evaluated images.

    A binary AUC gets DeLong's interval on the logit scale (so it stays in [0, 1]); the other
    metrics (and a multi-class AUC) a percentile bootstrap over the images with
    ``scipy.stats.bootstrap`` (percentiles of the metric itself, so inside its range).
    Multi-label tasks get none (empty dict).

    Returns:
        {metric: [low, high]}; a metric whose interval is undefined (e.g. one class only) is left out.
    """
    if task == "multilabel" or len(y_true) < 2:
        return {}
    y = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=float)
    out: dict[str, list[float]] = {}
    for metric in INTERVAL_METRICS:
        if metric == "auc" and prob.shape[1] == 2 and 0 < y.sum() < len(y):
            auc, var = delong_auc(y, prob[:, 1])
            if var == 0 or auc in (0.0, 1.0):
                out[metric] = [auc, auc] if var == 0 else _bootstrap(metric, y, prob, confidence, num_resamples, seed)
                continue
            z = sps.norm.ppf(0.5 + confidence / 2)
            logit, se = math.log(auc / (1 - auc)), math.sqrt(var) / (auc * (1 - auc))
            out[metric] = [float(1 / (1 + math.exp(-(logit - z * se)))), float(1 / (1 + math.exp(-(logit + z * se))))]
            continue
        interval = _bootstrap(metric, y, prob, confidence, num_resamples, seed)
        if interval is not None:
            out[metric] = interval
    return out


#: Bootstrap resamples evaluated per vectorised call of a metric.
_RESAMPLE_BATCH = 100


def _bootstrap(metric: str, y: np.ndarray, prob: np.ndarray, confidence: float, num_resamples: int,
               seed: int) -> list[float] | None:
    def statistic(idx, axis=-1):
        return resampled_metric(metric, y, prob, np.asarray(idx, dtype=int))

    with np.errstate(all="ignore"):
        # batches of resamples: memory O(batch · N) instead of O(num_resamples · N) (436 MiB for a
        # 3-class AUC over 6,000 images at once), the same resamples in the same order, the same interval
        res = sps.bootstrap((np.arange(len(y)),), statistic, vectorized=True, n_resamples=num_resamples,
                            confidence_level=confidence, method="percentile", random_state=seed,
                            batch=_RESAMPLE_BATCH)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if math.isnan(low) or math.isnan(high) else [low, high]


def paired_bootstrap(y_true: np.ndarray, probs_a: Sequence[np.ndarray], probs_b: Sequence[np.ndarray], metric: str,
                     *, num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap over the images of the difference of seed-averaged metrics, a − b.

    Each configuration is given as one probability matrix per seed, all on the same images
    ``y_true``. One resample of the images is applied to every seed of both configurations, so the
    comparison is paired and keeps the images' correlation.

    Returns:
        dict with ``diff`` (on the original images), ``ci_low``/``ci_high`` (percentile) and a
        two-sided ``pvalue`` = 2 · min(P*(Δ ≤ 0), P*(Δ ≥ 0)) (capped at 1).
    """
    y = np.asarray(y_true).astype(int)
    rng = np.random.default_rng(seed)
    full = np.arange(len(y))[None, :]

    def seed_mean(probs: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
        return np.nanmean(np.stack([resampled_metric(metric, y, np.asarray(p, float), index) for p in probs]), axis=0)

    diff = float((seed_mean(probs_a, full) - seed_mean(probs_b, full))[0])
    # resamples drawn and scored in batches (memory O(batch · N)); the generator's stream is the
    # same as one (num_resamples, N) draw, so are the resamples
    boot = np.concatenate([
        seed_mean(probs_a, idx) - seed_mean(probs_b, idx)
        for idx in (rng.integers(0, len(y), size=(min(_RESAMPLE_BATCH, num_resamples - k), len(y)))
                    for k in range(0, num_resamples, _RESAMPLE_BATCH))])
    boot = boot[~np.isnan(boot)]
    if not len(boot):
        return {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "pvalue": math.nan}
    alpha = 1 - confidence
    p = min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
    return {"diff": diff, "ci_low": float(np.quantile(boot, alpha / 2)),
            "ci_high": float(np.quantile(boot, 1 - alpha / 2)), "pvalue": p}
