"""Per-run intervals and paired comparisons over the evaluated images, against references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from medtune.training.intervals import (delong_auc, delong_test, metric_intervals, paired_bootstrap,
                                        resampled_metric)
from medtune.training.metrics import compute_metrics


def _data(num=60, num_classes=2, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, num)
    logits = rng.normal(size=(num, num_classes)) + signal * np.eye(num_classes)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, np.round(prob, 2)  # rounding creates ties, which the rank formulas must handle


def test_delong_on_a_hand_computed_example():
    # placements: V10 = [0.5, 1], V01 = [1, 0.5] -> var = 0.125/2 + 0.125/2
    auc, var = delong_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert auc == pytest.approx(0.75) and var == pytest.approx(0.125)


def test_delong_matches_sklearn_auc_and_the_direct_definition_with_ties():
    y, prob = _data(num=41, seed=3)
    score = prob[:, 1]
    auc, var = delong_auc(y, score)
    assert auc == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    pos, neg = score[y == 1], score[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # the O(mn) definition
    direct = psi.mean(1).var(ddof=1) / len(pos) + psi.mean(0).var(ddof=1) / len(neg)
    assert var == pytest.approx(direct, rel=1e-12)


def test_delong_test_of_two_scores():
    y, prob = _data(num=80, seed=1)
    same = delong_test(y, prob[:, 1], prob[:, 1])
    assert same["diff"] == 0 and same["pvalue"] == 1.0
    noise = np.random.default_rng(9).uniform(size=len(y))
    res = delong_test(y, prob[:, 1], noise)
    assert res["diff"] == pytest.approx(skm.roc_auc_score(y, prob[:, 1]) - skm.roc_auc_score(y, noise))
    assert res["pvalue"] < 0.01 and res["z"] > 0


@pytest.mark.parametrize("num_classes", [2, 3])
def test_resampled_metrics_equal_compute_metrics(num_classes):
    y, prob = _data(num=50, num_classes=num_classes, seed=num_classes)
    task = "binary" if num_classes == 2 else "multiclass"
    ref = compute_metrics(y, prob, task=task, class_names=[str(c) for c in range(num_classes)])
    idx = np.arange(len(y))[None, :]
    for m in ("auc", "accuracy", "balanced_accuracy", "f1"):
        assert resampled_metric(m, y, prob, idx)[0] == pytest.approx(ref[m], abs=1e-12), m
    boot = np.random.default_rng(0).integers(0, len(y), size=(5, len(y)))
    for row in boot:  # a resample too: same as scikit-learn on the resampled images
        assert resampled_metric("f1", y, prob, row[None])[0] == pytest.approx(
            skm.f1_score(y[row], prob[row].argmax(1), labels=list(range(num_classes)), average="macro",
                         zero_division=0), abs=1e-12)


def test_intervals_stay_in_range_contain_the_estimate_and_match_scipy():
    y, prob = _data(num=45, seed=5, signal=3.0)  # a near-perfect classifier: naive intervals pass 1.0
    ci = metric_intervals(y, prob, task="binary")
    ref = compute_metrics(y, prob, task="binary", class_names=["a", "b"])
    for m, (low, high) in ci.items():
        assert 0.0 <= low <= ref[m] <= high <= 1.0, m
    # the bootstrap interval is scipy's percentile bootstrap with scikit-learn as the statistic
    res = sps.bootstrap((np.arange(len(y)),), lambda i: skm.accuracy_score(y[i], prob[i].argmax(1)),
                        vectorized=False, n_resamples=1000, method="percentile", random_state=0)
    assert ci["accuracy"] == pytest.approx([res.confidence_interval.low, res.confidence_interval.high], abs=1e-12)
    y2, prob2 = _data(num=45, seed=5, signal=1.0)
    auc, var = delong_auc(y2, prob2[:, 1])
    z, logit, se = 1.959963984540054, np.log(auc / (1 - auc)), np.sqrt(var) / (auc * (1 - auc))
    expected = [1 / (1 + np.exp(-(logit - z * se))), 1 / (1 + np.exp(-(logit + z * se)))]
    assert metric_intervals(y2, prob2, task="binary")["auc"] == pytest.approx(expected, rel=1e-9)
    assert metric_intervals(y, prob, task="binary") == ci  # seeded
    assert metric_intervals(y, prob, task="multilabel") == {}


def test_paired_bootstrap_separates_configurations_on_the_same_images():
    y, good = _data(num=120, seed=2, signal=2.5)
    _, bad = _data(num=120, seed=4, signal=0.0)
    same = paired_bootstrap(y, [good], [good], "auc", num_resamples=500)
    assert same["diff"] == 0 and same["pvalue"] == 1.0
    res = paired_bootstrap(y, [good, good], [bad, bad], "auc", num_resamples=500)
    assert res["diff"] > 0.2 and res["ci_low"] > 0 and res["pvalue"] < 0.01


def test_bootstrap_memory_does_not_scale_with_the_resamples():
    # 1000 resamples of 4,000 images at once held ≈ 290 MiB for a 3-class AUC; in batches it is O(batch · N)
    import tracemalloc

    y, prob = _data(num=4000, num_classes=3, seed=1)
    tracemalloc.start()
    try:
        ci = metric_intervals(y, prob, task="multiclass")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    ref = compute_metrics(y, prob, task="multiclass", class_names=["a", "b", "c"])
    assert ci["auc"][0] <= ref["auc"] <= ci["auc"][1]


def test_paired_bootstrap_in_batches_equals_one_draw_of_every_resample():
    # the direct computation: every resample drawn at once, as before batching
    y, a = _data(num=150, num_classes=3, seed=6, signal=2.0)
    _, b = _data(num=150, num_classes=3, seed=7, signal=1.0)
    idx = np.random.default_rng(0).integers(0, len(y), size=(250, len(y)))
    boot = resampled_metric("auc", y, a, idx) - resampled_metric("auc", y, b, idx)
    boot = boot[~np.isnan(boot)]
    res = paired_bootstrap(y, [a], [b], "auc", num_resamples=250, seed=0)  # 3 batches, the last partial
    # the same resamples; vectorised sums over arrays of another shape may differ in the last bit
    assert [res["ci_low"], res["ci_high"]] == pytest.approx(np.quantile(boot, [0.025, 0.975]), rel=1e-12)
    assert res["pvalue"] == min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
