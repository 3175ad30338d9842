"""--tracker mlflow: each finished run logged to an offline MLflow file store (STORE/mlruns) and read back
with mlflow.search_runs -- params, metrics and the artifact files equal the store's record; the same for
a filled store exported with `medtune results --export mlflow DIR`; a tracker that fails costs one
warning line, never the run."""

from __future__ import annotations

import json
import math

import pytest

import medtune
from medtune.cli import main
from medtune.store import ResultsStore

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _file_store_allowed(monkeypatch):  # what medtune sets for its own file store, for reading it back
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

CFG = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "strategy": "full", "epochs": 2,
       "img_size": 16, "device": "cpu", "progress": False}


def _read_back(uri: str, run_id: str):
    frame = mlflow.search_runs(experiment_names=["medtune"], filter_string=f"tags.`medtune.run_id` = '{run_id}'",
                               tracking_uri=uri) if "tracking_uri" in mlflow.search_runs.__code__.co_varnames \
        else _search(uri, run_id)
    assert len(frame) == 1
    return frame.iloc[0]


def _search(uri, run_id):
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=["medtune"], filter_string=f"tags.`medtune.run_id` = '{run_id}'")
    finally:
        mlflow.set_tracking_uri(None)


def _assert_equal_to_record(row, record, uri):
    from mlflow.tracking import MlflowClient

    for key, value in record["config"].items():
        want = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        assert row[f"params.{key}"] == want[:500], key
    for key, value in record["metrics"].items():
        assert row[f"metrics.test.{key}"] == pytest.approx(value, rel=1e-12), key
    for key, value in record["val_metrics"].items():
        assert row[f"metrics.val.{key}"] == pytest.approx(value, rel=1e-12), key
    assert row["metrics.calibration.ece"] == pytest.approx(record["calibration"]["ece"], rel=1e-12)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(row["run_id"], "history.train_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(i, pytest.approx(r["train_loss"], rel=1e-12)) for i, r in enumerate(record["history"])
         if math.isfinite(r["train_loss"])]  # a closed-form probe's row has no loss
    # the artifact folder: the tag names the store's folder, and its files are in the MLflow run
    paths = sorted(p for p in record["artifacts"].values() if isinstance(p, str))
    from pathlib import Path

    assert row["tags.medtune.artifact_dir"] == str(Path(paths[0]).parent)
    logged = sorted(f.path for f in client.list_artifacts(row["run_id"], "artifacts"))
    assert logged == sorted({f"artifacts/{Path(p).name}" for p in paths if Path(p).is_file()})
    assert row["tags.mlflow.runName"] == record["label"]


def test_tracker_mlflow_logs_a_run_to_store_mlruns(tmp_path):
    record = medtune.run({**CFG, "tracker": "mlflow"}, store=ResultsStore(tmp_path))
    uri = (tmp_path / "mlruns").resolve().as_uri()
    _assert_equal_to_record(_read_back(uri, record["run_id"]), record, uri)
    # the tracker is not part of what a run computes
    assert record["run_id"] == medtune.run(CFG, store=ResultsStore(tmp_path / "b"))["run_id"]


def test_results_export_mlflow_of_a_filled_store_and_twice_adds_nothing(tmp_path, capsys):
    store = tmp_path / "s"
    record = medtune.run({**CFG, "strategy": "linear", "epochs": 1}, store=ResultsStore(store))
    out = tmp_path / "mlruns"
    for _ in range(2):
        assert main(["results", "--store", str(store), "--export", "mlflow", str(out)]) == 0
        assert "1 runs written for mlflow" in capsys.readouterr().out
    uri = out.resolve().as_uri()
    stored = ResultsStore(store).get(record["run_id"])
    _assert_equal_to_record(_read_back(uri, record["run_id"]), stored, uri)


def test_an_unwritable_tracker_is_one_warning_line_and_the_run_is_stored(tmp_path, capsys):
    (tmp_path / "mlruns").write_text("a file where the folder should be")
    record = medtune.run({**CFG, "epochs": 1, "tracker": "mlflow"}, store=ResultsStore(tmp_path))
    assert ResultsStore(tmp_path).get(record["run_id"])["metrics"] == record["metrics"]
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "not logged to mlflow" in err[0] and record["run_id"] in err[0]
