"""Report figures: drawn from records when there is something to draw, None otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from medtune.reporting.plots import (
    pareto_front,
    plot_auto_rgn,
    plot_confusion,
    plot_cost,
    plot_deft,
    plot_depth,
    plot_fooling,
    plot_roc,
    plot_train_fraction,
    plot_uaps,
)

MEANS = {"linear": 0.80, "top_k:1": 0.90, "top_k:2": 0.90, "full": 0.90, "auto_rgn": 0.9}


def test_pareto_front_known_points():
    cost = [1, 2, 3, 4, 4]
    value = [0.5, 0.7, 0.6, 0.9, 0.8]
    assert pareto_front(cost, value).tolist() == [True, True, False, True, False]
    assert pareto_front(cost, value, higher_is_better=False).tolist() == [True, False, False, False, False]
    assert pareto_front([1, float("nan")], [0.5, 0.9]).tolist() == [True, False]


def test_depth_plot_puts_linear_at_zero_and_full_at_max(make_runs):
    runs = make_runs(MEANS, datasets=("demo",), archs=("resnet18",))
    fig = plot_depth(runs)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    x = ax.lines[0].get_xdata()
    np.testing.assert_array_equal(x, [0, 1, 2, 5])  # resnet18 fixture: 6 blocks, full depth 5
    y = ax.lines[0].get_ydata()
    assert y[0] == pytest.approx(0.80, abs=0.005) and y[-1] == pytest.approx(0.90, abs=0.005)
    assert plot_depth(make_runs({"full": 0.9, "linear": 0.8})) is None  # no top_k runs


def test_train_fraction_plot_needs_two_fractions(make_runs):
    runs = make_runs({"scratch": 0.75, "full": 0.9}, fractions=(0.25, 1.0), datasets=("demo",), archs=("resnet18",))
    fig = plot_train_fraction(runs)
    assert isinstance(fig, Figure)
    lines = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}  # errorbar containers
    assert set(lines) >= {"scratch", "full"}
    np.testing.assert_array_equal(lines["full"].get_xdata(), [0.25, 1.0])
    assert lines["scratch"].get_linestyle() == "--"
    assert plot_train_fraction(make_runs(MEANS)) is None


def test_cost_plot_marks_pareto_front(make_runs):
    fig = plot_cost(make_runs(MEANS, archs=("resnet18",), amplitude=dict.fromkeys(MEANS, 0.0)))
    front = [line for line in fig.axes[0].lines if line.get_label() == "Pareto front"][0]
    # without noise: linear (1k params, 0.80) and top_k:1 (1M, 0.90) form the front; every
    # other label also scores 0.90 at a higher cost, so it is dominated
    assert sorted(front.get_xdata()) == [1_000, 1_000_000]
    assert plot_cost([]) is None


def test_auto_rgn_plot_one_line_per_block(make_runs):
    fig = plot_auto_rgn(make_runs(MEANS, archs=("resnet18",), auto_rgn=True))
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["stem", "stage_1", "stage_2", "stage_3", "stage_4", "head"]
    np.testing.assert_allclose(fig.axes[0].lines[-1].get_ydata(), [1.0, 0.9, 0.8])
    assert plot_auto_rgn(make_runs(MEANS)) is None


def test_deft_plot_fills_trainable_blocks_and_head(make_search):
    search = make_search()
    fig = plot_deft(search)
    boxes = [p for p in fig.axes[1].patches if isinstance(p, Rectangle)]
    assert len(boxes) == len(search["unit_names"]) + 1  # + head
    filled = [b for b in boxes if b.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(filled) == sum(search["best_mask"]) + 1
    assert plot_deft({"search_id": "empty"}) is None


def test_roc_and_confusion_from_predictions(make_runs):
    runs = make_runs(MEANS, predictions=True)
    roc = plot_roc(runs, max_runs=2)
    assert len(roc.axes) == 2
    cm = plot_confusion(runs, max_runs=3)
    assert len(cm.axes) == 3
    assert plot_roc(make_runs(MEANS)) is None and plot_confusion(make_runs(MEANS)) is None


def test_roc_multiclass_with_absent_class_and_multilabel(make_runs):
    run = make_runs({"full": 0.9}, datasets=("d",), archs=("resnet18",), seeds=(0,))[0]
    y = np.array([0, 1, 0, 1, 0, 1])  # class 2 never occurs
    prob = np.full((6, 3), 0.1)
    prob[np.arange(6), y] = 0.8
    run["predictions"] = {"y_true": y.tolist(), "y_prob": prob.tolist(), "class_names": ["a", "b", "c"]}
    fig = plot_roc([run])
    assert len([ln for ln in fig.axes[0].lines if not ln.get_label().startswith("_")]) == 2  # a, b; c skipped
    assert plot_confusion([run]) is not None
    multi = dict(run, predictions={"y_true": [[1, 0], [0, 1], [1, 1], [0, 0]],
                                   "y_prob": [[0.9, 0.2], [0.1, 0.8], [0.7, 0.6], [0.2, 0.3]]})
    assert plot_roc([multi]) is not None
    assert plot_confusion([multi]) is None  # multi-label: no single confusion matrix


def test_fooling_plot_one_panel_per_label(make_runs, make_attacks):
    runs = make_runs(MEANS)
    attacks = make_attacks(runs)
    fig = plot_fooling(attacks, runs)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["full", "linear", "top_k:1"]
    assert plot_fooling([], runs) is None
    assert plot_fooling([a for a in attacks if a["targeted"] is not None], runs) is None


def test_uap_images_only_from_existing_files(make_runs, make_attacks, make_png, tmp_path):
    runs = make_runs(MEANS)
    attacks = make_attacks(runs, tmp_path)
    fig = plot_uaps(attacks, runs, max_images=4)
    assert sum(ax.get_visible() for ax in fig.axes) == 4
    assert plot_uaps(make_attacks(runs)) is None  # no png paths
    gone = [dict(a, uap_png=str(tmp_path / "missing.png")) for a in attacks]
    assert plot_uaps(gone) is None
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert plot_uaps([dict(attacks[0], uap_png=str(tmp_path / "broken.png"))]) is None


def test_depth_plot_fills_missing_end_point_depths(make_runs):
    runs = make_runs(MEANS, datasets=("demo",), archs=("resnet18",))
    for r in runs:
        if r["strategy"] in ("linear", "full"):
            r["depth"] = None  # older records: derived from the strategy and num_blocks
    np.testing.assert_array_equal(plot_depth(runs).axes[0].lines[0].get_xdata(), [0, 1, 2, 5])


def test_fooling_plot_is_grouped_bars_below_three_zetas(make_runs, make_attacks):
    """One ζ: a bar per source and one for the random control at each ζ (heights = the mean rates),
    not one point on an empty axis; three ζ: lines."""
    import numpy as np

    from medtune.reporting.plots import compact

    runs = make_runs(MEANS)
    attacks = [a for a in make_attacks(runs) if a["zeta"] == 0.04 and a["targeted"] is None]
    fig = plot_fooling(attacks, runs)
    ax = next(ax for ax in fig.axes if ax.get_title() == "top_k:1")
    mine = [a for a in attacks if a["run_id"] in {r["run_id"] for r in runs if r["label"] == "top_k:1"}]
    sources = sorted({a["source"] for a in mine})
    heights = [[p.get_height() for p in c.patches] for c in ax.containers if hasattr(c, "patches")]
    assert heights == [[np.mean([a["fooling_rate"] for a in mine if a["source"] == s])] for s in sources] + \
        [[np.mean([a["random_fooling_rate"] for a in mine])]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4%"]
    assert not any(len(line.get_xdata()) for line in ax.lines if not line.get_label().startswith("_"))
    three = plot_fooling(make_attacks(runs), runs)
    assert not [c for ax in three.axes for c in ax.containers if hasattr(c, "patches") and c.patches]
    small = compact(fig, panel="top_k:1")
    assert [a.get_title() for a in small.axes] == ["top_k:1"] and small.get_size_inches().tolist() == [3.4, 2.7]
    small.canvas.draw()
    assert min(t.get_fontsize() for t in small.axes[0].get_yticklabels()) >= 10
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["full", "linear", "top_k:1"]  # fig untouched
