"""Validation selects, test reports: on records where validation and test rank two configurations in
opposite orders, every "best" in medtune follows validation."""

from __future__ import annotations



import numpy as np
import pytest

from medtune.reporting import recommend
from medtune.reporting._data import build_report_data
from medtune.reporting.plots import _best_runs


def _record(label, val_auc, test_auc, *, dataset, arch, seed, params):
    return {"run_id": f"{dataset}-{arch}-{label}-{seed}", "status": "done", "dataset": dataset, "arch": arch,
            "strategy": label.split(":")[0], "label": label, "seed": seed, "train_fraction": 1.0,
            "metrics": {"auc": test_auc, "accuracy": test_auc - 0.1},
            "val_metrics": {"auc": val_auc, "accuracy": val_auc - 0.1},
            "trainable_params": params, "train_seconds": 1.0, "config": {"lr": 1e-3},
            "predictions": {"y_true": [0, 1, 0, 1], "y_prob": [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]],
                            "class_names": ["a", "b"]}}


@pytest.fixture
def opposite_runs():
    """top_k:1 is better on validation (0.95 vs 0.85) but worse on test (0.80 vs 0.90) in 12 blocks."""
    runs = []
    for dataset in ("d1", "d2"):
        for arch in ("a1", "a2"):
            for seed in range(3):
                eps = 0.001 * (seed + 3 * (dataset == "d2") + 6 * (arch == "a2"))
                runs.append(_record("top_k:1", 0.95 + eps, 0.80 - eps, dataset=dataset, arch=arch, seed=seed,
                                    params=1000))
                runs.append(_record("full", 0.85 - eps, 0.90 + eps, dataset=dataset, arch=arch, seed=seed,
                                    params=1000))
    return runs


def test_recommendation_follows_validation_and_reports_test(opposite_runs):
    rec = recommend(opposite_runs, metric="auc")
    assert rec["selected_on"] == "val"
    assert rec["best_label"] == "top_k:1" and rec["label"] == "top_k:1"
    assert rec["method"] == "wilcoxon_holm" and rec["not_worse"] == ["top_k:1"]  # full is worse on validation
    assert rec["mean"] == pytest.approx(0.80 - 0.001 * 5.5, abs=1e-9)  # reported: the test mean
    assert rec["val_mean"] == pytest.approx(0.95 + 0.001 * 5.5, abs=1e-9)
    assert "selected on validation" in rec["text"] and "test auc 0.79" in rec["text"]


def test_highlights_and_significance_marks_follow_validation(opposite_runs):
    data = build_report_data(opposite_runs, [], [], metric="auc", alpha=0.05, main_zeta=0.04)
    highlighted = [row for row in data.summary.rows if "auc" in row["best"]]
    assert len(highlighted) == 2 and {row["label"] for row in highlighted} == {"top_k:1"}  # one per dataset
    for row in data.summary.rows:
        assert row["not_worse"] == (row["label"] == "top_k:1")
    tests = data.statistics.wilcoxon.set_index("label")
    assert tests.loc["top_k:1", "reference"] == "top_k:1"
    assert tests.loc["full", "not_worse_than_best"] is False or tests.loc["full", "not_worse_than_best"] == False  # noqa: E712
    assert _best_runs(opposite_runs, "auc", 1)[0]["label"] == "top_k:1"


def test_deft_top_k_baseline_follows_validation():
    from medtune.deft.driver import compare_with_baselines

    def row(strategy, val, test):
        return {"strategy": strategy, "auc_mean": test, "auc_sd": 0.0, "accuracy_mean": test - 0.1,
                "val_auc_mean": val, "trainable_params": 10, "train_seconds": 1.0, "n_seeds": 2}

    rows = [row("deft:0110", 0.9, 0.9), row("full", 0.9, 0.9), row("top_k:1", 0.95, 0.80), row("top_k:2", 0.85, 0.93)]
    comparison, select = compare_with_baselines(rows, "auc", search_seconds=12.5, search_trainings=7)
    assert select == "val_auc_mean"
    assert [c["label"] for c in comparison] == ["deft", "full", "top_k:1"]
    deft = comparison[0]
    assert deft["search_seconds"] == 12.5 and deft["search_trainings"] == 7
    assert comparison[1]["search_seconds"] == 0.0
    # a loss monitor picks the lowest validation loss
    for r, loss in zip(rows, (0.3, 0.3, 0.5, 0.2)):
        r["val_loss_mean"] = loss
    assert compare_with_baselines(rows, "loss")[0][-1]["label"] == "top_k:2"


