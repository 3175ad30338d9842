import multiprocessing as mp
import sqlite3

import pytest

from medtune.errors import StoreError
from medtune.store import ResultsStore


def test_claim_finish_and_skip(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.claim("r1", {"a": 1})
    store.finish("r1", {"run_id": "r1", "metrics": {"auc": 0.9}})
    assert store.get("r1")["metrics"]["auc"] == 0.9
    assert not store.claim("r1", {"a": 1}), "a finished run must not be claimed again"
    assert [r["run_id"] for r in store.runs()] == ["r1"]


def _claim_in_child(root, queue):
    queue.put(ResultsStore(root).claim("r1", {}))


def test_a_run_held_by_a_live_process_is_not_claimed_and_a_dead_owner_is_reclaimed(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.claim("r1", {})
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_claim_in_child, args=(str(tmp_path), q))
    p.start(); p.join()
    assert q.get() is False, "another process must not take a run this live process holds"
    # now pretend the owner died: a pid that does not exist on this host
    store._conn.execute("UPDATE runs SET owner=? WHERE run_id='r1'", (store_owner_with_dead_pid(),))
    p = ctx.Process(target=_claim_in_child, args=(str(tmp_path), q))
    p.start(); p.join()
    assert q.get() is True


def store_owner_with_dead_pid():
    import socket
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


def test_not_a_sqlite_file_is_refused_without_touching_it(tmp_path):
    bad = tmp_path / "medtune.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="is not a medtune results store"):
        ResultsStore(tmp_path)
    assert bad.read_bytes() == b"this is not a database" * 100


def test_locked_store_gives_a_clear_error(tmp_path):
    ResultsStore(tmp_path)
    locker = sqlite3.connect(tmp_path / "medtune.sqlite", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            ResultsStore(tmp_path, timeout=0.2).claim("x", {})
    finally:
        locker.execute("ROLLBACK")


def test_unwritable_folder(tmp_path):
    import os

    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("x")
        with pytest.raises(StoreError, match="Cannot create the results store folder"):
            ResultsStore(target / "sub")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(); ro.chmod(0o500)
        with pytest.raises(StoreError):
            ResultsStore(ro / "sub")


def test_records_come_back_in_insertion_order_within_one_second(tmp_path):
    store = ResultsStore(tmp_path)
    ids = ["f", "a", "c", "b", "e", "d"]  # not sorted: a timestamp+id order would reorder them
    for aid in ids:
        store.put_attack(aid, "run", {"attack_id": aid})
    assert [a["attack_id"] for a in store.attacks()] == ids
    assert [a["attack_id"] for a in store.attacks("run")] == ids


def test_records_are_strict_json_that_sqlite_json_extract_reads_and_nan_comes_back(tmp_path):
    import json
    import math

    record = {"run_id": "r1", "metrics": {"auc": float("nan"), "accuracy": 0.75, "loss": float("inf")},
              "history": [{"epoch": 0, "val_auc": float("-inf")}, {"epoch": 1, "val_auc": 0.5}],
              "per_class": {"0": {"pr_auc": float("nan")}}, "note": None}
    store = ResultsStore(tmp_path)
    store.claim("r1", {"lr": 1e-3})
    store.finish("r1", record)
    text = store._conn.execute("SELECT record FROM runs WHERE run_id='r1'").fetchone()[0]
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c} in the store"))
    rows = store._conn.execute("SELECT json_extract(record, '$.metrics.auc'), json_extract(record, '$.metrics.accuracy'), "
                               "json_extract(record, '$.history[1].val_auc'), json_extract(record, '$.metrics.loss') "
                               "FROM runs").fetchall()
    assert rows == [(None, 0.75, 0.5, None)]
    back = store.get("r1")
    assert math.isnan(back["metrics"]["auc"]) and back["metrics"]["loss"] == math.inf
    assert back["history"][0]["val_auc"] == -math.inf and math.isnan(back["per_class"]["0"]["pr_auc"])
    assert back["note"] is None and back["metrics"]["accuracy"] == 0.75 and "_nonfinite" not in back
    assert set(back) == set(record)


def test_a_record_written_with_nan_tokens_by_an_earlier_version_still_reads(tmp_path):
    import math

    store = ResultsStore(tmp_path)
    store.claim("old", {})
    store._conn.execute("UPDATE runs SET status='done', record=? WHERE run_id='old'",
                        ('{"run_id": "old", "metrics": {"auc": NaN, "accuracy": 0.5}}',))
    old = store.get("old")
    assert math.isnan(old["metrics"]["auc"]) and old["metrics"]["accuracy"] == 0.5
    assert not store.claim("old", {}), "an old record is a finished run, not trained again"
