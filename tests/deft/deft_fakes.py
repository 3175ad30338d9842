"""Fake DEFT evaluators: cheap, deterministic stand-ins for a low-fidelity training run.

Module-level classes so they pickle (process pools) and import in a subprocess (kill test).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence

from medtune.deft import Evaluation

UNIT_PARAMS = (100, 200, 400, 800, 1600, 3200, 6400)
HEAD_PARAMS = 50
TOTAL_PARAMS = HEAD_PARAMS + sum(UNIT_PARAMS)


def count_params(mask: Sequence[int], unit_params=UNIT_PARAMS, head_params=HEAD_PARAMS) -> int:
    return head_params + sum(p for bit, p in zip(mask, unit_params, strict=True) if bit)


class TargetFitness:
    """fitness = share of bits that agree with a hidden target mask; records every call."""

    def __init__(self, target: Sequence[int], seconds_per_unit: float = 0.0):
        self.target = tuple(target)
        self.seconds_per_unit = seconds_per_unit
        self.calls: list[tuple[int, ...]] = []  # list.append is atomic: thread pools are fine

    def __call__(self, mask):
        self.calls.append(tuple(mask))
        agree = sum(a == b for a, b in zip(mask, self.target, strict=True))
        unit_params = (100,) * len(self.target)
        return Evaluation(fitness=agree / len(self.target),
                          trainable_params=count_params(mask, unit_params),
                          seconds=self.seconds_per_unit * sum(mask), info={"agree": agree})


class AdditiveFitness:
    """An additive score with one interaction term, in [0, 1] (7 units, UNIT_PARAMS).

    Deeper units (higher index) help more; units 1 and 4 only help together (interaction) and
    unit 2 hurts.
    """

    WEIGHTS = (0.02, -0.03, -0.08, 0.04, -0.02, 0.09, 0.12)
    INTERACTION = ((1, 4), 0.15)

    def __init__(self, seconds_per_param: float = 0.0):
        self.seconds_per_param = seconds_per_param
        self.calls: list[tuple[int, ...]] = []  # list.append is atomic: thread pools are fine

    @classmethod
    def score(cls, mask) -> float:
        (i, j), bonus = cls.INTERACTION
        additive = sum(w * b for w, b in zip(cls.WEIGHTS, mask, strict=True))
        value = 0.5 + additive + bonus * mask[i] * mask[j]
        return round(value, 10)

    def __call__(self, mask):
        self.calls.append(tuple(mask))
        params = count_params(mask)
        return Evaluation(fitness=self.score(mask), trainable_params=params,
                          seconds=self.seconds_per_param * params, info={})


def brute_force_best(score, num_units, feasible=lambda mask: True):
    """Return (best score, masks reaching it) over every feasible mask."""
    masks = [m for m in itertools.product((0, 1), repeat=num_units) if feasible(m)]
    best = max(score(m) for m in masks)
    return best, [m for m in masks if score(m) == best]


class SlowLoggingFitness:
    """AdditiveFitness that marks its start, sleeps, then appends the mask to a side file.

    ``side_file`` gets one line per finished training; ``side_file + ".started"`` one line per
    started training, so a test can kill the process while a training is surely in its sleep.
    """

    def __init__(self, side_file: str, sleep_s: float):
        self.side_file = side_file
        self.sleep_s = sleep_s

    def __call__(self, mask):
        with open(self.side_file + ".started", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(list(mask)) + "\n")
        time.sleep(self.sleep_s)
        with open(self.side_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(list(mask)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return Evaluation(fitness=AdditiveFitness.score(mask), trainable_params=count_params(mask),
                          seconds=0.0, info={})
