"""The HTML/Markdown report: self-contained, escaped, built with or without every part."""

from __future__ import annotations

import base64
import csv
import io
import re

import pytest
from PIL import Image

from medtune.errors import ConfigError
from medtune.reporting import build_report
from medtune.reporting._data import build_report_data
from medtune.reporting.report import format_report

MEANS = {"linear": 0.80, "top_k:1": 0.90, "full": 0.901}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_report_is_self_contained(built_report):
    path, *_ = built_report
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert 'src="http' not in text and "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert "Content-Security-Policy" in text and "img-src data:" in text
    imgs = re.findall(r"<img [^>]*>", text)
    assert len(imgs) >= 8  # depth, cost, fraction, auto-rgn, roc, confusion, fooling, uaps, deft
    for tag in imgs:
        src = re.search(r'src="([^"]*)"', tag).group(1)
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            width = int(re.search(r'width="(\d+)"', tag).group(1))
            assert im.size[0] == width and im.size[1] > 50


def test_report_headline_sections_and_marks(built_report):
    path, *_ = built_report
    text = path.read_text(encoding="utf-8")
    headline = text[text.index('id="recommendation"'):text.index('id="summary"')]
    assert "Recommended: top_k:1" in headline and "fewer trainable parameters" in headline
    assert "UAP fooling rate" in headline
    for anchor in ("summary", "plots", "statistics", "robustness", "deft", "runs", "reproducibility"):
        assert f'<section id="{anchor}">' in text
    assert 'class="best"' in text and 'class="rec"' in text and "top_k:1 ≈ ★" in text
    assert "linear ≈" not in text  # clearly worse: not marked
    assert "@media print" in text
    assert "failed-run" in text  # the appendix lists unfinished runs too
    assert "torch 2.14.1" in text  # reproducibility: versions


