"""K-fold cross-validation: each fold is a run, the test split fixed, folds group-aware."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.config import RunConfig, SweepConfig
from medtune.data import make_synthetic
from medtune.data.splits import with_cv_fold
from medtune.errors import ConfigError, DataError
from medtune.runner import prepare_data, run_id_of
from medtune.sweeps import expand_sweep


def test_folds_rotate_validation_and_keep_test():
    data = make_synthetic(num_samples=60, img_size=8, num_classes=2, seed=0)
    data.groups = np.array([f"p{i // 3}" for i in range(len(data.splits))])  # 3 images per patient
    folds = [with_cv_fold(data, 3, k, seed=0) for k in range(3)]
    test = data.splits == "test"
    vals = [f.splits == "val" for f in folds]
    for f in folds:
        assert np.array_equal(f.splits == "test", test) and f.images is data.images  # no copy of the pixels
    assert not (vals[0] & vals[1]).any() and not (vals[1] & vals[2]).any()
    assert np.array_equal(vals[0] | vals[1] | vals[2], ~test)  # every non-test image validates once
    for f in folds:  # group-aware: no patient in both train and val
        assert not set(f.groups[f.splits == "val"]) & set(f.groups[f.splits == "train"])
    assert len({f.fingerprint() for f in folds}) == 3
    with pytest.raises(DataError, match="too few"):
        with_cv_fold(data, 50, 0, seed=0)


def test_a_sweep_runs_every_fold_and_the_fold_is_in_the_run_key():
    cfg = SweepConfig.from_dict({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "img_size": 16,
                                 "strategy": ["linear"], "seeds": [0, 1], "cv_folds": 3})
    runs = expand_sweep(cfg)
    assert [(r.fold, r.seed) for r in runs] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    ids = {run_id_of(r, prepare_data(r).fingerprint()) for r in runs}
    assert len(ids) == 6
    # without cross-validation the run id is what it was before the fields existed
    plain = RunConfig(data="synthetic")
    assert "cv_folds" not in plain.semantic_dict() and "fold" not in plain.semantic_dict()
    with pytest.raises(ConfigError, match="fold"):
        RunConfig(cv_folds=3, fold=3)
    with pytest.raises(ConfigError, match="cv_folds"):
        RunConfig(cv_folds=1)


def test_cross_validated_runs_aggregate_over_folds_and_seeds(tmp_path):
    import medtune
    from medtune.reporting import summarize
    from medtune.reporting._data import build_report_data

    records = medtune.sweep({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1,
                             "img_size": 16, "batch_size": 16, "device": "cpu", "progress": False,
                             "strategy": ["linear", "full"], "cv_folds": 2}, store=str(tmp_path / "s"))
    assert len(records) == 4 and sorted(r["fold"] for r in records) == [0, 0, 1, 1]
    table = summarize(records, metrics=["auc"])
    assert set(table["n"]) == {2}  # folds × seeds
    data = build_report_data(records, [], [], metric="auc", alpha=0.05, main_zeta=0.04)
    assert list(data.folds.columns) == ["dataset", "arch", "label", "fold 0", "fold 1", "sd across folds"]
    assert len({r["data_fingerprint"] for r in records}) == 2
