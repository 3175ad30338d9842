"""One failing run does not lose another's result, in every executor; SIGTERM is handled like Ctrl-C."""

from __future__ import annotations

import os
import signal

import pytest

import medtune
from medtune.cli import main
from medtune.errors import RunsFailedError
from medtune.store import ResultsStore

# l2_sp with a huge alpha diverges (NaN weights) in its first epoch; `full` trains normally
SWEEP = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1, "img_size": 16,
         "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1, "progress": False,
         "strategy": "l2_sp:alpha=1e20,full", "seeds": [0]}


def _check_one_failed_one_stored(store: ResultsStore, exc: RunsFailedError) -> tuple[str, str]:
    rows = {r["run_id"]: r for r in store.runs(status=None)}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    done = store.runs()
    assert len(failed) == 1 and len(done) == 1 and len(rows) == 2
    assert failed[0]["config"]["strategy"].startswith("l2_sp")
    assert "training diverged" in failed[0]["error"] and "\n" not in failed[0]["error"]
    assert exc.failures == [(failed[0]["run_id"], failed[0]["error"])]
    good = done[0]
    assert good["label"] == "full"
    for name in ("weights", "predictions", "config"):
        assert os.path.isfile(good["artifacts"][name]), name
    assert [r for r in exc.records if r is not None][0]["run_id"] == good["run_id"]
    return failed[0]["run_id"], good["run_id"]


def _rerun_trains_only(store_root, failed_id, executor="local", workers=1) -> None:
    logs: list[str] = []
    with pytest.raises(RunsFailedError):
        medtune.sweep(SWEEP, store=store_root, log=logs.append, executor=executor, workers=workers)
    assert "1 runs already in the store, 1 to train" in logs
    assert [line for line in logs if "FAILED" in line][0].startswith(failed_id)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_run_is_marked_failed_and_the_others_are_stored(tmp_path, workers):
    with pytest.raises(RunsFailedError, match=r"1 of 2 run\(s\) failed .* \(1 finished and stored\)") as info:
        medtune.sweep(SWEEP, store=tmp_path, workers=workers)
    failed_id, _ = _check_one_failed_one_stored(ResultsStore(tmp_path), info.value)
    if workers == 1:  # re-running trains only the failed run (the process pool costs a spawn: checked once)
        _rerun_trains_only(tmp_path, failed_id)


@pytest.mark.slow
def test_a_failing_run_under_ray_loses_nothing(tmp_path):
    ray = pytest.importorskip("ray")
    from medtune.executors import create_executor

    executor = create_executor("ray", init_kwargs={"num_cpus": 2})
    try:
        with pytest.raises(RunsFailedError) as info:
            medtune.sweep(SWEEP, store=tmp_path, executor=executor)
        failed_id, _ = _check_one_failed_one_stored(ResultsStore(tmp_path), info.value)
        _rerun_trains_only(tmp_path, failed_id, executor=executor)
    finally:
        ray.shutdown()


def test_cli_sweep_with_a_failing_run_prints_the_table_and_one_line_per_failure(tmp_path, capsys):
    argv = ["sweep", "--data", "synthetic", "--arch", "medtune_tiny_cnn", "--weights", "none", "--epochs", "1",
            "--img-size", "16", "--batch-size", "16", "--device", "cpu", "--progress", "false",
            "--strategy", "l2_sp:alpha=1e20,full", "--store", str(tmp_path)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "full" in out and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("medtune: ")]
    assert len(lines) == 2
    assert lines[0].startswith("medtune: run ") and "failed: training diverged" in lines[0]
    assert lines[1].startswith("medtune: error: 1 of 2 run(s) failed")


def test_sigterm_releases_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    import medtune.runner as runner

    real_fit = runner.fit

    class Term:
        def on_epoch_end(self, record):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runner, "fit", lambda *a, callbacks=(), **k: real_fit(*a, callbacks=(*callbacks, Term()), **k))
    before = signal.getsignal(signal.SIGTERM)
    status = main(["run", "--data", "synthetic", "--arch", "medtune_tiny_cnn", "--weights", "none", "--epochs", "2",
                   "--img-size", "16", "--device", "cpu", "--progress", "false", "--store", str(tmp_path)])
    assert status == 143
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("medtune:")] == [
        "medtune: terminated (SIGTERM); finished runs are stored and the current one resumes from its last epoch "
        "when you run the same command again."]
    assert [r["status"] for r in ResultsStore(tmp_path).runs(status=None)] == ["pending"]
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is restored"


def test_a_non_finite_training_loss_stops_the_run_in_its_epoch(tiny_cfg, synthetic_data, monkeypatch):
    import torch

    from medtune.errors import TrainingError
    from medtune.runner import build_run
    from medtune.training.loop import fit

    strategy, model, blocks = build_run(tiny_cfg, synthetic_data, torch.device("cpu"))
    monkeypatch.setattr(type(strategy), "extra_loss", lambda self, m: torch.tensor(float("inf")))
    epochs = []

    class Seen:
        def on_epoch_end(self, record):
            epochs.append(record)

    with pytest.raises(TrainingError, match=r"the loss became inf in epoch 1 of phase 'full' \(lr 0.01\)"):
        fit(model, synthetic_data, strategy, tiny_cfg, blocks=blocks, callbacks=(Seen(),))
    assert epochs == [], "stopped before validation and the metrics"
