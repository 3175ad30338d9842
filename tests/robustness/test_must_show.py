"""A UAP must exist on the colour task: it should fool far more than its random control.

Numbers measured with the papers' defaults (goal 1.0, 15 passes; trained TinyCNN, 240 train / 150
test images): ζ=8% L2 fooling 0.48 vs random 0.00; L∞ 0.66 vs 0.00; targeted success 0.79-1.00 per
class vs 0.33 clean share. Run with ``-s`` to print them.
"""

from __future__ import annotations

import pytest

from medtune.robustness import compute_uap, evaluate_perturbation, random_control


def test_the_task_is_learned(colour_task):
    assert colour_task["test_accuracy"] >= 0.95


@pytest.mark.parametrize("norm", [2, "inf"])
def test_uap_beats_random_control_by_a_wide_margin(colour_task, norm):
    model, test_x, test_y = colour_task["model"], colour_task["test_x"], colour_task["test_y"]
    uap = compute_uap(model, colour_task["train_x"], zeta=0.08, norm=norm)
    control = random_control(uap.perturbation, norm, seed=0)
    fooled = evaluate_perturbation(model, test_x, test_y, uap.perturbation)
    chance = evaluate_perturbation(model, test_x, test_y, control)
    print(
        f"\nnorm={norm} zeta=0.08 xi={uap.xi:.3f}: UAP fooling {fooled['fooling_rate']:.3f} "
        f"[{fooled['fooling_ci_low']:.3f}, {fooled['fooling_ci_high']:.3f}], random "
        f"{chance['fooling_rate']:.3f}, passes {uap.num_passes}, {uap.seconds:.2f}s"
    )
    assert fooled["fooling_rate"] - chance["fooling_rate"] >= 0.3
    assert fooled["fooling_ci_low"] > chance["fooling_ci_high"]
    assert fooled["perturbed_accuracy"] < fooled["clean_accuracy"] - 0.3


@pytest.mark.parametrize("norm", [2, "inf"])
def test_targeted_uap_reaches_most_of_the_test_set(colour_task, norm):
    model, test_x, test_y = colour_task["model"], colour_task["test_x"], colour_task["test_y"]
    for target in range(3):
        uap = compute_uap(model, colour_task["train_x"], zeta=0.08, norm=norm, targeted=target)
        res = evaluate_perturbation(model, test_x, test_y, uap.perturbation, targeted=target)
        control = evaluate_perturbation(
            model, test_x, test_y, random_control(uap.perturbation, norm, seed=0), targeted=target
        )
        print(
            f"\nnorm={norm} target={target}: success {res['targeted_success']:.3f} (clean share "
            f"{res['clean_target_share']:.3f}, random {control['targeted_success']:.3f})"
        )
        assert res["targeted_success"] > 0.5
        assert res["targeted_success"] > res["clean_target_share"] + 0.3
        assert res["targeted_success"] > control["targeted_success"] + 0.3