def test_report_escapes_strings(built_report, make_runs, tmp_path):
    path, *_ = built_report
    text = path.read_text(encoding="utf-8")
    assert "Demo &lt;study&gt; &amp; co" in text and "<study>" not in text
    runs = make_runs(MEANS, seeds=(0,), datasets=("<img src=x onerror=alert(1)>",), archs=("resnet18",))
    out = build_report(runs, title="<script>alert(1)</script>", out_path=tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text


def test_report_writes_csv_tables(built_report):
    path, runs, attacks, searches = built_report
    for name in ("summary", "runs", "wilcoxon", "friedman", "attacks", "deft"):
        assert path.with_name(f"report_{name}.csv").is_file(), name
    with open(path.with_name("report_runs.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(runs) and {"run_id", "auc", "config_sha"} <= set(rows[0])
    with open(path.with_name("report_attacks.csv"), newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(attacks)
    with open(path.with_name("report_summary.csv"), newline="") as fh:
        summary = list(csv.DictReader(fh))
    # 2 datasets x 2 archs x 6 labels at fraction 1, + 1 dataset x 2 archs x 3 labels x 2 small fractions
    assert len(summary) == 24 + 12


def test_report_with_missing_parts(make_runs, tmp_path):
    runs = make_runs(MEANS, seeds=(0,))  # one seed, no predictions, no auto_rgn
    out = build_report(runs, out_path=tmp_path / "sub" / "r.html")
    text = out.read_text(encoding="utf-8")
    assert "significance can&#x27;t be tested" in text
    assert "No UAP audits recorded" in text and "No DEFT searches recorded" in text
    assert "No run stores test predictions" in text and "No auto_rgn runs" in text
    assert "A single train fraction" in text
    assert not out.with_name("r_attacks.csv").exists()


def test_report_without_any_records(tmp_path):
    out = build_report([], out_path=tmp_path / "empty.html")
    text = out.read_text(encoding="utf-8")
    assert "nothing to recommend" in text and "No finished runs" in text
    assert "<img" not in text


def test_markdown_report_writes_pngs_beside(make_runs, make_attacks, make_search, tmp_path):
    runs = make_runs(MEANS, predictions=True)
    out = build_report(runs, make_attacks(runs, tmp_path), [make_search()], out_path=tmp_path / "md" / "r.md",
                       fmt="md", title="a | b")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# a \\| b")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"r_depth.png", "r_cost.png", "r_roc.png", "r_fooling.png", "r_deft_0.png"} <= set(images)
    for name in images:
        assert (out.parent / name).read_bytes().startswith(PNG_SIGNATURE)
    assert "| dataset | arch | configuration |" in text and "top\\_k:1" in text
    assert out.with_name("r_summary.csv").is_file()


def test_report_rejects_bad_arguments(make_runs, tmp_path):
    runs = make_runs(MEANS, seeds=(0,))
    with pytest.raises(ConfigError, match="'fmt'.*'pdf'"):
        build_report(runs, out_path=tmp_path / "r.pdf", fmt="pdf")
    with pytest.raises(ConfigError, match="build_report.*Did you mean 'auc'"):
        build_report(runs, out_path=tmp_path / "r.html", metric="acu")
    with pytest.raises(ConfigError, match="'alpha' parameter of build_report"):
        build_report(runs, out_path=tmp_path / "r.html", alpha=5)
    assert not (tmp_path / "r.html").exists()


def test_report_data_holds_the_numbers_the_blocks_show(runs):
    data = build_report_data(runs, [], [], metric="auc", alpha=0.05, main_zeta=0.04)
    assert data.recommendation["label"] == "top_k:1"
    assert {r["label"] for r in data.summary.rows if r["recommended"]} == {"top_k:1"}
    assert not any(r["not_worse"] for r in data.summary.rows if r["label"] in ("linear", "scratch"))
    # the cheapest run per dataset (by construction: linear on the 0.4x-cost arch) is marked best
    cheapest = {(r["dataset"], r["arch"], r["label"]) for r in data.summary.rows if "trainable_params" in r["best"]}
    assert cheapest == {(d, "tf_efficientnet_lite0", "linear") for d in ("demo", "derm")}
    assert data.counts.num_done == len(runs) and data.counts.num_seeds == 3
    assert data.robustness is None and data.searches == [] and data.appendix.runs.shape[0] == len(runs)
    assert [fr["metric"] for fr in data.statistics.friedman] == ["auc", "accuracy", "balanced_accuracy", "f1"]
    assert set(data.csv) == {"summary", "friedman", "wilcoxon", "runs"}
    report = format_report(data, "t")
    assert [s.anchor for s in report.sections] == ["summary", "plots", "statistics", "classes", "robustness", "deft",
                                                   "runs", "reproducibility"]


def test_first_screen_answers_how_deep_which_strategy_how_exposed(full_records):
    runs, attacks, searches = full_records
    data = build_report_data(runs, attacks, searches, metric="auc", alpha=0.05, main_zeta=0.04)
    box = format_report(data, "t").recommendation
    rec = data.recommendation
    assert box.answers.startswith("How deep: fine-tuning ")
    assert f"Which strategy: {rec['label']}," in box.answers
    # the recommended configuration was audited: its own rates (fake audits: 0.2 + 6ζ from train images)
    assert rec["label"] == "top_k:1" and "How exposed, at ζ = 4%: top_k:1: UAP fooling" in box.answers
    assert "from train images 44%" in box.answers
    assert [f.name for f in box.figures] == ["headline_depth", "headline_cost", "headline_fooling"]
    # drawn small (one panel, 340 px wide at 100 dpi, ticks >= 10 pt), not scaled down
    assert all(f.scale == 1.0 and tuple(f.figure.get_size_inches()) == (3.4, 2.7) for f in box.figures)
    assert box.figures[2].figure.axes[0].get_title() == "top_k:1"  # the recommended configuration's panel
    # the best depth is chosen on validation: make validation prefer linear (depth 0) against test
    flipped = [{**r, "val_metrics": {**r["val_metrics"], "auc": 0.999 if r["label"] == "linear" else 0.5}}
               for r in runs]
    depth = build_report_data(flipped, [], [], metric="auc", alpha=0.05, main_zeta=0.04).depth
    assert depth["depth"] == 0 and depth["val_mean"] == pytest.approx(0.999)
    # without an audit of the recommended configuration, the audited ones are named instead
    others = [a for a in attacks if a["run_id"] not in {r["run_id"] for r in runs if r["label"] == "top_k:1"}]
    data = build_report_data(runs, others, searches, metric="auc", alpha=0.05, main_zeta=0.04)
    answers = format_report(data, "t").recommendation.answers
    assert "top_k:1 was not audited" in answers and "full: UAP fooling" in answers and "linear: UAP" in answers


def test_appendix_shows_the_precision_where_runs_differ(make_runs, tmp_path):
    runs = make_runs(MEANS, seeds=(0, 1), datasets=("d",), archs=("resnet18",))
    same = build_report([{**r, "precision": "fp32"} for r in runs], out_path=tmp_path / "same.html")
    assert "<th>precision</th>" not in same.read_text(encoding="utf-8")
    mixed = [{**r, "precision": "bf16" if r["seed"] == 1 else "fp32"} for r in runs]
    text = build_report(mixed, out_path=tmp_path / "mixed.html").read_text(encoding="utf-8")
    assert "<th>precision</th>" in text
    assert text.count("<td>bf16</td>") == sum(r["seed"] == 1 for r in runs) > 0
