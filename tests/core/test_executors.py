"""Executors give exactly the store contents of the in-process sweep; Ctrl-C leaves a resumable store."""

from __future__ import annotations

import pytest

import medtune
from medtune.errors import ConfigError
from medtune.executors import create_executor
from medtune.store import ResultsStore

SWEEP = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 2, "img_size": 16,
         "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1,
         "strategy": ["linear", "top_k:1", "full", "lp_ft"], "seeds": [0, 1]}


def _metrics(store):
    return {r["run_id"]: r["metrics"] for r in store.runs()}


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    store = ResultsStore(tmp_path_factory.mktemp("local"))
    medtune.sweep(SWEEP, store=store)
    return store


@pytest.mark.slow
def test_ray_sweep_gives_the_local_store_contents(local_store, tmp_path):
    ray = pytest.importorskip("ray")
    store = ResultsStore(tmp_path)
    executor = create_executor("ray", init_kwargs={"num_cpus": 2})
    halving = {**SWEEP, "strategy": "full", "lr": [0.1, 0.01, 0.001], "seeds": [0], "epochs": 3}
    halved_local = ResultsStore(tmp_path / "halving_local")
    medtune.sweep(halving, store=halved_local, halving=True)
    halved_ray = ResultsStore(tmp_path / "halving_ray")
    try:
        records = medtune.sweep(SWEEP, store=store, executor=executor)
        medtune.sweep(halving, store=halved_ray, executor=executor, halving=True)  # runs added while others train
    finally:
        ray.shutdown()
    assert len(records) == 8
    assert _metrics(store) == _metrics(local_store)
    assert len(halved_ray.runs()) == 1 and _metrics(halved_ray) == _metrics(halved_local)
    assert sorted((r["run_id"], r["state"]) for r in halved_ray.rungs()) == sorted(
        (r["run_id"], r["state"]) for r in halved_local.rungs())  # the same promotions, in any finishing order
    for r in store.runs():
        assert (tmp_path / "artifacts" / r["run_id"] / "best.safetensors").exists()


@pytest.mark.slow
def test_process_pool_sweep_gives_the_local_store_contents(local_store, tmp_path):
    store = ResultsStore(tmp_path)
    medtune.sweep(SWEEP, store=store, executor="local", workers=2)
    assert _metrics(store) == _metrics(local_store)


def test_unknown_executor_and_bad_workers():
    with pytest.raises(ConfigError, match="Unknown executor 'rey'. Did you mean 'ray'"):
        create_executor("rey")
    with pytest.raises(ConfigError, match="'workers' parameter of the local executor must be an int >= 1"):
        create_executor("local", workers=0)


def test_ctrl_c_releases_the_run_and_the_next_start_resumes_it(tmp_path, monkeypatch):
    import medtune.training.loop as loop

    store = ResultsStore(tmp_path)
    cfg = {**SWEEP, "strategy": ["full"], "seeds": [0], "epochs": 3}
    real_fit, calls = loop.fit, {"n": 0}

    class Interrupt:
        def on_epoch_end(self, record):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt

    def fit_with_ctrl_c(*args, callbacks=(), **kwargs):
        return real_fit(*args, callbacks=(*callbacks, Interrupt()), **kwargs)

    import medtune.runner as runner

    monkeypatch.setattr(runner, "fit", fit_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        medtune.sweep(cfg, store=store)
    rows = store.runs(status=None)
    assert [r["status"] for r in rows] == ["pending"], "released, not left 'running'"
    assert list((tmp_path / "checkpoints").iterdir()), "the epoch checkpoint is kept"
    monkeypatch.setattr(runner, "fit", real_fit)
    logs = []
    resumed = medtune.sweep(cfg, store=store, log=logs.append)
    reference = medtune.sweep(cfg, store=ResultsStore(tmp_path / "ref"))
    assert any("resuming from" in line for line in logs)
    assert resumed[0]["metrics"] == reference[0]["metrics"]


def test_disk_full_while_writing_an_artifact_is_one_clear_error_and_loses_nothing(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    store = ResultsStore(tmp_path)
    cfg = {**SWEEP, "strategy": ["linear"], "seeds": [0]}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(medtune.StoreError, match="No space left on device.*resumes from its last epoch checkpoint"):
        medtune.sweep(cfg, store=store)
    assert not list((tmp_path / "artifacts").rglob("*.tmp")), "no half-written artifact is left"
    assert store.runs() == [] and list((tmp_path / "checkpoints").iterdir()), "checkpoint kept for the retry"
    monkeypatch.undo()
    logs = []
    records = medtune.sweep(cfg, store=ResultsStore(tmp_path), log=logs.append)
    assert len(records) == 1 and any("resuming from" in line for line in logs)
