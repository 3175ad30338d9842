"""The report's Localisation section (heat-map gallery) renders in headless Chromium (skipped without it)."""

from __future__ import annotations

import pytest

import medtune
from tests.reporting.test_report_browser import CHROMIUM, _harness_copy, _load

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
pytest.importorskip("captum")


def test_heat_map_gallery_renders_in_chromium(tmp_path):
    store = tmp_path / "store"
    record = medtune.run(dict(data="synthetic_loc", arch="medtune_tiny_cnn", weights="none", strategy="full",
                              epochs=2, img_size=32, lr=3e-3, batch_size=16, device="cpu", store=str(store),
                              progress=False))
    medtune.explain(record["run_id"], store=str(store))
    report = medtune.report(str(store))
    from pathlib import Path

    text = Path(report).read_text(encoding="utf-8")
    assert "Localisation: heat maps" in text
    state, console = _load(_harness_copy(Path(report), tmp_path / "harness.html"), tmp_path / "profile")
    print("chromium:", state)
    assert state["images"] >= 2 and state["bad"] == [] and state["errors"] == [] and state["resources"] == []
    assert console == []
