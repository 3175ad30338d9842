"""Calibration: ECE, Brier and the reliability curve against reference formulas and scikit-learn;
temperature scaling fitted on validation repairs an over-confident model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from medtune.training.calibration import (
    apply_temperature,
    brier_score,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)


def _reference_ece(y, prob, num_bins):
    """Guo et al. 2017, eq. (3), written out: bins (i/M, (i+1)/M], top-label accuracy vs confidence."""
    conf, pred = prob.max(1), prob.argmax(1)
    ece = 0.0
    for i in range(num_bins):
        lo, hi = i / num_bins, (i + 1) / num_bins
        inside = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return ece


def _sample(n, k=3, scale=1.0, seed=0):
    """Labels drawn from softmax(z): calibrated at scale 1, over-confident at scale > 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    true_p = softmax(z, 1)
    y = np.array([rng.choice(k, p=p) for p in true_p])
    return y, softmax(z * scale, 1)


def test_ece_and_curve_match_reference_and_sklearn():
    y, prob = _sample(2000, scale=2.0)
    assert expected_calibration_error(y, prob, task="multiclass", num_bins=10) == pytest.approx(
        _reference_ece(y, prob, 10), abs=1e-12)
    curve = reliability_curve(y, prob, task="multiclass", num_bins=10)
    correct = (prob.argmax(1) == y).astype(int)
    acc, conf = calibration_curve(correct, prob.max(1), n_bins=10, strategy="uniform")
    np.testing.assert_allclose(curve["accuracy"], acc, atol=1e-12)
    np.testing.assert_allclose(curve["confidence"], conf, atol=1e-12)
    assert sum(curve["share"]) == pytest.approx(1.0)
    # ECE is the share-weighted gap of the curve
    assert expected_calibration_error(y, prob, task="multiclass", num_bins=10) == pytest.approx(
        sum(s * abs(a - c) for s, a, c in zip(curve["share"], curve["accuracy"], curve["confidence"])), abs=1e-12)


def test_brier_matches_formula_and_sklearn():
    y, prob = _sample(300)
    onehot = np.eye(3)[y]
    assert brier_score(y, prob, task="multiclass") == pytest.approx(((prob - onehot) ** 2).sum(1).mean(), abs=1e-12)
    yb = (y == 1).astype(int)
    pb = np.stack([1 - prob[:, 1], prob[:, 1]], 1)
    assert brier_score(yb, pb, task="binary") == pytest.approx(np.mean((prob[:, 1] - yb) ** 2), abs=1e-12)
    assert brier_score(yb, pb, task="binary") == pytest.approx(brier_score_loss(yb, prob[:, 1]), abs=1e-12)
    ml_y = np.stack([yb, 1 - yb], 1)
    assert brier_score(ml_y, pb[:, ::-1], task="multilabel") == pytest.approx(
        np.mean([brier_score_loss(ml_y[:, j], pb[:, ::-1][:, j]) for j in range(2)]), abs=1e-12)


def test_temperature_scaling_repairs_an_over_confident_model():
    y_val, p_val = _sample(1500, scale=3.0, seed=1)  # logits three times too large
    y_test, p_test = _sample(1500, scale=3.0, seed=2)
    t = fit_temperature(y_val, p_val, task="multiclass")
    assert t == pytest.approx(3.0, rel=0.15)
    out = calibration_summary(y_val, p_val, y_test, p_test, task="multiclass")
    assert out["temperature"] == t
    assert out["ece"] > 0.1 and out["ece_scaled"] < out["ece"] / 3, out
    assert out["brier_scaled"] < out["brier"]
    scaled = apply_temperature(p_test, t, task="multiclass")
    np.testing.assert_array_equal(scaled.argmax(1), p_test.argmax(1))  # no decision changes
    np.testing.assert_allclose(apply_temperature(p_test, 1.0, task="multiclass"), p_test, atol=1e-6)


def test_calibrated_model_keeps_temperature_one_and_low_ece():
    y, p = _sample(4000, scale=1.0, seed=3)
    assert fit_temperature(y, p, task="multiclass") == pytest.approx(1.0, abs=0.1)
    assert expected_calibration_error(y, p, task="multiclass") < 0.04


def test_multilabel_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (3000, 2))
    y = (rng.random((3000, 2)) < 1 / (1 + np.exp(-z))).astype(int)
    over = 1 / (1 + np.exp(-4 * z))
    assert fit_temperature(y, over, task="multilabel") == pytest.approx(4.0, rel=0.15)
