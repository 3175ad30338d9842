"""Published numbers travel with a preset; the report and ``results --expected`` set them beside measured ones."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from medtune.config import SweepConfig
from medtune.errors import ConfigError
from medtune.presets import get_preset
from medtune.expected import parse_expected
from medtune.reporting.expected import compare_expected

_TABLE = {"source": "paper", "size_field": "medmnist_size", "tolerance": {"sd_factor": 2, "min_points": 1.5},
          "cells": [{"dataset": "pneumoniamnist", "arch": "resnet18", "strategy": "full", "size": 28,
                     "acc": 80.0, "acc_sd": 2.0, "auc": 90.0, "auc_sd": 0.1},
                    {"dataset": "pneumoniamnist", "arch": "resnet18", "strategy": "full", "size": 224,
                     "acc": 90.0, "auc": 95.0}]}


def _run(seed, acc, auc, val_auc=0.9, lr=1e-4):
    return {"status": "done", "dataset": "pneumoniamnist", "seed": seed,
            "config": {"arch": "resnet18", "strategy": "full", "medmnist_size": 28, "img_size": 224, "seed": seed,
                       "lr": lr, "store": "x"},
            "metrics": {"accuracy": acc, "auc": auc}, "val_metrics": {"auc": val_auc}}


def test_verdict_tolerance_is_max_of_twice_the_sd_and_1_5_points():
    table = parse_expected(_TABLE)
    # measured ACC 83.5 (Δ +3.5 ≤ 2 × 2.0 = 4.0: within); AUC 91.4 (Δ +1.4 ≤ max(0.2, 1.5): within)
    rows = compare_expected([_run(0, 0.83, 0.913), _run(1, 0.84, 0.915)], {"t": table})
    assert rows[0]["verdict"] == "within" and rows[0]["num_seeds"] == 2
    assert rows[0]["acc_measured"] == pytest.approx(83.5) and rows[0]["acc_tolerance"] == 4.0
    assert rows[0]["auc_tolerance"] == 1.5 and rows[0]["acc_measured_sd"] == pytest.approx(np.std([83, 84], ddof=1))
    assert rows[1]["verdict"] == "not run" and rows[1]["acc_measured"] is None
    rows = compare_expected([_run(0, 0.845, 0.92)], {"t": table})  # Δ ACC 4.5 > 4, Δ AUC 2.0 > 1.5
    assert rows[0]["verdict"] == "outside (ACC, AUC)"


def test_cell_with_several_configurations_compares_the_best_on_validation():
    table = parse_expected(_TABLE)
    runs = [_run(0, 0.50, 0.50, val_auc=0.6, lr=1e-3), _run(0, 0.80, 0.90, val_auc=0.7, lr=1e-4)]
    row = compare_expected(runs, {"t": table})[0]
    assert row["num_configs"] == 2 and row["acc_measured"] == pytest.approx(80.0)


@pytest.mark.parametrize("change, message", [
    ({"size_field": "width"}, "size_field must be one of medmnist_size, img_size"),
    ({"cells": [{"dataset": "x", "arch": "y", "strategy": "full", "size": 28, "acc": 120}]}, r"cells\[0\].acc must be"),
    ({"cells": [{"dataset": "x", "arch": "y", "strategy": "full", "size": 28, "acu": 1}]}, "Did you mean 'auc'"),
    ({"cells": [_TABLE["cells"][0], _TABLE["cells"][0]]}, "listed twice"),
])
def test_bad_expected_tables_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        SweepConfig.from_dict({"expected": {**_TABLE, **change}})


@pytest.mark.parametrize("name", ["medmnist_plus", "medmnist_v2"])
def test_presets_carry_valid_expected_tables(name):
    cfg = SweepConfig.from_dict(get_preset(name))
    assert cfg.expected["cells"] and SweepConfig.from_dict(cfg.to_dict()) == cfg
    run_strategies = {str(s) for s in cfg.strategy}
    assert {c["strategy"] for c in cfg.expected["cells"]} <= run_strategies  # every cell is a run of the preset
    assert {c["arch"] for c in cfg.expected["cells"]} <= set(cfg.arch)


def test_medmnist_plus_fields_are_the_papers():
    cfg = SweepConfig.from_dict(get_preset("medmnist_plus"))
    b = cfg.base
    assert (b.optimizer, b.lr, b.weight_decay, b.schedule, b.epochs, b.patience, b.monitor, b.batch_size) == (
        "adamw", 1e-4, 0.01, "cosine_epoch", 100, 5, "loss", 64)
    assert cfg.seeds == (9930641, 115149041, 252139603) and (b.img_size, b.resize) == (224, "zero_pad")
    v2 = SweepConfig.from_dict(get_preset("medmnist_v2")).base
    assert (v2.optimizer, v2.lr, v2.schedule, v2.batch_size, v2.scratch_epochs, v2.weights) == (
        "adam", 1e-3, "multistep", 128, 100, "none")


def test_report_of_a_medmnist_plus_store_shows_measured_beside_published(tmp_path, capsys, write_medmnist):
    import medtune
    from medtune.cli import main

    root = tmp_path / "mm"
    root.mkdir()
    write_medmnist(root, "pneumoniamnist", sizes=(40, 16, 24))
    store = tmp_path / "store"
    # the preset as it is, made small: one seed, one epoch, a random-init ResNet-18 at 32 px, end-to-end only
    config = {**get_preset("medmnist_plus"), "data": "medmnist:pneumoniamnist", "medmnist_root": str(root),
              "arch": ["resnet18"], "weights": "none", "strategy": ["full"], "seeds": [9930641], "epochs": 1,
              "img_size": 32, "device": "cpu", "data_cache": "memory", "progress": False, "store": str(store)}
    records = medtune.sweep(config)
    assert len(records) == 1
    out = medtune.report(str(store))
    html = open(out, encoding="utf-8").read()
    assert "Measured vs. published" in html and "Doerrich et al. 2025" in html
    measured = f"{100 * records[0]['metrics']['accuracy']:.2f}"
    assert "<td>83.12 ± 1.10</td>" in html and f"<td>{measured}</td>" in html  # published beside measured
    assert html.count(">not run</td>") == 71  # the other 71 published cells
    assert (store / "report_expected.csv").exists()

    assert main(["results", "--store", str(store), "--expected"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\npneumoniamnist\s+resnet18\s+full\s+28\s+83\.12 ± 1\.10", text)
    assert "of 72 published cells" in text
    assert main(["results", "--store", str(store), "--expected", "--format", "json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ran = [r for r in rows if r["verdict"] != "not run"]
    assert len(rows) == 72 and len(ran) == 1 and ran[0]["size"] == 28 and ran[0]["acc_published"] == 83.12
