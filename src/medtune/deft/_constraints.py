"""The DEFT constraints as pure functions: masks, the parameter budget, repair and penalties.

Fitness is "higher is better". A feasible fitness is >= :data:`PENALTY_BASE` (-1); every
penalised score is below it, ``-1 - excess / limit``, so any feasible mask beats any infeasible
one and, among infeasible masks, the smaller violation wins.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from medtune._checks import param_error
from medtune.errors import ConfigError, MedtuneError

Mask = tuple[int, ...]
"""One 0/1 per searchable unit (block or layer), input to output; the head is excluded."""

#: A feasible fitness must be >= this; every penalised score is below it.
PENALTY_BASE = -1.0
#: The violation charged to a genome whose training returned a NaN or infinite fitness.
NON_FINITE_VIOLATION = 1.0

_OWNER = "DEFTSearch"


def check_mask(mask: Sequence[int], num_units: int) -> Mask:
    """Return ``mask`` as a tuple of ints if it is ``num_units`` values of 0 or 1.

    Raises:
        ConfigError: if ``mask`` has another length or a value other than 0 or 1.
    """
    bits = tuple(mask)
    if len(bits) != num_units or any(bit not in (0, 1) for bit in bits):
        raise ConfigError(
            f"A DEFT mask must be {num_units} values of 0 or 1 (one per unit, head "
            f"excluded). Got {list(bits)!r} instead."
        )
    return tuple(int(bit) for bit in bits)


def count_trainable(mask: Sequence[int], unit_params: Sequence[int], head_params: int) -> int:
    """Return the parameters a mask trains: the head plus every selected unit.

    Example:
        >>> count_trainable((1, 0, 1), unit_params=(10, 20, 40), head_params=5)
        55
    """
    return head_params + sum(p for bit, p in zip(mask, unit_params, strict=True) if bit)


def resolve_budget(value: int | float | None, *, total_params: int, head_params: int) -> int | None:
    """Resolve ``max_trainable_params`` to an absolute parameter count.

    Args:
        value: an int is an absolute count; a float in (0, 1] a fraction of ``total_params``,
            rounded down; ``None`` means no budget.
        total_params: parameter count of the whole model.
        head_params: parameter count of the head, which always trains.

    Returns:
        The budget in parameters, ``>= head_params``, or ``None``.

    Raises:
        ConfigError: if ``value`` is neither an int, a float in (0, 1] nor ``None``, or the
            budget is smaller than the head alone.

    Example:
        >>> resolve_budget(0.5, total_params=155, head_params=5)
        77
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise param_error("max_trainable_params", _OWNER,
                          "an int (absolute), a float in (0, 1] (fraction of total_params) or None", value)
    if isinstance(value, numbers.Integral):
        budget = int(value)
    else:
        if not (math.isfinite(value) and 0 < value <= 1):
            raise param_error("max_trainable_params", _OWNER, "a float in (0, 1]", value,
                              " A float is a fraction of total_params; pass an int for an absolute count.")
        budget = int(math.floor(float(value) * total_params))
    if budget < head_params:
        raise ConfigError(
            f"The 'max_trainable_params' parameter of DEFTSearch resolves to {budget} "
            f"parameters, fewer than the head alone ({head_params}), so no mask is "
            f"feasible. Raise it to at least {head_params} "
            f"({head_params / total_params:.4g} of total_params)."
        )
    return budget


def budget_from_setting(value: float) -> int | float | None:
    """Turn a config's ``max_trainable_params`` (0 = none) into :func:`resolve_budget`'s form.

    A value above 1 is an absolute count and becomes an int; a value in (0, 1] stays as given
    (a float there is a fraction of the model); 0 becomes ``None``.

    Example:
        >>> budget_from_setting(3000.0), budget_from_setting(0.5), budget_from_setting(0.0)
        (3000, 0.5, None)
    """
    budget = value or None
    if budget is not None and budget > 1:
        budget = int(budget)
    return budget


