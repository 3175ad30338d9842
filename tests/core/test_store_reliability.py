"""The store is relocatable and exact, one bad record or checkpoint does not break it, stuck claims can be
freed, and readers never create a store."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import sklearn.metrics as skm

import medtune
from medtune.cli import main
from medtune.store import ResultsStore, StoreWarning

TINY = ["--arch", "medtune_tiny_cnn", "--weights", "none", "--epochs", "1", "--img-size", "16", "--batch-size", "16",
        "--device", "cpu", "--progress", "false", "--strategy", "full"]


def _sklearn_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    pred = prob.argmax(1)
    out = {"accuracy": skm.accuracy_score(y, pred), "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
           "f1": skm.f1_score(y, pred, average="macro", labels=list(range(prob.shape[1])), zero_division=0)}
    if prob.shape[1] == 2:
        out["auc"] = skm.roc_auc_score(y, prob[:, 1])
        out["sensitivity"] = skm.recall_score(y, pred, pos_label=1)
        out["specificity"] = skm.recall_score(y, pred, pos_label=0)
    else:
        out["auc"] = skm.roc_auc_score(y, prob, multi_class="ovr", average="macro")
    return out


@pytest.fixture(scope="module")
def moved_store(tmp_path_factory):
    """A store written through a relative --store path, copied to another folder; the cwd is a third one."""
    work = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(work)
    try:
        for data in ("synthetic", "synthetic:3"):
            assert main(["sweep", "--data", data, *TINY, "--store", "rel-store"]) == 0
    finally:
        os.chdir(old)
    moved = tmp_path_factory.mktemp("moved") / "store"
    shutil.copytree(work / "rel-store", moved)
    shutil.rmtree(work / "rel-store")  # nothing may still point at the old place
    third = tmp_path_factory.mktemp("third")
    return moved, third


def test_moved_store_opens_every_artifact_and_metrics_equal_sklearn(moved_store, monkeypatch):
    from safetensors.torch import load_file

    root, third = moved_store
    monkeypatch.chdir(third)
    records = ResultsStore(root, create=False).runs()
    assert len(records) == 2 and {r["num_classes"] for r in records} == {2, 3}
    worst = 0.0
    for r in records:
        assert not os.path.isabs(json.loads(_raw_record(root, r["run_id"]))["artifacts"]["weights"])
        assert set(load_file(r["artifacts"]["weights"])), r["artifacts"]["weights"]
        json.loads(open(r["artifacts"]["config"]).read())
        with np.load(r["artifacts"]["predictions"], allow_pickle=False) as npz:
            y_art, p_art = npz["y_true"], npz["y_prob"].astype(np.float64)
        y_rec = np.asarray(r["predictions"]["y_true"])
        p_rec = np.asarray(r["predictions"]["y_prob"], dtype=np.float64)
        assert np.array_equal(y_rec, y_art) and np.array_equal(p_rec, p_art), "the record keeps the exact probabilities"
        for y, p in ((y_rec, p_rec), (y_art, p_art)):
            for name, value in _sklearn_metrics(y, p).items():
                worst = max(worst, abs(r["metrics"][name] - value))
                assert r["metrics"][name] == pytest.approx(value, abs=1e-12, rel=0), (r["label"], name)
    print(f"\nworst |stored - sklearn| over {len(records)} records: {worst:.3g}")
    assert worst <= 1e-12


def _raw_record(root, run_id: str) -> str:
    with sqlite3.connect(root / "medtune.sqlite") as conn:
        return conn.execute("SELECT record FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]


def test_report_and_results_read_a_moved_store(moved_store, monkeypatch, capsys):
    root, third = moved_store
    monkeypatch.chdir(third)
    assert main(["results", "--store", str(root), "--format", "json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    out = medtune.report(str(root), out_path=str(third / "r.md"), fmt="md")
    assert os.path.getsize(out) > 0


# -- one bad record, one bad checkpoint ---------------------------------------------------------------

@pytest.fixture
def store_copy(moved_store, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(moved_store[0], root)
    return root


@pytest.mark.parametrize("bad", ["{not json", None, "[1, 2]"])
def test_one_bad_record_is_skipped_with_a_warning_naming_it(store_copy, bad, capsys):
    victim = ResultsStore(store_copy).runs()[0]["run_id"]
    with sqlite3.connect(store_copy / "medtune.sqlite") as conn:
        conn.execute("UPDATE runs SET record=? WHERE run_id=?", (bad, victim))
    with pytest.warns(StoreWarning, match=f"runs record '{victim}' is unreadable"):
        records = ResultsStore(store_copy).runs()
    assert len(records) == 1 and victim not in {r["run_id"] for r in records}
    if bad != "{not json":  # the readers and the retraining: checked once
        return
    with pytest.warns(StoreWarning):
        assert main(["results", "--store", str(store_copy)]) == 0
    with pytest.warns(StoreWarning):
        medtune.report(str(store_copy), out_path=str(store_copy / "r.md"), fmt="md")
    # the next sweep trains the unreadable run again and keeps the other one
    data = "synthetic" if records[0]["num_classes"] == 3 else "synthetic:3"
    with pytest.warns(StoreWarning):
        assert main(["sweep", "--data", data, *TINY, "--store", str(store_copy)]) == 0
    assert len(ResultsStore(store_copy).runs()) == 2
    assert "Traceback" not in capsys.readouterr().err


CKPT_RUN = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1, "img_size": 16,
            "batch_size": 16, "device": "cpu", "progress": False, "strategy": "full"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return medtune.run({**CKPT_RUN, "store": str(tmp_path_factory.mktemp("ref"))})


@pytest.mark.parametrize("garbage", [b"", b"garbage" * 10, b"PK\x03\x04truncated"])
def test_corrupt_epoch_checkpoint_is_set_aside_and_the_run_restarts(tmp_path, garbage, reference_run):
    cfg, reference = {**CKPT_RUN, "store": str(tmp_path)}, reference_run
    store = ResultsStore(tmp_path)
    ckpt = store.checkpoint_path(reference["run_id"])
    ckpt.write_bytes(garbage)
    logs: list[str] = []
    with pytest.warns(UserWarning, match=r"unreadable .*renamed .*\.pt\.corrupt"):
        record = medtune.run(cfg, log=logs.append)
    assert record["metrics"] == reference["metrics"], "restarted from its first epoch"
    assert (ckpt.parent / (ckpt.name + ".corrupt")).read_bytes() == garbage
    assert not ckpt.exists()


# -- stuck claims -------------------------------------------------------------------------------------

def _claim_as(store: ResultsStore, run_id: str, owner: str) -> None:
    store.claim(run_id, {"x": 1})
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE runs SET owner=? WHERE run_id=?", (owner, run_id))


def test_claim_of_a_reused_pid_is_reclaimed(tmp_path):
    import socket

    store = ResultsStore(tmp_path)
    parent = os.getppid()  # alive, but started at another time than the claim says
    _claim_as(store, "r1", f"{socket.gethostname()}:{parent}@1")
    assert store.claim("r1", {"x": 1}), "a live process with another start time is not the owner"
    # a live owner with its true start time keeps its claim
    from medtune.store import _process_start

    _claim_as(store, "r2", f"{socket.gethostname()}:{parent}@{_process_start(parent)}")
    other = ResultsStore(tmp_path)
    import medtune.store as st

    real = st._owner_id
    st._owner_id = lambda: "elsewhere:1"
    try:
        assert not other.claim("r2", {"x": 1})
    finally:
        st._owner_id = real


def test_results_release_frees_a_stuck_claim(tmp_path, capsys):
    import socket

    store = ResultsStore(tmp_path)
    _claim_as(store, "abcdef0123456789", f"{socket.gethostname()}:{os.getpid()}")
    assert main(["results", "--store", str(tmp_path), "--release", "abcdef"]) == 0
    assert "released abcdef0123456789" in capsys.readouterr().err
    assert [r["status"] for r in store.runs(status=None)] == ["pending"]
    status = main(["results", "--store", str(tmp_path), "--release", "abcdef"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("medtune: error: No claimed run 'abcdef'") and len(err.splitlines()) == 1


# -- readers never create a store ---------------------------------------------------------------------

@pytest.mark.parametrize("command", ["results", "report"])
@pytest.mark.parametrize("case", ["missing", "empty_folder", "other_sqlite", "runs_of_another_schema"])
def test_readers_refuse_a_path_that_is_not_a_store(command, case, tmp_path, capsys):
    root = tmp_path / "x"
    if case != "missing":
        root.mkdir()
    if case in ("other_sqlite", "runs_of_another_schema"):
        with sqlite3.connect(root / "medtune.sqlite") as conn:
            conn.execute("CREATE TABLE runs (id INTEGER, name TEXT)" if case == "runs_of_another_schema"
                         else "CREATE TABLE notes (body TEXT)")
    before = sorted(p.name for p in root.iterdir()) if root.exists() else None
    schema = _tables(root)
    argv = ["results", "--store", str(root)] if command == "results" else ["report", str(root)]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "not a medtune results store" in err or "another application" in err
    assert (sorted(p.name for p in root.iterdir()) if root.exists() else None) == before, "nothing created"
    assert _tables(root) == schema, "no tables added to another application's file"


def _tables(root) -> list[str] | None:
    path = root / "medtune.sqlite"
    if not path.exists():
        return None
    with sqlite3.connect(path) as conn:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))


def test_writers_refuse_another_applications_sqlite(tmp_path, capsys):
    with sqlite3.connect(tmp_path / "medtune.sqlite") as conn:
        conn.execute("CREATE TABLE runs (id INTEGER, name TEXT)")
    status = main(["run", "--data", "synthetic", *TINY[:-2], "--store", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and "another application" in err and len(err.splitlines()) == 1
    assert _tables(tmp_path) == ["runs"]
