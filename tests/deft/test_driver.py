"""DEFT on real (tiny) trainings: stored, constrained, cached across restarts, compared."""

from __future__ import annotations

import medtune
from medtune.deft.driver import SearchConfig
from medtune.store import ResultsStore

BASE = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 2, "img_size": 16,
        "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1}


def test_search_config_round_trips():
    cfg = SearchConfig.from_dict({**BASE, "popsize": 6, "seeds": "0,1", "max_trainable_params": 0.5})
    assert cfg.seeds == (0, 1) and cfg.base.epochs == 2
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg


def test_search_end_to_end_is_constrained_cached_and_compared(tmp_path):
    store = ResultsStore(tmp_path)
    cfg = {**BASE, "popsize": 5, "generations": 1, "search_epochs": 1, "max_trainable_params": 0.6,
           "seeds": [0], "compare": True}
    record = medtune.search(cfg, store=store)
    assert len(record["best_mask"]) == len(record["unit_names"]) == 4
    assert record["trainable_fraction"] <= 0.6 + 1e-9
    for ev in record["evaluations"]:
        if ev["trainable_fraction"] > 0.6:
            assert ev["feasible"] is False
    labels = {row["label"] for row in record["comparison"]}
    # the paper's three baselines (scratch, frozen pretrained + new head, full) and the best top-k
    assert {"deft", "scratch", "full", "linear"} <= labels and any(lbl.startswith("top_k") for lbl in labels)
    assert store.searches()[0]["search_id"] == record["search_id"]
    trained = record["num_trainings"]
    assert trained >= 1
    again = medtune.search(cfg, store=store)
    assert again["num_trainings"] == 0, "every genome comes from the store's cache on a restart"
    assert again["best_mask"] == record["best_mask"]


def test_search_cli_with_store_flag(tmp_path, capsys):
    from medtune.cli import main

    argv = ["search", "--data", "synthetic", "--arch", "medtune_tiny_cnn", "--weights", "none", "--epochs", "1",
            "--img-size", "16", "--device", "cpu", "--popsize", "5", "--generations", "0", "--search-epochs", "1",
            "--store", str(tmp_path)]
    assert main(argv + ["--seeds", "0"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert len(out["best_mask"]) == 4 and out["num_trainings"] >= 1
    labels = [row["label"] for row in out["comparison"]]
    assert {"deft", "scratch", "full", "linear"} <= set(labels) and any(lbl.startswith("top_k") for lbl in labels)


def test_search_evaluates_a_generation_in_worker_processes_with_the_same_result(tmp_path):
    cfg = {**BASE, "popsize": 5, "generations": 1, "search_epochs": 1, "compare": False, "seeds": [0]}
    serial = medtune.search(cfg, store=ResultsStore(tmp_path / "a"))
    parallel = medtune.search(cfg, store=ResultsStore(tmp_path / "b"), workers=2)
    assert parallel["best_mask"] == serial["best_mask"]
    assert parallel["history"] == serial["history"]
