"""MedMNIST read offline from its own cache folder, and metrics equal to MedMNIST's own Evaluator."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from medtune.config import RunConfig
from medtune.data import load_data
from medtune.errors import DataError
from medtune.training.metrics import compute_metrics

medmnist = pytest.importorskip("medmnist")
from medmnist import INFO, Evaluator  # noqa: E402

_MEDTUNE_TASK = {"binary-class": "binary", "multi-class": "multiclass", "ordinal-regression": "multiclass",
                 "multi-label, binary-class": "multilabel"}


@pytest.fixture
def offline(monkeypatch):
    """The network unreachable: any socket connection fails."""
    def refuse(*_args, **_kw):
        raise OSError("network unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["pneumoniamnist", "dermamnist", "chestmnist", "retinamnist"])
def test_metrics_equal_medmnist_evaluator(tmp_path, name, write_medmnist):
    write_medmnist(tmp_path, name)
    task = INFO[name]["task"]
    data = load_data(f"medmnist:{name}", img_size=28, medmnist_root=str(tmp_path), data_cache="memory")
    assert data.task == _MEDTUNE_TASK[task]
    test = data.split("test")
    rng = np.random.default_rng(1)
    n, k = len(test), len(INFO[name]["label"])
    if data.task == "multilabel":
        prob = 1 / (1 + np.exp(-rng.normal(size=(n, k))))
        prob[:3, :3] = 0.5  # exact ties at the threshold: absent, as MedMNIST's getACC (> 0.5)
    else:
        logits = rng.normal(size=(n, k))
        prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = compute_metrics(test.labels.numpy(), prob, task=data.task, class_names=data.class_names)
    theirs = Evaluator(name, "test", size=28, root=str(tmp_path)).evaluate(prob)
    assert abs(ours["auc"] - theirs.AUC) < 1e-9
    assert abs(ours["accuracy"] - theirs.ACC) < 1e-9


def test_medmnist_trains_offline_from_the_cache_folder(tmp_path, offline, write_medmnist):
    (tmp_path / "mm").mkdir()
    write_medmnist(tmp_path / "mm", "pneumoniamnist", size=64)
    import medtune

    cfg = RunConfig(data="medmnist:pneumoniamnist", medmnist_size=64, medmnist_root=str(tmp_path / "mm"),
                    arch="medtune_tiny_cnn", weights="none", strategy="full", epochs=2, img_size=32, batch_size=16,
                    lr=1e-2, device="cpu", store=str(tmp_path / "store"), progress=False, data_cache="memory")
    record = medtune.run(cfg)
    assert record["dataset"] == "pneumoniamnist" and record["metrics"]["auc"] > 0.9
    # the stored test probabilities score with MedMNIST's Evaluator exactly as medtune recorded them
    preds = np.load(tmp_path / "store" / record["artifacts"]["predictions"])
    theirs = Evaluator("pneumoniamnist", "test", size=64, root=str(tmp_path / "mm")).evaluate(preds["y_prob"])
    assert abs(record["metrics"]["auc"] - theirs.AUC) < 1e-9
    assert abs(record["metrics"]["accuracy"] - theirs.ACC) < 1e-9


def test_medmnist_root_from_the_environment(tmp_path, monkeypatch, offline, write_medmnist):
    write_medmnist(tmp_path, "retinamnist")
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    data = load_data("medmnist:retinamnist", img_size=28, data_cache="memory")
    assert data.num_classes == 5 and data.class_names[0] == INFO["retinamnist"]["label"]["0"]


def test_missing_medmnist_file_one_line_naming_file_and_folder(tmp_path, offline, capsys):
    from medtune.cli import main

    code = main(["run", "--data", "medmnist:pneumoniamnist", "--medmnist-size", "224", "--medmnist-root",
                 str(tmp_path), "--arch", "medtune_tiny_cnn", "--weights", "none", "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"pneumoniamnist_224.npz is not in {tmp_path} " in err[0] and f"put it in {tmp_path} " in err[0]
    assert "Traceback" not in err[0]


def test_unknown_medmnist_name_suggests(tmp_path):
    from medtune.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'pathmnist'"):
        load_data("medmnist:pathmnistt", medmnist_root=str(tmp_path))
