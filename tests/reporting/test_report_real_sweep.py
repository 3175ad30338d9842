"""The report of a small *real* sweep (with a UAP audit and a DEFT search) renders in headless Chromium."""

from __future__ import annotations

import pytest

import medtune
from medtune.store import ResultsStore
from tests.reporting.test_report_browser import CHROMIUM, _chromium, _harness_copy, _load

BASE = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 2, "img_size": 16,
        "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = ResultsStore(root)
    records = medtune.sweep({**BASE, "strategy": ["linear", "top_k:all", "full", "auto_rgn"], "seeds": [0, 1]},
                            store=store)
    best = max(records, key=lambda r: r["metrics"]["auc"])
    medtune.attack([best["run_id"]], store=store, sources=("train", "natural"), zetas=(0.04, 0.08),
                   num_source_images=32, max_passes=2, device="cpu")
    medtune.search({**BASE, "popsize": 5, "generations": 1, "search_epochs": 1, "compare": False}, store=store)
    return root


def test_report_of_a_real_store_has_every_section(real_store):
    out = medtune.report(str(real_store), out_path=str(real_store / "report.html"))
    text = open(out, encoding="utf-8").read()
    for needle in ("Recommend", "top_k:2", "auto_rgn", "DEFT", "fooling"):
        assert needle.lower() in text.lower(), needle
    assert 'src="http' not in text


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_real_report_renders_in_chromium(real_store, tmp_path):
    out = medtune.report(str(real_store), out_path=str(tmp_path / "report.html"))
    from pathlib import Path

    state, console = _load(_harness_copy(Path(out), tmp_path / "harness.html"), tmp_path / "profile")
    assert state["images"] >= 5 and state["bad"] == [] and state["errors"] == [] and console == []
    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,2000", Path(out).as_uri()], tmp_path / "p2")
    assert shot.is_file() and shot.stat().st_size > 20_000
