"""Validation selects, test reports: on records where validation and test rank two configurations in
opposite orders, every "best" in medtune follows validation."""

from __future__ import annotations



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
