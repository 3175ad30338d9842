"""medtune.attack on stored runs: records and artifacts in the store, no recomputation, transfer."""

from __future__ import annotations

import importlib

import pytest
from safetensors.torch import load_file

import medtune
from medtune.store import ResultsStore

BASE = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1, "img_size": 16,
        "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1, "progress": False}
QUICK = {"num_source_images": 16, "max_passes": 1, "num_random": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    store = ResultsStore(tmp_path_factory.mktemp("store"))
    ids = [medtune.run({**BASE, "strategy": s}, store=store)["run_id"] for s in ("full", "linear")]
    return store, ids


@pytest.fixture(scope="module")
def other_dataset_run(two_runs):
    """A third run on another split of the synthetic data: same input size, another data fingerprint."""
    store, _ = two_runs
    return medtune.run({**BASE, "strategy": "linear", "split_seed": 1}, store=store)["run_id"]


def test_orders_of_zetas_and_sources_are_one_stored_audit(two_runs, monkeypatch):
    store, (run_id, _) = two_runs
    first = medtune.attack([run_id], store=store, sources=("train", "natural"), zetas=(0.04, 0.08), **QUICK)
    assert [(a["source"], a["zeta"]) for a in first] == [("train", 0.04), ("train", 0.08), ("natural", 0.04),
                                                        ("natural", 0.08)]
    for a in first:
        v = load_file(a["perturbation_file"])["v"]
        assert float(v.flatten().norm()) <= a["xi"] + 1e-6
        assert a["run_id"] == run_id and a["params"]["zetas"] == [0.04, 0.08]

    def no_audit(*_args, **_kwargs):
        raise AssertionError("a stored audit was recomputed")

    # the package attribute `audit` is the function, so patch the module itself
    monkeypatch.setattr(importlib.import_module("medtune.robustness.audit"), "audit", no_audit)
    again = medtune.attack([run_id], store=store, sources=("natural", "train"), zetas=(0.08, 0.04), **QUICK)
    assert [a["attack_id"] for a in again] == [a["attack_id"] for a in first]


def test_transfer_matrix_of_two_runs(two_runs, other_dataset_run):
    store, ids = two_runs
    logs = []
    records = medtune.attack([*ids, other_dataset_run], store=store, sources=("train",), zetas=(0.02, 0.04, 0.08),
                             norm="inf", transfer=True, log=logs.append, **QUICK)
    transfer = records[-1]
    assert transfer["source"] == "transfer" and transfer["run_id"] == "transfer" and transfer["zeta"] == 0.04
    # only the runs of one dataset are compared; the other one is named in the log, not mixed in
    assert set(transfer["matrix"]) == set(ids) and all(set(row) == set(ids) for row in transfer["matrix"].values())
    assert any("transfer: skipped dataset" in m and "one audited run only" in m for m in logs)
    assert [r["source"] for r in records].count("transfer") == 1
    for run_id in ids:  # on its own run, the middle-ζ UAP fools what the audit measured
        main = next(a for a in records if a["run_id"] == run_id and a["zeta"] == 0.04)
        assert transfer["matrix"][run_id][run_id] == pytest.approx(main["fooling_rate"])
        assert transfer["random"][run_id] == main["random_fooling_rate"]
        assert transfer["ci_low"][run_id][run_id] <= main["fooling_rate"] <= transfer["ci_high"][run_id][run_id]
    assert transfer in store.attacks("transfer")
    # read back from the store, the same UAPs give the same matrix
    assert medtune.attack([*ids, other_dataset_run], store=store, sources=("train",), zetas=(0.08, 0.02, 0.04),
                          norm="inf", transfer=True, **QUICK)[-1] == transfer


def test_targeted_all_has_a_transfer_matrix_per_target(two_runs):
    store, ids = two_runs
    records = medtune.attack(ids, store=store, sources=("natural",), zetas=(0.08,), targeted="all", transfer=True,
                             **QUICK)
    transfers = [r for r in records if r["source"] == "transfer"]
    num_classes = len({r["targeted"] for r in records if r["source"] != "transfer"})
    assert num_classes >= 2 and [t["targeted"] for t in transfers] == list(range(num_classes))
    for t in transfers:
        assert t["metric"] == "targeted_success" and t["uap_source"] == "natural"
        assert set(t["matrix"]) == set(ids)
