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
