"""The parameter-efficiency frontier, the data-size plot and what the recommendation says it trains."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from medtune.reporting import plots
from medtune.reporting._data import build_report_data
from medtune.reporting._records import main_fraction_runs

# label: (strategy, trainable params, val AUC at per-class sizes 5, 20, 80)
CONFIGS = {
    "knn:11": ("knn", 0, (0.80, 0.84, 0.86)),
    "linear": ("linear", 3_843, (0.82, 0.88, 0.90)),
    "bitfit": ("bitfit", 24_851, (0.78, 0.87, 0.89)),  # dominated by linear: fewer params, better val
    "lora": ("lora", 186_587, (0.76, 0.90, 0.95)),
    "full": ("full", 3_374_851, (0.70, 0.86, 0.96)),
}


def _records() -> list[dict]:
    out = []
    for label, (strategy, params, vals) in CONFIGS.items():
        for shots, val in zip((5, 20, 0), vals):
            for seed in (0, 1):
                n = 3 * (shots or 80)
                out.append({
                    "run_id": f"{label}-{shots}-{seed}", "status": "done", "dataset": "demo",
                    "arch": "tf_efficientnet_lite0", "strategy": strategy, "strategy_params": {},
                    "label": label + (f" [{shots}/class]" if shots else ""), "seed": seed, "train_fraction": 1.0,
                    **({"train_per_class": shots} if shots else {}), "num_train": n, "num_classes": 3,
                    "trainable_params": params, "total_params": 3_374_851, "train_seconds": 1.0 + params / 1e6,
                    "metrics": {"auc": val - 0.01 + 0.002 * seed}, "val_metrics": {"auc": val + 0.001 * seed},
                    "extras": {"trainable_per_block": {"stem": 1, "head": 2}} if strategy == "lora" else {},
                    "num_blocks": 9, "config": {"lr": 1e-3, "weight_decay": 1e-4}})
    return out


def test_k_shot_runs_leave_the_strategy_comparison():
    kept, note = main_fraction_runs(_records())
    assert {r["label"] for r in kept} == set(CONFIGS)
    assert "fewer images per class" in note


def test_frontier_pareto_set_is_chosen_on_validation():
    st = plots.efficiency_frontier(_records(), "auc").set_index("label")
    # validation at 80/class: knn .86 (0 params), linear .90, bitfit .89 (dominated), lora .95, full .96
    assert set(st.index[st["pareto"]]) == {"knn:11", "linear", "lora", "full"}
    assert st.loc["lora", "family"] == "peft" and st.loc["full", "family"] == "depth"
    assert isinstance(plots.plot_efficiency_frontier(_records(), "auc"), Figure)


def test_data_size_plot_marks_where_full_overtakes_linear():
    frame = plots.data_size_frame(_records(), "auc")
    assert sorted(frame["per_class"].unique()) == [5.0, 20.0, 80.0]
    sel = frame[(frame["dataset"] == "demo")]
    assert plots.overtakes(sel) == (20.0, 80.0)  # full below linear at 5 and 20, above at 80 (validation)
    assert plots.overtakes(sel, "lora", "linear") == (5.0, 20.0)
    assert plots.overtakes(sel, "knn:11", "linear") is None
    assert isinstance(plots.plot_data_size(_records(), "auc"), Figure)


def test_recommendation_says_what_the_chosen_configuration_trains():
    from medtune.reporting.report import _answers

    data = build_report_data(_records(), [], [], metric="auc", alpha=0.05, main_zeta=0.04)
    assert data.figures["frontier"] is not None and data.figures["data_size"] is not None
    assert "frontier" in data.csv and "data_size" in data.csv
    text = _answers(data)
    label = data.recommendation["label"]
    assert data.trains["label"] == label
    assert f"It trains {CONFIGS[label][1]:,}" in text
    if label == "lora":
        assert "per block: stem 1, head 2" in text and "LoRA" in text


@pytest.mark.parametrize("label,expected", [("full [5/class]", "full"), ("lora:r=4 [20/class]", "lora:r=4"),
                                            ("full [bucket]", "full [bucket]")])
def test_base_label_strips_only_the_shots(label, expected):
    assert plots.base_label(label) == expected
