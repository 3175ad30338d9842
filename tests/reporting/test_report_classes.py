"""The report's classes section: per-class metrics, the operating point chosen on validation and the
calibration, as means over each configuration's stored runs."""

from __future__ import annotations

import numpy as np
import pytest

import medtune
from medtune.reporting import build_report
from medtune.reporting._data import build_report_data
from medtune.store import ResultsStore


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    store = ResultsStore(tmp_path_factory.mktemp("store"))
    return medtune.sweep({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "strategy": ["full"],
                          "seeds": [0, 1], "epochs": 1, "img_size": 16, "device": "cpu", "progress": False,
                          "class_weight": "balanced"}, store=store)


def test_classes_data_are_means_over_runs(records):
    data = build_report_data(records, [], [], metric="auc", alpha=0.05, main_zeta=0.04)
    cal = data.classes.calibration
    assert len(cal) == 1 and cal["runs"].iloc[0] == 2
    assert cal["ece"].iloc[0] == pytest.approx(np.mean([r["calibration"]["ece"] for r in records]))
    assert cal["temperature"].iloc[0] == pytest.approx(np.mean([r["calibration"]["temperature"] for r in records]))
    pc = data.classes.per_class
    assert sorted(pc["class"]) == sorted(records[0]["predictions"]["class_names"])
    disc = pc[pc["class"] == "disc"].iloc[0]
    assert disc["sensitivity"] == pytest.approx(np.mean([r["per_class"]["test"]["disc"]["sensitivity"]
                                                         for r in records]))
    op = data.classes.operating.iloc[0]
    assert op["threshold"] == pytest.approx(np.mean([r["operating_point"]["threshold"] for r in records]))
    assert set(data.csv) >= {"per_class", "operating", "calibration"}


def test_report_shows_the_section_and_old_records_get_a_note(records, tmp_path):
    out = build_report(records, out_path=tmp_path / "r.md", fmt="md")
    text = out.read_text()
    assert "Classes, operating point and calibration" in text and "ECE (T-scaled)" in text and "PR-AUC" in text
    assert (tmp_path / "r_calibration.csv").is_file() and (tmp_path / "r_reliability.png").is_file()
    old = [{k: v for k, v in r.items() if k not in ("per_class", "operating_point", "calibration")} for r in records]
    text = build_report(old, out_path=tmp_path / "old.md", fmt="md").read_text()
    assert "No run records per-class metrics or calibration" in text
