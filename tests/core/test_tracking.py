"""--tracker tensorboard: each run's config, per-epoch history and final metrics, read back from the
event files; the same for a filled store exported with `medtune results --export`."""

from __future__ import annotations

import json

import pytest

import medtune
from medtune.cli import main
from medtune.store import ResultsStore

pytest.importorskip("tensorboard")


def _read(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tracker_logs_history_metrics_and_config(tmp_path):
    cfg = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "strategy": "full", "epochs": 2,
           "img_size": 16, "device": "cpu", "progress": False, "tracker": "tensorboard"}
    record = medtune.run(cfg, store=ResultsStore(tmp_path))
    acc = _read(tmp_path / "tensorboard" / record["run_id"])
    losses = [e.value for e in acc.Scalars("history/train_loss")]
    assert losses == pytest.approx([row["train_loss"] for row in record["history"]], rel=1e-6)
    assert [e.step for e in acc.Scalars("history/val_auc")] == [0, 1]
    for key, value in record["metrics"].items():
        assert acc.Scalars(f"test/{key}")[0].value == pytest.approx(value, rel=1e-6)
    assert acc.Scalars("calibration/ece")[0].value == pytest.approx(record["calibration"]["ece"], rel=1e-6)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`").removeprefix("json"))["arch"] == "medtune_tiny_cnn"
    # the tracker is not part of what a run computes
    assert record["run_id"] == medtune.run({**cfg, "tracker": "none"}, store=ResultsStore(tmp_path / "b"))["run_id"]


def test_results_export_writes_a_filled_store(tmp_path, capsys):
    store = tmp_path / "s"
    record = medtune.run({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "strategy": "linear",
                          "epochs": 1, "img_size": 16, "device": "cpu", "progress": False}, store=ResultsStore(store))
    assert main(["results", "--store", str(store), "--export", "tensorboard", str(tmp_path / "tb")]) == 0
    assert "1 runs written" in capsys.readouterr().out
    acc = _read(tmp_path / "tb" / record["run_id"])
    assert acc.Scalars("test/auc")[0].value == pytest.approx(record["metrics"]["auc"], rel=1e-6)
    assert main(["results", "--store", str(store), "--export", "wandb", str(tmp_path / "x")]) == 2
    assert "tracker" in capsys.readouterr().err


def test_the_documented_pandas_one_liner(tmp_path):
    import pandas as pd

    store = ResultsStore(tmp_path)
    record = medtune.run({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "strategy": "linear",
                          "epochs": 1, "img_size": 16, "device": "cpu", "progress": False}, store=store)
    frame = pd.json_normalize(ResultsStore(tmp_path).runs())  # as docs/results-store.md
    assert frame.loc[0, "metrics.auc"] == record["metrics"]["auc"]
    assert frame.loc[0, "calibration.ece"] == record["calibration"]["ece"]
