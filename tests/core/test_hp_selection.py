"""Learning rates and strategy parameters as sweep axes, each strategy at its value best on validation."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.config import SweepConfig
from medtune.reporting import recommend
from medtune.reporting._data import build_report_data
from medtune.reporting.stats import select_hyperparameters
from medtune.sweeps import expand_sweep, format_table, results_table

TINY = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1, "img_size": 16,
        "batch_size": 16, "device": "cpu", "progress": False}


def test_lr_lists_and_parameter_alternatives_are_axes():
    cfg = SweepConfig.from_dict({**TINY, "strategy": "linear,lp_ft:ft_lr_scale=0.1|0.01", "lr": "1e-3,1e-2",
                                 "train_fraction": "0.5"})
    assert cfg.lr == (1e-3, 1e-2) and cfg.train_fraction == (0.5,) and cfg.base.lr == 1e-3
    runs = expand_sweep(cfg)
    assert [(str(r.strategy), r.lr) for r in runs] == [
        ("linear", 1e-3), ("linear", 1e-2), ("lp_ft", 1e-3), ("lp_ft", 1e-2),
        ("lp_ft:ft_lr_scale=0.01", 1e-3), ("lp_ft:ft_lr_scale=0.01", 1e-2)]
    assert SweepConfig.from_dict(cfg.to_dict()) == cfg
    assert SweepConfig.from_dict(TINY).lr == (1e-3,)  # one value: the base run's


def test_a_sweep_with_two_lrs_reports_each_strategy_at_its_validation_best(tmp_path):
    import medtune

    records = medtune.sweep({**TINY, "strategy": ["linear", "full"], "lr": [1e-3, 3e-2], "seeds": [0, 1]},
                            store=str(tmp_path / "s"))
    assert len(records) == 8
    rows = results_table(records)
    assert len(rows) == 4 and "hyper-parameters" in format_table(rows)  # per-value rows stay available
    selected, choices = select_hyperparameters(records, "auc")
    assert {c["configuration"] for c in choices} == {"linear", "full"}
    for choice in choices:
        by_lr = {}
        for r in records:
            if r["label"] == choice["configuration"]:
                by_lr.setdefault(r["config"]["lr"], []).append(r["val_metrics"]["auc"])
        best_lr = max(by_lr, key=lambda lr: (np.mean(by_lr[lr]), -lr))  # ties: the first value in text order
        assert f"lr={best_lr:g}" in choice["chosen"]
        kept = [r for r in selected if r["label"] == choice["configuration"]]
        assert len(kept) == 2 and {r["config"]["lr"] for r in kept} == {best_lr}
    data = build_report_data(records, [], [], metric="auc", alpha=0.05, main_zeta=0.04)
    assert len(data.summary.rows) == 2 and data.hp_choices == choices
    assert "summary_per_value" in data.csv and len(data.csv["summary_per_value"]) == 4
    assert recommend(records)["label"] in ("linear", "full")
    html = medtune.report(str(tmp_path / "s"))
    text = open(html).read()
    assert "Tuned hyper-parameters" in text and choices[0]["chosen"] in text


@pytest.mark.parametrize("bad", [{"lr": "1e-3,nan"}, {"lr": [0.0]}, {"weight_decay": [-1]}])
def test_bad_axis_values_fail_when_the_sweep_is_built(bad):
    from medtune.errors import ConfigError

    with pytest.raises(ConfigError):
        SweepConfig.from_dict({**TINY, **bad})
