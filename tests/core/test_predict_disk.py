"""medtune predict on the decode cache: the run's data_cache is honoured, predictions stream from
STORE/data-cache batch by batch, and equal the in-memory predictions exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import medtune
from medtune.cli import main
from medtune.data import diskcache
from medtune.store import ResultsStore

# more rows than this in one read fails the test (the decode cache hashes 128 rows at a time); every data set
# below is larger, and predictions read one batch (8) at a time
MAX_ROWS = diskcache._CHUNK_ROWS


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory, write_toy_npz):
    """A run trained with data_cache: disk on a 3-class MedMNIST-style .npz (150 images)."""
    root = tmp_path_factory.mktemp("predict-disk")
    write_toy_npz(root / "toy_28.npz", (90, 24, 36), num_classes=3, shape=(20, 20), step=60)
    store = root / "store"
    record = medtune.run({"data": str(root / "toy_28.npz"), "arch": "medtune_tiny_cnn", "weights": "none",
                          "strategy": "full", "epochs": 1, "img_size": 16, "batch_size": 8, "lr": 0.01,
                          "device": "cpu", "num_threads": 1, "progress": False, "data_cache": "disk",
                          "store": str(store)},
                         store=ResultsStore(store))
    return root, store, record


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.y_prob, b.y_prob)  # bit-identical probabilities
    assert a.ids == b.ids and a.splits == b.splits and a.metrics == b.metrics and a.metric_ci == b.metric_ci
    if a.y_true is not None:
        np.testing.assert_array_equal(a.y_true, b.y_true)


def test_predict_reuses_the_runs_decode_cache_and_equals_memory(disk_run, bounded_reads, monkeypatch):
    from medtune.data import sources

    root, store, record = disk_run
    caches = sorted((store / "data-cache").iterdir())
    resized = []
    real = sources.resize_image
    monkeypatch.setattr(sources, "resize_image", lambda *a, **k: (resized.append(1), real(*a, **k))[1])
    disk = medtune.predict(record["run_id"], str(root / "toy_28.npz"), store=store, device="cpu", batch_size=8)
    assert resized == [] and sorted((store / "data-cache").iterdir()) == caches  # the run's cache, nothing decoded
    assert bounded_reads and max(bounded_reads) <= 8 and sum(bounded_reads) == 150  # batch by batch, each row once
    memory = medtune.predict(record["run_id"], str(root / "toy_28.npz"), store=store, device="cpu", batch_size=8,
                             data_cache="memory")
    assert len(resized) == 150 and sum(bounded_reads) == 150
    _same(disk, memory)
    assert disk.metrics is not None and len(disk.ids) == 150
    test_only = medtune.predict(record["run_id"], str(root / "toy_28.npz"), store=store, device="cpu", batch_size=8,
                                split="test")
    np.testing.assert_array_equal(test_only.y_prob, disk.y_prob[114:])


def test_predict_decodes_a_new_folder_into_the_store_and_equals_memory(disk_run, bounded_reads, tmp_path):
    root, store, record = disk_run
    rng = np.random.default_rng(1)
    labelled, unlabelled = tmp_path / "labelled", tmp_path / "unlabelled"
    unlabelled.mkdir()
    for c in range(3):
        (labelled / str(c)).mkdir(parents=True)
        for i in range(45):
            img = rng.integers(0, 120, (22, 18), dtype=np.uint8) + 60 * c
            Image.fromarray(img.astype(np.uint8)).save(labelled / str(c) / f"{i}.png")
            Image.fromarray(img.astype(np.uint8)).save(unlabelled / f"{c}_{i}.png")
    before = len(list((store / "data-cache").iterdir()))
    for folder in (labelled, unlabelled):
        disk = medtune.predict(record["run_id"], str(folder), store=store, device="cpu", batch_size=8)
        memory = medtune.predict(record["run_id"], str(folder), store=store, device="cpu", batch_size=8,
                                 data_cache="memory")
        _same(disk, memory)
        assert len(disk.ids) == 135 and set(disk.splits) == ({"external"} if folder == labelled else {"test"})
    assert (disk.metrics is None) and len(list((store / "data-cache").iterdir())) == before + 2
    assert bounded_reads and max(bounded_reads) <= MAX_ROWS
    again = medtune.predict(record["run_id"], str(labelled), store=store, device="cpu", batch_size=8)
    assert len(list((store / "data-cache").iterdir())) == before + 2 and again.metrics is not None


def test_predict_cli_takes_data_cache(disk_run, capsys):
    root, store, record = disk_run
    assert main(["predict", record["run_id"], str(root / "toy_28.npz"), "--store", str(store), "--device", "cpu",
                 "--split", "test", "--data-cache", "memory", "--format", "json"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["predict", record["run_id"], str(root / "toy_28.npz"), "--store", str(store), "--data-cache", "tape"])
    assert exit_.value.code == 2
    assert "invalid choice: 'tape'" in capsys.readouterr().err


def test_a_store_object_given_to_run_holds_the_runs_decode_cache(disk_run, tmp_path, monkeypatch):
    root, _, _ = disk_run
    monkeypatch.chdir(tmp_path)  # the config's default store would be ./medtune-results
    other = tmp_path / "other"
    record = medtune.run({"data": str(root / "toy_28.npz"), "arch": "medtune_tiny_cnn", "weights": "none",
                          "strategy": "linear", "img_size": 16, "device": "cpu", "num_threads": 1,
                          "progress": False, "data_cache": "disk"}, store=ResultsStore(other))
    assert record["status"] == "done"
    assert any((other / "data-cache").iterdir()) and not (tmp_path / "medtune-results").exists()
