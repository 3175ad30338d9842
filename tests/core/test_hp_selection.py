"""Learning rates and strategy parameters as sweep axes, each strategy at its value best on validation."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.config import SweepConfig
from medtune.reporting import recommend
from medtune.reporting._data import build_report_data
from medtune.reporting.stats import configuration, select_hyperparameters
from medtune.sweeps import expand_sweep, format_table, results_table

TINY = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1, "img_size": 16,
        "batch_size": 16, "device": "cpu", "progress": False}


def test_lr_lists_and_parameter_alternatives_are_axes():
    cfg = SweepConfig.from_dict({**TINY, "strategy": "linear,lp_ft:ft_lr_scale=0.1|0.01", "lr": "1e-3,1e-2",
                                 "train_fraction": "0.5"})
    assert cfg.lr == (1e-3, 1e-2) and cfg.train_fraction == (0.5,) and cfg.base.lr == 1e-3
    runs = expand_sweep(cfg)
    assert [(str(r.strategy), r.lr) for r in runs] == [
        ("linear", 1e-3), ("lp_ft", 1e-3), ("lp_ft", 1e-2),
        ("lp_ft:ft_lr_scale=0.01", 1e-3), ("lp_ft:ft_lr_scale=0.01", 1e-2)]
    assert SweepConfig.from_dict(cfg.to_dict()) == cfg
    assert SweepConfig.from_dict(TINY).lr == (1e-3,)  # one value: the base run's


def test_a_sweep_with_two_lrs_reports_each_strategy_at_its_validation_best(tmp_path):
    import medtune

    records = medtune.sweep({**TINY, "strategy": ["linear:solver=epochs", "full"], "lr": [1e-3, 3e-2],
                             "seeds": [0, 1]}, store=str(tmp_path / "s"))
    assert len(records) == 8
    rows = results_table(records)
    assert len(rows) == 4 and "hyper-parameters" in format_table(rows)  # per-value rows stay available
    selected, choices = select_hyperparameters(records, "auc")
    assert {c["configuration"] for c in choices} == {"linear", "full"}  # solver=epochs is the linear config's
    for choice in choices:
        by_lr = {}
        for r in records:
            if configuration(r)[0] == choice["configuration"]:
                by_lr.setdefault(r["config"]["lr"], []).append(r["val_metrics"]["auc"])
        best_lr = max(by_lr, key=lambda lr: (np.mean(by_lr[lr]), -lr))  # ties: the first value in text order
        assert f"lr={best_lr:g}" in choice["chosen"]
        kept = [r for r in selected if configuration(r)[0] == choice["configuration"]]
        assert len(kept) == 2 and {r["config"]["lr"] for r in kept} == {best_lr}
    data = build_report_data(records, [], [], metric="auc", alpha=0.05, main_zeta=0.04)
    assert len(data.summary.rows) == 2 and data.hp_choices == choices
    assert "summary_per_value" in data.csv and len(data.csv["summary_per_value"]) == 4
    assert recommend(records)["label"] in ("linear", "full")  # relabelled with the configuration
    html = medtune.report(str(tmp_path / "s"))
    text = open(html).read()
    assert "Tuned hyper-parameters" in text and choices[0]["chosen"] in text


def test_a_solved_probe_runs_once_per_cell_of_the_axes_it_uses():
    cfg = SweepConfig.from_dict({**TINY, "strategy": "linear,linear:solver=epochs,full", "lr": "1e-3,1e-2",
                                 "weight_decay": "0,1e-4", "seeds": "0,1"})
    told: list[str] = []
    runs = expand_sweep(cfg, log=told.append)
    cells = {}
    for r in runs:
        cells.setdefault(str(r.strategy), set()).add((r.lr, r.weight_decay, r.seed))
    # L-BFGS with C chosen on validation: lr and weight decay are unused, every (lr, wd) would repeat the run
    assert cells["linear"] == {(1e-3, 0.0, 0), (1e-3, 0.0, 1)}
    assert len(cells["linear:solver=epochs"]) == len(cells["full"]) == 8  # trained by epochs: every cell
    assert len(told) == 1 and "linear on medtune_tiny_cnn: solved by L-BFGS" in told[0]
    assert expand_sweep(SweepConfig.from_dict({**TINY, "strategy": "linear"}), log=told.append)  # one cell: no note
    assert len(told) == 1


def test_reused_probe_fits_are_the_same_fit_and_charged_its_time(tmp_path):
    import medtune
    from medtune.strategies import probing

    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(60, 5)), rng.normal(size=(20, 5))
    y, yv = (x[:, 0] > 0).astype(int), (xv[:, 0] > 0).astype(int)
    kw = dict(task="binary", num_classes=2, select="accuracy", cs=probing.c_grid(4))
    probing._REUSED.clear()
    first, seconds, reused = probing.fit_logistic_head_reusing(x, y, xv, yv, **kw)
    again, seconds2, reused2 = probing.fit_logistic_head_reusing(x.copy(), y.copy(), xv, yv, **kw)
    assert not reused and reused2 and seconds2 == seconds
    assert np.array_equal(first.weight, again.weight) and first.grid == again.grid and again is not first
    fresh = probing.fit_logistic_head(x, y, xv, yv, **kw)
    assert np.array_equal(fresh.weight, again.weight) and fresh.c == again.c
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    assert not probing.fit_logistic_head_reusing(x, y2, xv, yv, **kw)[2]  # other inputs: fitted anew
    assert not probing.fit_logistic_head_reusing(x, y, xv, yv, **{**kw, "cs": probing.c_grid(3)})[2]

    # in a sweep: linear and LP-FT at two LRs solve one probe; later runs reuse it and are charged its time
    probing._REUSED.clear()
    records = medtune.sweep({**TINY, "weights": "none", "strategy": ["linear", "lp_ft"], "lr": [1e-3, 1e-2]},
                            store=str(tmp_path / "s"))
    probes = [(r["label"], r["config"]["lr"], r["extras"]["linear_probe"]) for r in records]
    assert [(label, lr, p["reused"]) for label, lr, p in probes] == [
        ("linear", 1e-3, False), ("lp_ft", 1e-3, True), ("lp_ft", 1e-2, True)]
    assert len({p["c"] for _, _, p in probes}) == 1
    fit_seconds = probes[0][2]["fit_seconds"]
    assert all(p["fit_seconds"] == fit_seconds for _, _, p in probes)
    assert all(r["history"][0]["seconds"] >= fit_seconds for r in records)  # reused: charged the fit's time


@pytest.mark.parametrize("bad", [{"lr": "1e-3,nan"}, {"lr": [0.0]}, {"weight_decay": [-1]}])
def test_bad_axis_values_fail_when_the_sweep_is_built(bad):
    from medtune.errors import ConfigError

    with pytest.raises(ConfigError):
        SweepConfig.from_dict({**TINY, **bad})
