"""Successive halving: a promoted run ends as if trained straight through; decisions come from the store
alone (a killed sweep restarts to the same promotions, training nothing twice); stopped runs stay out of
every finished-run table and the recommendation."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import medtune
from medtune.halving import decide, group_key, rung_epochs, rung_metric
from medtune.store import ResultsStore

TINY = dict(data="synthetic", arch="medtune_tiny_cnn", weights="none", img_size=16, batch_size=16, device="cpu",
            progress=False, eval_batch_size=64, monitor="auc")


def _sweep_cfg(**kw):
    return {**TINY, "strategy": "full", "lr": [0.1, 0.01, 0.001], "seeds": [0, 1], "epochs": 3, "patience": 0, **kw}


def test_rungs_and_rung_metric():
    assert rung_epochs(10, 1, 3) == [1, 3, 9]
    assert rung_epochs(10, 2, 3) == [2, 6]
    assert rung_epochs(3, 3, 3) == []
    history = [{"val_auc": 0.5, "val_loss": 0.9}, {"val_auc": 0.7, "val_loss": 0.4}, {"val_auc": 0.9, "val_loss": 0.2}]
    assert rung_metric(history, 2, "auc") == 0.7  # the best of the first two epochs, not the third
    assert rung_metric(history, 2, "loss") == 0.4  # lower is better
    assert math.isnan(rung_metric([{"val_auc": float("nan")}], 1, "auc"))


@pytest.mark.parametrize("strategy,pause", [("full", 1), ("lp_ft", 2)])
def test_a_promoted_run_ends_exactly_as_one_trained_straight_through(strategy, pause, tmp_path):
    """Paused at a rung (its checkpoint kept), then continued: the same record to the last digit as the
    run trained in one go (lp_ft pauses across its phase boundary)."""
    from medtune.executors import LocalExecutor
    from medtune.runner import plan_runs, run_all
    from medtune.config import RunConfig

    cfg = RunConfig(**TINY, strategy=strategy, epochs=4, lr=0.01, patience=0, store=str(tmp_path / "a"))
    straight = medtune.run(cfg)
    store = ResultsStore(tmp_path / "b")
    [plan] = plan_runs([(cfg.replace(store=str(store.root)), None)])
    import copy
    import dataclasses

    [paused] = run_all([dataclasses.replace(plan, strategy=copy.deepcopy(plan.strategy), pause_at=pause)],
                       store=store, executor=LocalExecutor(1), log=lambda _m: None)
    assert paused["status"] == "paused" and store.status(plan.run_id) == "paused"
    assert store.checkpoint_path(plan.run_id).exists()
    assert [(r["rung"], r["epochs"], r["state"]) for r in store.rungs()] == [(pause, pause, "paused")]
    [final] = run_all([plan], store=store, executor=LocalExecutor(1), log=lambda _m: None)
    assert final["run_id"] == straight["run_id"]
    assert final["metrics"] == straight["metrics"] and final["val_metrics"] == straight["val_metrics"]
    assert final["predictions"] == straight["predictions"]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight["history"]]
    assert repr([{k: v for k, v in h.items() if k != "seconds"} for h in final["history"]]) == repr(strip)  # NaN-safe


def test_halving_sweep_promotes_on_validation_and_keeps_stopped_runs_out_of_the_tables(tmp_path):
    from medtune.reporting._records import done_runs
    from medtune.reporting.stats import recommend

    store = ResultsStore(tmp_path / "s")
    logs: list[str] = []
    records = medtune.sweep(_sweep_cfg(), store=store, halving=True, log=logs.append)
    rows = store.rungs()
    assert {r["rung"] for r in rows} == {1}  # epochs 3, eta 3: one rung at epoch 1
    by_lr: dict[float, list[float]] = {}
    status = {r["run_id"]: r for r in store.runs(status=None)}
    for r in rows:
        by_lr.setdefault(status[r["run_id"]]["config"]["lr"], []).append(r["val_metric"])
    winner = max(by_lr, key=lambda lr: sum(by_lr[lr]) / 2)  # the mean over seeds of the stored rung metric
    assert {r["config"]["lr"] for r in records} == {winner} and len(records) == 2
    assert sorted(r["status"] for r in status.values()) == ["done", "done"] + ["stopped"] * 4
    for r in rows:
        lr = status[r["run_id"]]["config"]["lr"]
        assert r["state"] == ("promoted" if lr == winner else "stopped")
    assert len(store.runs()) == 2 and len(done_runs(store.runs())) == 2
    assert any(line.startswith("forecast: 6 runs, 10 epochs (full grid 18)") for line in logs)
    assert any(line == "halving: 6 runs to epoch 1" for line in logs)
    # the recommendation reads finished runs only
    rec = recommend(store.runs(), metric="auc")
    assert rec is not None
    # a second start trains nothing and decides the same
    again: list[str] = []
    assert medtune.sweep(_sweep_cfg(), store=store, halving=True, log=again.append) == records
    assert not any(line.startswith("halving:") for line in again)
    assert store.rungs() == rows
    # the report and `medtune results` list the stopped runs apart, with their rung and val metric
    from medtune.reporting.report import report_store

    html = report_store(store.root).read_text()
    assert "stopped at rung 1" in html and "saved 8 of 18" in html
    out = subprocess.run([sys.executable, "-m", "medtune.cli", "results", "--store", str(store.root)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("stopped at rung 1") == 4 and "10 epochs trained of the full grid's 18" in out.stdout


def test_within_groups_and_the_solved_probe_is_never_paused(tmp_path):
    from medtune.sweeps import plan_sweep, load_sweep_config

    cfg = load_sweep_config(_sweep_cfg(strategy="full,linear,top_k:1", store=str(tmp_path / "s")))
    plans = plan_sweep(cfg)
    assert len({group_key(p.config, "lr") for p in plans}) == 3
    assert len({group_key(p.config, "all") for p in plans}) == 1
    d = decide(plans, ResultsStore(tmp_path / "s"), eta=3, first_rung=1, within="lr")
    probes = [(p, r) for p, r in d.need if p.config.strategy.name == "linear"]
    assert probes and all(r is None for _, r in probes)  # solved in one step: trained to its end at once
    assert all(r == 1 for p, r in d.need if p.config.strategy.name != "linear")


def test_a_tie_at_the_cut_promotes_every_tied_configuration(tmp_path):
    """Ranked on stored rung metrics alone: the top 1/eta continue, and a configuration tied exactly with
    the last one kept continues too (LP-FT's LRs all tie at the probe's epoch)."""
    from medtune.sweeps import plan_sweep, load_sweep_config

    store = ResultsStore(tmp_path / "s")
    plans = plan_sweep(load_sweep_config(_sweep_cfg(epochs=10, store=str(store.root))))
    by_lr = {}
    for p in plans:
        by_lr.setdefault(p.config.lr, []).append(p)
    assert sorted(by_lr) == [0.001, 0.01, 0.1]

    def decided(values):
        for lr, plans_lr in by_lr.items():
            for p in plans_lr:
                store.pause(p.run_id, 1, values[lr], monitor="auc", epochs=1)
        d = decide(plans, store, eta=3, first_rung=1, within="lr")
        return {lr: {d.states[(p.run_id, 1)][0] for p in plans_lr} for lr, plans_lr in by_lr.items()}, d

    states, d = decided({0.1: 0.7, 0.01: 0.9, 0.001: 0.8})  # one winner: the rest stop
    assert states == {0.1: {"stopped"}, 0.01: {"promoted"}, 0.001: {"stopped"}}
    assert [r for _, r in d.need] == [None, None]  # the winner's two seeds go on to the end
    states, d = decided({0.1: 0.9, 0.01: 0.9, 0.001: 0.8})  # two tied at the top: both go on
    assert states == {0.1: {"promoted"}, 0.01: {"promoted"}, 0.001: {"stopped"}}
    assert sorted(r for _, r in d.need) == [3] * 4  # to the next rung, where they compete again
    states, _ = decided({0.1: 0.9, 0.01: 0.9, 0.001: 0.9})  # nothing tells them apart: none is stopped
    assert states == {lr: {"promoted"} for lr in by_lr}


def test_a_group_goes_on_as_soon_as_its_own_rung_is_complete(tmp_path):
    """A rung is a barrier only among the configurations that compete: the executor is handed a group's
    next runs right after that group's last rung run is stored, while another group's rung still trains."""
    from medtune.executors import _Executor

    class Recording(_Executor):  # one call at a time, in submission order; records what `more` adds, and when
        def __init__(self):
            self.trained, self.added = [], []

        def map_unordered(self, fn, items, *, return_exceptions=False, more=None):
            queue, i = list(items), 0
            while i < len(queue):
                plan = queue[i][0]
                yield i, fn(*queue[i])
                self.trained.append((plan.config.strategy.name, plan.pause_at))
                i += 1
                new = list(more()) if more is not None else []
                if new:
                    self.added.append((len(self.trained), [(a[0].config.strategy.name, a[0].pause_at) for a in new]))
                queue += new

    executor = Recording()  # not a LocalExecutor: its calls run the pool and Ray entry, _execute_in_worker
    cfg = _sweep_cfg(strategy="full,top_k:1", seeds=[0], store=str(tmp_path / "s"))
    records = medtune.sweep(cfg, halving=True, executor=executor, log=lambda _m: None)
    assert len(records) == 2  # each group's winner, trained to the end
    # the first group's three LRs reach rung 1 first: its winner is handed over at once (after 3 runs),
    # before any run of the second group has reached its rung
    assert executor.trained[:3] == [("full", 1)] * 3
    assert executor.added[0] == (3, [("full", None)])
    assert executor.added[1] == (6, [("top_k", None)])
    assert executor.trained[6:] == [("full", None), ("top_k", None)]


def test_halving_config_keys_and_bad_values():
    from medtune.errors import ConfigError
    from medtune.sweeps import load_sweep_config

    c = load_sweep_config({**_sweep_cfg(), "halving": {"eta": 2, "within": "all"}})
    assert (c.halving, c.halving_eta, c.halving_first_rung, c.halving_within) == (True, 2, 1, "all")
    assert load_sweep_config(_sweep_cfg()).halving is False
    with pytest.raises(ConfigError, match="halving_eta"):
        load_sweep_config({**_sweep_cfg(), "halving": True, "halving_eta": 1})
    with pytest.raises(ConfigError, match="halving_within"):
        load_sweep_config({**_sweep_cfg(), "halving_within": "seed"})


def test_a_version_1_store_is_migrated_and_stays_readable(tmp_path):
    store = ResultsStore(tmp_path / "s")
    store.close()
    db = sqlite3.connect(tmp_path / "s" / "medtune.sqlite")
    db.execute("DROP TABLE rungs")
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.execute("INSERT INTO runs VALUES ('r1', 'done', '{}', '{\"run_id\": \"r1\"}', NULL, NULL, 'x', 'x', NULL)")
    db.commit()
    db.close()
    store = ResultsStore(tmp_path / "s", create=False)
    assert [r["run_id"] for r in store.runs()] == ["r1"] and store.rungs() == []
    assert store._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "2"


def _cli(cfg, store):
    return [sys.executable, "-m", "medtune.cli", "sweep", str(cfg), "--store", str(store), "--halving",
            "--workers", "2", "--format", "json"]


@pytest.mark.slow
def test_a_halving_sweep_killed_mid_rung_restarts_to_the_same_promotions_training_nothing_twice(tmp_path):
    """A process pool (workers=2) killed with SIGKILL while rung runs train; the restart resumes."""
    import yaml

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(_sweep_cfg(num_threads=1)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ref = ResultsStore(tmp_path / "ref")
    expected = medtune.sweep(str(cfg), store=ref, halving=True)
    want = sorted((r["run_id"], r["rung"], r["state"], r["val_metric"]) for r in ref.rungs())
    assert {s for *_, s, _ in want} == {"promoted", "stopped"}

    store = tmp_path / "killed"
    proc = subprocess.Popen(_cli(cfg, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # kill once some rung is stored, mid-sweep
        try:
            if sqlite3.connect(store / "medtune.sqlite").execute("SELECT count(*) FROM rungs").fetchone()[0]:
                break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool workers
    proc.wait()
    db = ResultsStore(store)
    before = {(r["run_id"], r["rung"]): (r["epochs"], r["val_metric"]) for r in db.rungs()}
    assert before and len(db.runs()) < len(expected), "the kill must land mid-sweep"
    again = subprocess.run(_cli(cfg, store), capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr
    got = sorted((r["run_id"], r["rung"], r["state"], r["val_metric"]) for r in db.rungs())
    assert got == want, "the same promotions from the stored rung metrics"
    assert {r["run_id"]: r["metrics"] for r in db.runs()} == {r["run_id"]: r["metrics"] for r in expected}
    # rung results stored before the kill were not trained again
    for run_id, rung in before:
        assert f"{run_id} paused at rung {rung}" not in again.stderr
    assert {(r["run_id"], r["rung"]): (r["epochs"], r["val_metric"]) for r in db.rungs()
            if (r["run_id"], r["rung"]) in before} == before
