"""Statistics of the report layer against scipy and hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as sps

from medtune.errors import ConfigError
from medtune.reporting import friedman, pairwise_wilcoxon, recommend, summarize
from medtune.reporting.stats import holm, min_wilcoxon_pvalue


def _run(label, auc, *, seed=0, dataset="d", arch="a", params=100, seconds=1.0, status="done", val_auc=None,
         **extra):
    """A run record; its validation metrics equal its test metrics unless ``val_auc`` is given."""
    metrics = {"auc": auc, "accuracy": auc - 0.1}
    val = dict(metrics) if val_auc is None else {"auc": val_auc, "accuracy": val_auc - 0.1}
    return {"run_id": f"{dataset}{arch}{label}{seed}", "status": status, "dataset": dataset, "arch": arch,
            "strategy": label.split(":")[0], "label": label, "seed": seed, "train_fraction": 1.0,
            "metrics": metrics, "val_metrics": val, "trainable_params": params,
            "train_seconds": seconds, **extra}


# ----------------------------------------------------------------------------- summarize


def test_summarize_mean_sd_ci_on_known_numbers():
    runs = [_run("full", v, seed=i) for i, v in enumerate([0.8, 0.9, 1.0])] + [_run("linear", 0.7)]
    table = summarize(runs, metrics=["auc"])
    full = table[table["label"] == "full"].iloc[0]
    assert full["n"] == 3
    assert full["auc_mean"] == pytest.approx(0.9)
    assert full["auc_sd"] == pytest.approx(0.1)  # ddof=1
    # t quantile for df=2 in closed form: t = (2p - 1) / sqrt(2 p (1 - p)) at p = 0.975
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    half = t * 0.1 / math.sqrt(3)
    assert full["auc_ci_low"] == pytest.approx(0.9 - half)
    assert 0.9 + half > 1  # the t-interval leaves AUC's range; the reported one stops at 1.0
    assert full["auc_ci_high"] == 1.0
    loss = summarize([_run("full", 0.9, seed=i, metrics={"loss": v}) for i, v in enumerate([0.0, 0.05])],
                     metrics=["loss"]).iloc[0]
    assert loss["loss_ci_low"] == 0.0 and loss["loss_ci_high"] > 0.05  # a loss is never negative
    lin = table[table["label"] == "linear"].iloc[0]
    assert lin["n"] == 1 and lin["auc_mean"] == pytest.approx(0.7)
    assert math.isnan(lin["auc_sd"]) and math.isnan(lin["auc_ci_low"])


def test_summarize_groups_costs_and_ignores_unfinished_runs():
    runs = [_run("full", 0.9, seed=0, params=10, seconds=2.0), _run("full", 0.8, seed=1, params=10, seconds=4.0),
            _run("full", 0.1, seed=2, status="failed"), _run("full", 0.5, seed=0, arch="b")]
    table = summarize(runs, metrics=["auc"])
    assert list(table["arch"]) == ["a", "b"]
    a = table.iloc[0]
    assert a["n"] == 2 and a["auc_mean"] == pytest.approx(0.85)
    assert a["train_seconds"] == pytest.approx(3.0) and a["trainable_params"] == pytest.approx(10)
    assert a["strategy"] == "full"


def test_summarize_default_metrics_tolerate_missing_and_empty_input():
    table = summarize([_run("full", 0.9)])
    assert table["f1_mean"].isna().all() and table["auc_mean"].iloc[0] == pytest.approx(0.9)
    empty = summarize([])
    assert empty.empty and "auc_mean" in empty.columns


def test_summarize_rejects_unknown_metric_and_field():
    with pytest.raises(ConfigError, match="Did you mean 'auc'"):
        summarize([_run("full", 0.9)], metrics=["acu"])
    with pytest.raises(ConfigError, match="'by'.*'lable'.*Did you mean 'label'"):
        summarize([_run("full", 0.9)], by=["lable"])
    with pytest.raises(ConfigError, match="confidence"):
        summarize([_run("full", 0.9)], confidence=95)


# ----------------------------------------------------------------------------- friedman


def _grid(values: dict[str, list[float]]) -> list[dict]:
    """Runs with values[label][block], blocks = seeds of one dataset/arch."""
    return [_run(label, v, seed=b) for label, vals in values.items() for b, v in enumerate(vals)]


def test_friedman_matches_scipy_on_complete_blocks():
    values = {"a": [0.9, 0.8, 0.85, 0.7, 0.95], "b": [0.7, 0.75, 0.8, 0.72, 0.9], "c": [0.6, 0.5, 0.82, 0.6, 0.7]}
    runs = _grid(values)
    runs.append(_run("a", 0.99, seed=7))  # block 7 lacks b and c: must be left out
    res = friedman(runs, "auc")
    expected = sps.friedmanchisquare(*values.values())
    assert res["statistic"] == pytest.approx(expected.statistic)
    assert res["pvalue"] == pytest.approx(expected.pvalue)
    assert res["num_blocks"] == 5 and res["num_blocks_total"] == 6
    assert "lack some treatment" in res["note"]
    assert res["mean_ranks"]["a"] < res["mean_ranks"]["c"]  # rank 1 = best


def test_friedman_needs_three_treatments_and_two_blocks():
    res = friedman(_grid({"a": [0.9, 0.8], "b": [0.7, 0.6]}), "auc")
    assert res["pvalue"] is None and "at least 3 treatments" in res["note"]
    res = friedman(_grid({"a": [0.9], "b": [0.7], "c": [0.6]}), "auc")
    assert res["pvalue"] is None and "at least 2 complete blocks" in res["note"]
    res = friedman([], "auc")
    assert res["pvalue"] is None and res["num_blocks"] == 0


def test_friedman_rejects_unknown_metric():
    with pytest.raises(ConfigError, match="friedman.*'f2'.*Did you mean 'f1'|friedman.*'f2'"):
        friedman([_run("a", 0.9)], "f2")


# ----------------------------------------------------------------------------- wilcoxon + holm


def test_holm_matches_hand_computed_example():
    # sorted: .01*4=.04, .03*3=.09, .04*2=.08 -> running max .09, .20*1=.20
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.20]), [0.04, 0.09, 0.09, 0.20])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    out = holm([0.02, float("nan"), 0.01])
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)


def test_holm_matches_statsmodels_and_r_p_adjust():
    """Against an independent implementation (statsmodels' ``multipletests``) and R's algorithm
    (``p.adjust(p, "holm")`` = ``pmin(1, cummax((n - i + 1) * p[o]))[ro]``; R itself is not reachable
    offline, its output for this vector is 0.05 0.08 0.09 0.09 0.09)."""
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    np.testing.assert_allclose(holm([0.01, 0.02, 0.03, 0.04, 0.05]), [0.05, 0.08, 0.09, 0.09, 0.09])
    rng = np.random.default_rng(0)
    for size in (1, 2, 5, 17):
        for _ in range(20):
            p = rng.uniform(0, 0.2, size) ** rng.uniform(0.5, 2)
            p[rng.integers(0, size)] = p[0]  # ties
            np.testing.assert_allclose(holm(p), multitest.multipletests(p, method="holm")[1], rtol=0, atol=1e-15)


def test_min_wilcoxon_pvalue_matches_scipy_exact():
    for n in (3, 5, 6, 8):
        assert min_wilcoxon_pvalue(n) == pytest.approx(sps.wilcoxon(np.arange(1.0, n + 1)).pvalue)


def test_pairwise_wilcoxon_matches_scipy_and_holm():
    values = {"best": [0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97],
              "close": [0.905, 0.90, 0.925, 0.92, 0.945, 0.94, 0.965, 0.96],
              "bad": [0.80, 0.81, 0.79, 0.85, 0.84, 0.83, 0.86, 0.87]}
    table = pairwise_wilcoxon(_grid(values), "auc")
    assert table.iloc[0]["label"] == "best" and table.iloc[0]["not_worse_than_best"]
    raw = {k: sps.wilcoxon(values[k], values["best"]).pvalue for k in ("close", "bad")}
    adjusted = dict(zip(raw, holm(list(raw.values()))))
    for k in ("close", "bad"):
        row = table[table["label"] == k].iloc[0]
        assert row["reference"] == "best" and row["n"] == 8
        assert row["pvalue"] == pytest.approx(raw[k])
        assert row["p_holm"] == pytest.approx(adjusted[k])
    verdict = table.set_index("label")["not_worse_than_best"]
    assert verdict["bad"] == False  # noqa: E712 -- strictly False, not None
    assert verdict["close"] == True  # noqa: E712
    assert table.set_index("label").loc["bad", "significant"]


def test_pairwise_wilcoxon_all_pairs_and_reference():
    values = {"a": [0.9, 0.8, 0.85], "b": [0.7, 0.75, 0.8], "c": [0.6, 0.5, 0.82]}
    table = pairwise_wilcoxon(_grid(values), "auc", all_pairs=True)
    assert len(table) == 3 and set(map(tuple, table[["label", "reference"]].to_numpy())) == {
        ("b", "a"), ("c", "a"), ("c", "b")}
    table = pairwise_wilcoxon(_grid(values), "auc", reference="c")
    assert table.iloc[0]["label"] == "c" and set(table["reference"]) == {"c"}
    with pytest.raises(ConfigError, match="Did you mean 'a'|Available: a, b, c"):
        pairwise_wilcoxon(_grid(values), "auc", reference="aa")
    with pytest.raises(ConfigError, match="alpha"):
        pairwise_wilcoxon(_grid(values), "auc", alpha=5)


def test_pairwise_wilcoxon_identical_values_give_p_one():
    table = pairwise_wilcoxon(_grid({"a": [0.9, 0.8, 0.7], "b": [0.9, 0.8, 0.7]}), "auc")
    assert table.iloc[1]["pvalue"] == 1.0


# ----------------------------------------------------------------------------- recommend


def test_recommend_picks_cheap_config_within_noise_of_full(make_runs):
    runs = make_runs({"linear": 0.80, "top_k:1": 0.900, "top_k:2": 0.900, "full": 0.901, "scratch": 0.75})
    rec = recommend(runs, metric="auc")
    assert rec["method"] == "wilcoxon_holm"
    assert rec["best_label"] == "full"
    assert rec["label"] == "top_k:1"
    assert "linear" not in rec["not_worse"] and "scratch" not in rec["not_worse"]
    assert rec["params_ratio"] == pytest.approx(10.0)
    assert rec["time_ratio"] == pytest.approx(10.0 / 3.0)
    assert rec["p_holm"] >= 0.05
    assert "top_k:1" in rec["text"] and "not significantly worse" in rec["text"]


def test_recommend_rejects_cheap_config_that_is_clearly_worse(make_runs):
    runs = make_runs({"linear": 0.80, "top_k:1": 0.85, "top_k:2": 0.90, "full": 0.901})
    rec = recommend(runs)
    assert rec["label"] == "top_k:2"
    assert "top_k:1" not in rec["not_worse"]


def test_recommend_uses_loss_direction(make_runs):
    runs = make_runs({"linear": 0.80, "top_k:1": 0.900, "full": 0.901})
    rec = recommend(runs, metric="loss")
    assert rec["label"] == "top_k:1" and rec["best_label"] == "full"


def test_recommend_single_seed_falls_back_and_says_so(make_runs):
    runs = make_runs({"linear": 0.80, "top_k:1": 0.899, "full": 0.901}, seeds=(0,))
    rec = recommend(runs)
    assert rec["method"] == "within_sd"
    assert rec["label"] == "top_k:1"
    assert "significance can't be tested" in rec["text"]


def test_recommend_single_run_uses_tolerance(make_runs):
    means = {"linear": 0.80, "top_k:1": 0.895, "full": 0.90}
    runs = make_runs(means, seeds=(0,), datasets=("d",), archs=("resnet18",), amplitude=dict.fromkeys(means, 0.0))
    rec = recommend(runs, tolerance=0.01)
    assert rec["method"] == "within_tolerance" and rec["label"] == "top_k:1"
    assert recommend(runs, tolerance=0.001)["label"] == "full"


def test_recommend_too_few_blocks_for_wilcoxon(make_runs):
    runs = make_runs({"linear": 0.80, "full": 0.90}, datasets=("d",), archs=("resnet18",))
    rec = recommend(runs)  # 3 paired blocks: min p = 0.25, the test can never reject
    assert rec["method"] == "within_sd" and rec["label"] == "full"
    assert "cannot reach" in rec["text"]


def test_recommend_reports_fooling_rate(make_runs, make_attacks):
    runs = make_runs({"linear": 0.80, "top_k:1": 0.900, "full": 0.901})
    rec = recommend(runs, make_attacks(runs), main_zeta=0.04)
    assert rec["label"] == "top_k:1"
    assert rec["fooling_rate"]["natural"]["rate"] == pytest.approx(0.1 + 5 * 0.04)
    assert rec["fooling_rate"]["train"]["rate"] == pytest.approx(0.2 + 6 * 0.04)
    assert "0.30" in rec["text"]
    assert recommend(runs, make_attacks(runs), main_zeta=0.5)["fooling_rate"] is None


def test_recommend_without_runs_or_full():
    assert recommend([])["label"] is None
    rec = recommend([_run("a", 0.9), _run("b", 0.8)])
    assert rec["params_ratio"] is None and "No 'full' runs" in rec["text"]
    with pytest.raises(ConfigError, match="alpha"):
        recommend([_run("a", 0.9)], alpha=0)
    with pytest.raises(ConfigError, match="recommend.*Did you mean 'auc'"):
        recommend([_run("a", 0.9)], metric="acu")
