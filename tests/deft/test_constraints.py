"""The pure DEFT constraint functions: budget, repair, penalties, judging an evaluation."""

from __future__ import annotations

import math

import pytest

from medtune.deft._constraints import (
    budget_from_setting,
    check_mask,
    count_trainable,
    infeasible_score,
    judge_evaluation,
    repair_mask,
    resolve_budget,
)
from medtune.errors import ConfigError, MedtuneError

UNITS = (10, 20, 40, 80)


def test_count_trainable_adds_the_head_and_the_selected_units():
    assert count_trainable((0, 0, 0, 0), UNITS, 5) == 5
    assert count_trainable((1, 0, 1, 0), UNITS, 5) == 5 + 10 + 40
    assert count_trainable((1, 1, 1, 1), UNITS, 5) == 155


def test_check_mask_returns_a_tuple_of_ints_or_raises():
    assert check_mask([1, 0, True, 0], 4) == (1, 0, 1, 0)
    with pytest.raises(ConfigError, match=r"must be 4 values of 0 or 1 .* Got \[1, 0\] instead"):
        check_mask((1, 0), 4)
    with pytest.raises(ConfigError, match="must be 4 values of 0 or 1"):
        check_mask((1, 0, 2, 0), 4)


def test_resolve_budget_absolute_fraction_and_none():
    assert resolve_budget(None, total_params=155, head_params=5) is None
    assert resolve_budget(100, total_params=155, head_params=5) == 100
    assert resolve_budget(5, total_params=155, head_params=5) == 5  # the head alone is enough
    assert resolve_budget(0.5, total_params=155, head_params=5) == 77  # floor(77.5)
    assert resolve_budget(1.0, total_params=155, head_params=5) == 155
    assert resolve_budget(0.25, total_params=12750, head_params=50) == 3187  # floor(3187.5)


@pytest.mark.parametrize(
    "value, message",
    [
        (4, r"resolves to 4 parameters, fewer than the head alone \(5\).* at least 5 \(0.03226 of"),
        (0.01, "resolves to 1 parameters, fewer than the head alone"),
        (1.5, r"float in \(0, 1\]. Got 1.5 instead. A float is a fraction of total_params"),
        (0.0, r"float in \(0, 1\]. Got 0.0 instead"),
        (float("nan"), r"float in \(0, 1\]. Got nan instead"),
        ("half", r"an int \(absolute\), a float in \(0, 1\] \(fraction of total_params\) or None"),
        (True, "Got True instead"),
    ],
)
def test_resolve_budget_rejects(value, message):
    with pytest.raises(ConfigError, match=f"'max_trainable_params' parameter of DEFTSearch .*{message}"):
        resolve_budget(value, total_params=155, head_params=5)


def test_budget_from_setting_maps_the_config_convention():
    assert budget_from_setting(0.0) is None and budget_from_setting(0) is None
    assert budget_from_setting(0.6) == 0.6 and isinstance(budget_from_setting(0.6), float)
    assert budget_from_setting(1.0) == 1.0 and isinstance(budget_from_setting(1.0), float)
    assert budget_from_setting(3000.0) == 3000 and isinstance(budget_from_setting(3000.0), int)
    assert budget_from_setting(2.9) == 2  # an absolute count is truncated


def test_repair_drops_the_largest_units_first_ties_nearest_the_input():
    assert repair_mask((1, 1, 1, 1), UNITS, 5, None) == (1, 1, 1, 1)
    assert repair_mask((1, 1, 1, 1), UNITS, 5, 155) == (1, 1, 1, 1)  # fits already
    assert repair_mask((1, 1, 1, 1), UNITS, 5, 154) == (1, 1, 1, 0)
    assert repair_mask((1, 1, 1, 1), UNITS, 5, 40) == (1, 1, 0, 0)  # 80, then 40 go: 35 fits
    assert repair_mask((1, 1, 1, 1), UNITS, 5, 5) == (0, 0, 0, 0)
    assert repair_mask((1, 1, 1), (10, 10, 10), 1, 21) == (0, 1, 1)
    assert repair_mask((1, 0, 1), (10, 10, 10), 0, -1) == (0, 0, 0)  # even the head breaks it
    assert isinstance(repair_mask([1, 0, 0, 0], UNITS, 5, None), tuple)


def test_infeasible_score_is_minus_one_minus_the_relative_excess():
    assert infeasible_score(3000, 2000) == -1.5
    assert infeasible_score(2001, 2000) == -1 - 1 / 2000
    assert infeasible_score(6.0, 4.0) == -1.5
    assert infeasible_score(0.75, 0.5) == -1.5  # a limit below 1 is not rounded up
    assert infeasible_score(30, 0) == -31.0  # a zero budget divides by 1
    assert infeasible_score(4.0, 4.0) == -1.0


def test_judge_evaluation_in_order_non_finite_slow_feasible():
    assert judge_evaluation(0.8, 3.0, max_seconds=4.0, mask=(1, 0)) == (None, 0.8)
    assert judge_evaluation(0.8, 3.0, max_seconds=None, mask=(1, 0)) == (None, 0.8)
    assert judge_evaluation(-1.0, 3.0, max_seconds=None, mask=(1, 0)) == (None, -1.0)
    assert judge_evaluation(0.8, 5.0, max_seconds=4.0, mask=(1, 0)) == ("max_seconds", -1.25)
    assert judge_evaluation(math.nan, 5.0, max_seconds=4.0, mask=(1, 0)) == ("non_finite_fitness", -2.0)
    assert judge_evaluation(-math.inf, 1.0, max_seconds=None, mask=(1, 0)) == ("non_finite_fitness", -2.0)
    # too slow wins over a fitness below -1: that genome is infeasible, not an error
    assert judge_evaluation(-3.0, 5.0, max_seconds=4.0, mask=(1, 0)) == ("max_seconds", -1.25)
    with pytest.raises(MedtuneError, match=r"fitness -3 for mask \[1, 0\]; fitness must be >= -1"):
        judge_evaluation(-3.0, 1.0, max_seconds=4.0, mask=(1, 0))