def repair_mask(mask: Sequence[int], unit_params: Sequence[int], head_params: int,
                budget: int | None) -> Mask:
    """Drop the largest selected units (ties: the one nearest the input) until ``budget`` holds.

    Args:
        mask: one 0/1 per unit.
        unit_params: parameter count of each unit, input to output.
        head_params: parameter count of the head.
        budget: the absolute parameter budget (:func:`resolve_budget`), or ``None``.

    Returns:
        The repaired mask; ``mask`` itself (as a tuple) if it already fits or there is no
        budget. If even the head breaks the budget, the all-zeros mask. Deterministic.

    Example:
        >>> repair_mask((1, 1, 1), unit_params=(10, 20, 40), head_params=5, budget=40)
        (1, 1, 0)
    """
    repaired = list(mask)
    if budget is None:
        return tuple(repaired)
    while any(repaired) and count_trainable(repaired, unit_params, head_params) > budget:
        selected = [i for i, bit in enumerate(repaired) if bit]
        drop_idx = max(selected, key=lambda i: (unit_params[i], -i))
        repaired[drop_idx] = 0
    return tuple(repaired)


def feasible_top_k_masks(unit_params: Sequence[int], head_params: int, budget: int | None) -> list[Mask]:
    """Return the top-k masks (the last k units train, k = 0 … num_units) within ``budget``.

    k = 0 is the head alone (the linear probe's mask); k = num_units trains every unit. These
    seed DEFT's initial population, so the search never returns a mask worse on validation than
    the best feasible top-k.

    Example:
        >>> feasible_top_k_masks((10, 20, 40), head_params=5, budget=50)
        [(0, 0, 0), (0, 0, 1)]
    """
    num_units = len(unit_params)
    masks = [tuple([0] * (num_units - k) + [1] * k) for k in range(num_units + 1)]
    return [m for m in masks if budget is None or count_trainable(m, unit_params, head_params) <= budget]


def infeasible_score(value: float, limit: float) -> float:
    """Return the score of a mask whose ``value`` breaks ``limit``: ``-1 - (value - limit) / limit``.

    A ``limit`` of 0 (a zero parameter budget) divides by 1 instead. The result is below -1
    for any ``value > limit``.

    Example:
        >>> infeasible_score(3000, 2000), infeasible_score(6.0, 4.0)
        (-1.5, -1.5)
    """
    return PENALTY_BASE - (value - limit) / (limit or 1)


def judge_evaluation(fitness: float, seconds: float, *, max_seconds: float | None,
                     mask: Sequence[int]) -> tuple[str | None, float]:
    """Return ``(reason, score)`` of a trained mask; ``reason`` is ``None`` when it is feasible.

    In this order: a NaN or infinite ``fitness`` is infeasible (``non_finite_fitness``, score
    -2); ``seconds > max_seconds`` is infeasible (``max_seconds``, :func:`infeasible_score`);
    otherwise the score is the fitness itself.

    Args:
        fitness: the raw validation metric.
        seconds: the training time in seconds.
        max_seconds: the time budget in seconds, or ``None``.
        mask: the trained mask, only for the error message.

    Raises:
        MedtuneError: if a feasible ``fitness`` is below -1, where the penalties live.

    Example:
        >>> judge_evaluation(0.8, 5.0, max_seconds=4.0, mask=(1, 0))
        ('max_seconds', -1.25)
    """
    if not math.isfinite(fitness):
        return "non_finite_fitness", PENALTY_BASE - NON_FINITE_VIOLATION
    if max_seconds is not None and seconds > max_seconds:
        return "max_seconds", infeasible_score(seconds, max_seconds)
    if fitness < PENALTY_BASE:
        raise MedtuneError(
            f"The DEFT evaluator returned fitness {fitness:.4g} for mask {list(mask)}; "
            "fitness must be >= -1 because penalised masks score below -1. Use a metric in "
            "[0, 1] (AUC, accuracy) or rescale it."
        )
    return None, fitness
