"""evaluate_perturbation and transfer_matrix on models whose predictions are known by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medtune.errors import ConfigError, DataError
from medtune.robustness import evaluate_perturbation, mcnemar_test, rate_ci, transfer_matrix

# brightest channel wins; v raises the blue channel by 0.3
COLOURS = [(0.6, 0.5, 0.1), (0.2, 0.5, 0.3), (0.1, 0.2, 0.4), (0.5, 0.1, 0.45)]
#   clean prediction:   0                1                2                0
#   prediction on x+v:  0                2                2                2
LABELS = torch.tensor([0, 1, 1, 0])


@pytest.fixture()
def known(helpers):
    images = helpers.constant_images(COLOURS)
    v = torch.zeros(3, 4, 4)
    v[2] = 0.3
    return helpers.ChannelMeanModel(), images, v


def test_targeted_success_counts_only_the_target(known):
    model, images, v = known
    to_blue = evaluate_perturbation(model, images, LABELS, v, targeted=2)
    assert to_blue["targeted_success"] == pytest.approx(3 / 4)
    assert to_blue["clean_target_share"] == pytest.approx(1 / 4)
    assert to_blue["fooling_rate"] == pytest.approx(2 / 4)
    # the same changes are failures for target 1: nothing ends up predicted 1
    to_green = evaluate_perturbation(model, images, LABELS, v, targeted=1)
    assert to_green["targeted_success"] == 0.0
    assert to_green["clean_target_share"] == pytest.approx(1 / 4)
    assert to_green["targeted_ci_low"] == 0.0 and 0 < to_green["targeted_ci_high"] < 1


def test_metrics_of_a_known_case(known):
    model, images, v = known
    res = evaluate_perturbation(model, images, LABELS, v, class_names=["r", "g", "b"])
    json.dumps(res)
    assert res["num_images"] == 4
    assert res["confusion"] == [[1, 0, 1], [0, 0, 1], [0, 0, 1]]  # rows clean, columns x+v
    assert res["clean_accuracy"] == pytest.approx(3 / 4)  # images 0, 1 and 3 are right
    assert res["perturbed_accuracy"] == pytest.approx(1 / 4)  # image 0 only
    # per true class: class 0 = images 0, 3 (one fooled); class 1 = images 1, 2 (one fooled)
    assert res["per_class"] == {"r": 0.5, "g": 0.5, "b": None}
    assert res["targeted_success"] is None and res["clean_target_share"] is None
    assert res["ci_method"] == "wilson"
    assert res["fooling_ci_low"] < 0.5 < res["fooling_ci_high"]
    assert (res["fooling_ci_low"], res["fooling_ci_high"]) == pytest.approx(rate_ci(2, 4))
    no_labels = evaluate_perturbation(model, images, None, v)
    assert no_labels["clean_accuracy"] is None and no_labels["per_class"] is None
    assert no_labels["fooling_rate"] == res["fooling_rate"]


def test_fooling_is_measured_against_the_clean_prediction_not_the_label(helpers):
    model = helpers.ConstantModel()  # always predicts 0, whatever the input
    images = torch.rand(20, 3, 4, 4)
    labels = torch.ones(20, dtype=torch.long)  # always wrong
    res = evaluate_perturbation(model, images, labels, torch.full((3, 4, 4), 0.5))
    assert res["clean_accuracy"] == 0.0 and res["perturbed_accuracy"] == 0.0
    assert res["fooling_rate"] == 0.0
    assert res["fooling_ci_low"] == 0.0 and res["fooling_ci_high"] < 0.2


def test_inputs_are_clipped_to_the_pixel_range(helpers):
    # clean (0.9, 0.8, 0) is class 0; the outcome on x+v depends on whether x+v is cut at 1
    model = helpers.ChannelMeanModel()
    images = helpers.constant_images([(0.9, 0.8, 0.0)])
    v = torch.zeros(3, 4, 4)
    v[0], v[1] = 0.05, 0.5  # unclipped: (0.95, 1.3) -> class 1; clipped: (0.95, 1.0) -> class 1
    assert evaluate_perturbation(model, images, None, v)["fooling_rate"] == 1.0
    v[0] = 0.2  # unclipped: (1.1, 1.3) -> class 1; clipped: (1.0, 1.0) -> tie -> argmax 0
    assert evaluate_perturbation(model, images, None, v)["fooling_rate"] == 0.0


def test_wilson_interval():
    low, high = rate_ci(5, 10)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)
    assert rate_ci(0, 10)[0] == 0.0 and rate_ci(10, 10)[1] == 1.0


def test_transfer_matrix(helpers, known):
    model, images, v = known
    models = {"mean": model, "constant": helpers.ConstantModel()}
    table = transfer_matrix(models, {"mean": v, "none": torch.zeros(3, 4, 4)}, images)
    assert list(table.index) == ["mean", "none"] and list(table.columns) == ["mean", "constant"]
    assert table.index.name == "uap_from" and table.columns.name == "evaluated_on"
    np.testing.assert_allclose(table.to_numpy(), [[0.5, 0.0], [0.0, 0.0]])
    with pytest.raises(ConfigError, match="at least one model and one UAP"):
        transfer_matrix({}, {"a": v}, images)


def test_evaluate_rejects_bad_input(known):
    model, images, v = known
    with pytest.raises(DataError, match=r"perturbation has shape \(3, 8, 8\)"):
        evaluate_perturbation(model, images, LABELS, torch.zeros(3, 8, 8))
    with pytest.raises(DataError, match="labels has 3 entries but there are 4 images"):
        evaluate_perturbation(model, images, LABELS[:3], v)
    with pytest.raises(DataError, match=r"labels must be integer class indices in \[0, 2\]"):
        evaluate_perturbation(model, images, torch.tensor([0, 1, 5, 0]), v)
    with pytest.raises(ConfigError, match="class_names has 2 names but the model outputs 3"):
        evaluate_perturbation(model, images, LABELS, v, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="'targeted' parameter of evaluate_perturbation"):
        evaluate_perturbation(model, images, LABELS, v, targeted=7)
    with pytest.raises(ConfigError, match="'batch_size' parameter of evaluate_perturbation"):
        evaluate_perturbation(model, images, LABELS, v, batch_size=0)


def test_mcnemar_exact_on_a_known_table():
    # 2x2 table of (UAP fooled, random fooled): 5 both, 7 UAP only, 2 random only, 6 neither
    a = torch.tensor([1] * 5 + [1] * 7 + [0] * 2 + [0] * 6, dtype=torch.bool)
    b = torch.tensor([1] * 5 + [0] * 7 + [1] * 2 + [0] * 6, dtype=torch.bool)
    res = mcnemar_test(a, b)
    assert (res["only_a"], res["only_b"]) == (7, 2)
    # two-sided exact: 2·P(X >= 7), X ~ Bin(9, 1/2) = 2·(36 + 9 + 1)/512
    assert res["p_value"] == pytest.approx(92 / 512, rel=1e-12)
    from scipy.stats import binomtest

    assert res["p_value"] == binomtest(7, 9, 0.5).pvalue
    assert mcnemar_test(b, a)["p_value"] == res["p_value"]
    assert mcnemar_test(a, a) == {"p_value": 1.0, "only_a": 0, "only_b": 0}  # no discordant pair
    with pytest.raises(DataError, match="paired outcomes of equal length"):
        mcnemar_test(a, b[:3])


def test_targeted_transfer_matrix(known):
    model, images, v = known
    table = transfer_matrix({"mean": model}, {"mean": v}, images, targeted=2)
    assert table.loc["mean", "mean"] == pytest.approx(3 / 4)  # as targeted_success above