def test_no_validation_metric_means_no_recommendation():
    runs = [{"run_id": "r", "status": "done", "dataset": "d", "arch": "a", "strategy": "full", "label": "full",
             "seed": 0, "train_fraction": 1.0, "metrics": {"auc": 0.9}, "trainable_params": 1, "train_seconds": 1}]
    rec = recommend(runs)
    assert rec["label"] is None and "never uses the test split" in rec["text"]


# --------------------------------------------------------------- paired tests on the validation images


def _val_record(label, val_prob, test_prob, y_val, y_test, *, seed, params):
    """A run record with exact validation and test probabilities; its metrics are computed from them."""
    from sklearn.metrics import roc_auc_score

    return {"run_id": f"{label}-{seed}", "status": "done", "dataset": "d", "arch": "a",
            "strategy": label.split(":")[0], "label": label, "seed": seed, "train_fraction": 1.0,
            "metrics": {"auc": roc_auc_score(y_test, test_prob[:, 1])},
            "val_metrics": {"auc": roc_auc_score(y_val, val_prob[:, 1])},
            "trainable_params": params, "train_seconds": 1.0, "config": {"lr": 1e-3},
            "val_predictions": {"y_true": y_val.tolist(), "y_prob": val_prob.tolist()}}


def _probs(y, quality, rng):
    """Binary probabilities whose separation of the classes grows with ``quality``."""
    score = quality * (2 * y - 1) + rng.normal(0, 1, len(y))
    p1 = 1 / (1 + np.exp(-score))
    return np.stack([1 - p1, p1], axis=1)


@pytest.fixture
def two_seed_runs():
    """Two seeds (too few for Wilcoxon): ``cheap`` is as good as ``full`` on validation, ``poor`` is far
    worse; on the test images the order is reversed, so a selection that read test would pick ``poor``."""
    rng = np.random.default_rng(0)
    y_val, y_test = np.tile([0, 1], 100), np.tile([0, 1], 50)
    runs = []
    for seed in (0, 1):
        runs.append(_val_record("full", _probs(y_val, 2.0, rng), _probs(y_test, 0.2, rng), y_val, y_test,
                                seed=seed, params=1000))
        runs.append(_val_record("top_k:1", _probs(y_val, 2.0, rng), _probs(y_test, 0.2, rng), y_val, y_test,
                                seed=seed, params=100))
        runs.append(_val_record("linear", _probs(y_val, 0.3, rng), _probs(y_test, 3.0, rng), y_val, y_test,
                                seed=seed, params=10))
    return runs


def test_with_two_seeds_a_paired_bootstrap_on_validation_decides(two_seed_runs):
    from medtune.reporting.stats import holm, paired_validation_tests
    from medtune.training.intervals import paired_bootstrap

    rec = recommend(two_seed_runs, metric="auc")
    assert rec["method"] == "paired_bootstrap_holm"
    assert "linear" not in rec["not_worse"]  # far worse on validation: rejected, whatever test says
    assert rec["label"] == "top_k:1" and set(rec["not_worse"]) == {"full", "top_k:1"}
    assert "paired bootstrap over the validation images" in rec["text"]
    # the stored tests are the library's paired bootstrap, Holm-corrected over the comparisons
    best = rec["best_label"]
    others = [lab for lab in ("full", "top_k:1", "linear") if lab != best]
    by = {lab: [np.asarray(r["val_predictions"]["y_prob"]) for r in two_seed_runs if r["label"] == lab]
          for lab in ("full", "top_k:1", "linear")}
    y = np.asarray(two_seed_runs[0]["val_predictions"]["y_true"])
    raw = [paired_bootstrap(y, by[lab], by[best], "auc", num_resamples=2000, seed=0)["pvalue"] for lab in others]
    tests = paired_validation_tests(two_seed_runs, ["full", "top_k:1", "linear"], best, "auc")
    np.testing.assert_allclose([tests[lab]["p_holm"] for lab in others], holm(raw))
    assert tests["linear"]["p_holm"] < 0.05 and tests["linear"]["diff"] < 0


def test_paired_tests_need_shared_validation_images(two_seed_runs):
    from medtune.reporting.stats import paired_validation_tests

    runs = [dict(r) for r in two_seed_runs]
    runs[0] = {**runs[0], "val_predictions": {"y_true": list(reversed(runs[0]["val_predictions"]["y_true"])),
                                              "y_prob": runs[0]["val_predictions"]["y_prob"]}}
    assert paired_validation_tests(runs, ["full", "top_k:1", "linear"], "full", "auc") is None
    assert recommend(runs, metric="auc")["method"] == "within_sd"
    no_preds = [{k: v for k, v in r.items() if k != "val_predictions"} for r in two_seed_runs]
    assert recommend(no_preds, metric="auc")["method"] == "within_sd"
    assert paired_validation_tests(two_seed_runs, ["full", "linear"], "full", "loss") is None
