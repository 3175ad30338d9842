"""Interrupted runs and sweeps resume to exactly the result of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medtune.models import get_blocks
from medtune.store import ResultsStore
from medtune.strategies import create_strategy
from medtune.training.loop import fit
from tests.conftest import make_tiny


class Crash(Exception):
    pass


class CrashAt:
    def __init__(self, n):
        self.n, self.count = n, 0

    def on_epoch_end(self, record):
        self.count += 1
        if self.count == self.n:
            raise Crash


@pytest.mark.parametrize("spec,crash_at,augment", [
    ("full", 2, ()), ("lp_ft", 3, ()), ("lp_ft", 2, ()), ("linear:solver=epochs", 2, ()), ("gradual_lf", 2, ()),
    ("auto_rgn", 2, ()), ("l2_sp", 2, ()), ("full", 2, ("hflip", "vflip", "affine", "color"))])
def test_resumed_run_ends_with_the_same_weights(spec, crash_at, augment, tiny_cfg, synthetic_data, tmp_path):
    cfg = tiny_cfg.replace(epochs=3, augment=augment)

    def train(callbacks=(), ckpt=None):
        model = make_tiny()
        strategy = create_strategy(spec)
        blocks = get_blocks(model, granularity=strategy.granularity)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            result = fit(model, synthetic_data, strategy, cfg, blocks=blocks, checkpoint_path=ckpt, callbacks=callbacks)
        return model, result

    ref_model, ref = train()
    ckpt = tmp_path / "ck.pt"
    with pytest.raises(Crash):
        train(callbacks=(CrashAt(crash_at),), ckpt=ckpt)
    assert ckpt.exists()
    model, resumed = train(ckpt=ckpt)
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    assert resumed.test_metrics == ref.test_metrics
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in ref.history]
    # the prefix's extraction cost is charged once, not again on resume
    assert resumed.extras["feature_seconds"] == ref.extras["feature_seconds"]


SWEEP_YAML = """
data: synthetic
arch: medtune_tiny_cnn
weights: none
strategy: [linear, full, lp_ft]
seeds: [0, 1]
epochs: 4
img_size: 16
batch_size: 8
lr: 0.01
num_threads: 1
device: cpu
"""


def _sweep_cmd(cfg, store):
    return [sys.executable, "-m", "medtune.cli", "sweep", str(cfg), "--store", str(store), "--format", "json"]


def _metrics(store):
    return {r["run_id"]: r["metrics"] for r in ResultsStore(store).runs()}


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP_YAML.replace("epochs: 4", "epochs: 20"))  # runs long enough to be killed mid-training
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ref = subprocess.run(_sweep_cmd(cfg, tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    expected = _metrics(tmp_path / "ref")
    assert len(expected) == 6

    store = tmp_path / "killed"
    ckpts = store / "checkpoints"
    proc = subprocess.Popen(_sweep_cmd(cfg, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    # kill during the second run, after at least one epoch checkpoint of it exists
    deadline = time.time() + 120
    while time.time() < deadline:
        if (len(_metrics(store) if (store / "medtune.sqlite").exists() else {}) >= 1 and ckpts.exists()
                and any(p.suffix == ".pt" for p in ckpts.iterdir())):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_metrics(store))
    assert 1 <= done_before < 6, "the kill must land mid-sweep"
    again = subprocess.run(_sweep_cmd(cfg, store), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    got = _metrics(store)
    assert got == expected, "every run exactly once, with the uninterrupted sweep's metrics"
    import sqlite3

    rows = sqlite3.connect(store / "medtune.sqlite").execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    assert rows == [("done", 6)]
    assert "resuming from" in again.stderr, "the interrupted run resumed from its checkpoint"


@pytest.mark.slow
def test_sweep_killed_at_five_random_moments_ends_with_every_run_once(tmp_path):
    import random
    import sqlite3

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP_YAML.replace("strategy: [linear, full, lp_ft]", "strategy: [linear, full, lp_ft, top_k:1]")
                   .replace("epochs: 4", "epochs: 20"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ref = subprocess.run(_sweep_cmd(cfg, tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    expected = _metrics(tmp_path / "ref")
    assert len(expected) == 8
    store = tmp_path / "killed"
    rng = random.Random(1234)
    progress = []
    for _ in range(5):
        started = time.time()
        proc = subprocess.Popen(_sweep_cmd(cfg, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        # a random moment during training: once this process has written an epoch checkpoint, plus a random delay
        deadline = started + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if any(p.stat().st_mtime > started for p in (store / "checkpoints").glob("*.pt")):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (store / "medtune.sqlite").exists():
            statuses = [r["status"] for r in ResultsStore(store).runs(status=None)]
            progress.append((statuses.count("done"), statuses.count("running")))
        else:
            progress.append((0, 0))
    final = subprocess.run(_sweep_cmd(cfg, store), capture_output=True, text=True, env=env, timeout=300)
    assert final.returncode == 0, final.stderr
    # (finished, interrupted-in-training) after each kill: at least two kills must hit a run mid-training
    assert sum(1 for _, running in progress if running) >= 2, progress
    assert _metrics(store) == expected
    rows = sqlite3.connect(store / "medtune.sqlite").execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    assert rows == [("done", 8)]
    assert not list((store / "checkpoints").iterdir()), "no stale checkpoint is left behind"
