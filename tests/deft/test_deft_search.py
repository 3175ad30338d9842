"""DEFTSearch with fake evaluators: optimum, determinism, history, constraints, errors."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from deft_fakes import (
    HEAD_PARAMS,
    TOTAL_PARAMS,
    UNIT_PARAMS,
    AdditiveFitness,
    TargetFitness,
    brute_force_best,
    count_params,
)

from medtune.errors import ConfigError, MedtuneError, NotFittedError
from medtune.deft import DEFTSearch, Evaluation, search_result_to_dict


def additive_search(evaluator=None, **kwargs) -> DEFTSearch:
    params = dict(num_units=7, evaluator=evaluator or AdditiveFitness(), unit_params=UNIT_PARAMS,
                  head_params=HEAD_PARAMS, total_params=TOTAL_PARAMS, popsize=10, generations=12,
                  seed=0)
    params.update(kwargs)
    return DEFTSearch(**params)


def test_finds_hidden_target_mask():
    target = (1, 0, 1, 1, 0, 0, 1, 0)
    evaluator = TargetFitness(target)
    # an all-random initial population: this is the DE search itself at work
    search = DEFTSearch(num_units=8, evaluator=evaluator, unit_params=[100] * 8, head_params=50,
                        total_params=850, popsize=16, generations=15, seed=0, seed_top_k=False).fit()
    assert search.best_mask_ == target
    assert search.best_fitness_ == 1.0
    assert search.best_evaluation_.info == {"agree": 8}
    assert search.best_evaluation_.trainable_params == count_params(target, (100,) * 8)
    # it searched rather than enumerated: fewer trainings than the 256 masks
    assert search.num_trainings_ == len(evaluator.calls) < 2**8


@pytest.mark.parametrize("infeasible", ["penalty", "repair"])
@pytest.mark.parametrize("budget", [None, 0.5, 3000])
def test_finds_known_optimum_of_additive_score_with_interaction(budget, infeasible):
    search = additive_search(max_trainable_params=budget, infeasible=infeasible).fit()
    limit = search.max_trainable_params_
    best, best_masks = brute_force_best(AdditiveFitness.score, 7,
                                        lambda m: limit is None or count_params(m) <= limit)
    assert search.best_fitness_ == pytest.approx(best)
    assert search.best_mask_ in best_masks
    assert search.best_mask_[1] == search.best_mask_[4] == 1  # the interaction was found


def test_same_seed_same_search_different_seed_differs():
    first = additive_search(seed=3).fit()
    again = additive_search(seed=3).fit()
    other = additive_search(seed=4).fit()
    assert again.best_mask_ == first.best_mask_
    assert again.history_ == first.history_
    assert [r["mask"] for r in again.evaluations_] == [r["mask"] for r in first.evaluations_]
    assert [r["mask"] for r in other.evaluations_] != [r["mask"] for r in first.evaluations_]


def test_history_is_recorded_per_generation():
    search = additive_search(popsize=7, generations=6, seed=1, seed_top_k=False).fit()
    history = search.history_
    assert [h["generation"] for h in history] == list(range(len(history)))
    assert len(history) == search.scipy_result_["nit"] + 1
    # popsize is the total population, not scipy's per-parameter multiplier (7 units x 7 = 49)
    assert all(h["num_evaluations"] == 7 for h in history)
    assert len(search.evaluations_) == 7 * len(history)
    assert sum(h["num_trainings"] for h in history) == search.num_trainings_
    for h in history:
        assert h["num_trainings"] + h["num_cache_hits"] + h["num_duplicates"] == 7
        assert h["mean_fitness"] <= h["best_fitness"]
        assert h["trainable_fraction"] == pytest.approx(count_params(h["best_mask"]) / TOTAL_PARAMS)
    bests = [h["best_fitness"] for h in history]
    assert bests == sorted(bests)  # DE is elitist
    assert history[-1]["best_fitness"] == search.best_fitness_
    gen0 = [r["score"] for r in search.evaluations_ if r["generation"] == 0]
    assert history[0]["mean_fitness"] == pytest.approx(sum(gen0) / len(gen0))
    assert history[0]["num_cache_hits"] == 0


def test_callback_can_stop_the_search():
    seen = []

    def stop_after_two(entry):
        seen.append(entry["generation"])
        return entry["generation"] == 2

    search = additive_search(callback=stop_after_two).fit()
    assert seen == [0, 1, 2]
    assert len(search.history_) == 3 and search.stopped_by_callback_

    search = additive_search(callback=lambda entry: True).fit()
    assert len(search.history_) == 1 and search.stopped_by_callback_
    assert {r["generation"] for r in search.evaluations_} == {0}


@pytest.mark.parametrize("budget", [0.25, 2000])
def test_parameter_budget_penalty_never_trains_infeasible_masks(budget):
    evaluator = AdditiveFitness()
    search = additive_search(evaluator, max_trainable_params=budget).fit()
    limit = search.max_trainable_params_
    assert limit == (int(0.25 * TOTAL_PARAMS) if isinstance(budget, float) else budget)
    assert all(count_params(mask) <= limit for mask in evaluator.calls)
    over = [r for r in search.evaluations_ if r["trainable_params"] > limit]
    assert over, "the budget should bind for this test to mean anything"
    for record in search.evaluations_:
        assert record["feasible"] == (record["trainable_params"] <= limit)
    for record in over:
        assert record["source"] == "not_trained" and record["reason"] == "max_trainable_params"
        assert record["fitness"] is None
        assert record["score"] == pytest.approx(-1 - (record["trainable_params"] - limit) / limit)
    assert count_params(search.best_mask_) <= limit


def test_repair_drops_largest_units_and_trains_only_feasible_masks():
    evaluator = AdditiveFitness()
    search = additive_search(evaluator, max_trainable_params=2000, infeasible="repair").fit()
    assert all(count_params(mask) <= 2000 for mask in evaluator.calls)
    assert all(r["feasible"] for r in search.evaluations_)
    repaired = [r for r in search.evaluations_ if r["repaired_from"] is not None]
    assert repaired
    for record in repaired:
        assert record["mask"] == list(search.repair(record["repaired_from"]))
    # largest first: 6400 and 1600 go, 800 + 400 + 200 + 100 + 50 fits
    assert search.repair((1, 1, 1, 1, 1, 0, 1)) == (1, 1, 1, 1, 0, 0, 0)
    # ties go to the unit nearest the input
    tied = DEFTSearch(num_units=3, evaluator=AdditiveFitness(), unit_params=[10, 10, 10],
                      head_params=1, total_params=31, max_trainable_params=21)
    assert tied.repair((1, 1, 1)) == (0, 1, 1)


def test_time_budget_marks_slow_trainings_infeasible():
    evaluator = AdditiveFitness(seconds_per_param=0.001)  # head + units: 0.05 s ... 12.75 s
    search = additive_search(evaluator, max_seconds=4.0).fit()
    slow = [r for r in search.evaluations_ if r["seconds"] is not None and r["seconds"] > 4.0]
    assert slow and all(r["source"] != "not_trained" for r in slow)  # trained, then judged
    for record in slow:
        assert not record["feasible"] and record["reason"] == "max_seconds"
        assert record["score"] == pytest.approx(-1 - (record["seconds"] - 4.0) / 4.0)
    assert search.best_evaluation_.seconds <= 4.0
    best, _ = brute_force_best(AdditiveFitness.score, 7, lambda m: count_params(m) * 0.001 <= 4.0)
    assert search.best_fitness_ == pytest.approx(best)


def test_head_only_fallback_when_no_evaluated_mask_is_feasible():
    # only the all-zeros mask fits a head-only budget; stop after the initial population
    search = additive_search(max_trainable_params=HEAD_PARAMS, callback=lambda entry: True,
                             popsize=5, seed=1, seed_top_k=False)
    with pytest.warns(UserWarning, match="returning the head-only mask"):
        search.fit()
    assert [r["source"] for r in search.evaluations_] == ["not_trained"] * 5 + ["trained"]
    assert search.fallback_used_
    assert search.best_mask_ == (0,) * 7
    assert search.best_fitness_ == AdditiveFitness.score((0,) * 7)
    assert search.evaluations_[-1]["generation"] is None


def test_no_feasible_mask_at_all_raises():
    evaluator = AdditiveFitness(seconds_per_param=1.0)  # even the head takes 50 s
    with pytest.raises(MedtuneError, match="no feasible mask.*Loosen 'max_seconds'"):
        additive_search(evaluator, max_seconds=10.0, popsize=5, generations=1).fit()


def test_non_finite_fitness_is_infeasible_and_result_is_json():
    def diverging(mask):
        fitness = float("nan") if mask[6] else AdditiveFitness.score(mask)
        return Evaluation(fitness=fitness, trainable_params=count_params(mask), seconds=0.1,
                          info={"run_id": "r" + "".join(map(str, mask))})

    search = additive_search(diverging, generations=4).fit()
    nan_records = [r for r in search.evaluations_ if r["fitness"] is not None
                   and math.isnan(r["fitness"])]
    assert nan_records
    assert all(not r["feasible"] and r["reason"] == "non_finite_fitness" and r["score"] == -2.0
               for r in nan_records)
    assert search.best_mask_[6] == 0
    result = json.loads(json.dumps(search_result_to_dict(search), allow_nan=False))
    assert result["best_mask"] == list(search.best_mask_)
    assert result["best_evaluation"]["info"]["run_id"] == "r" + "".join(map(str, search.best_mask_))
    assert result["num_trainings"] == search.num_trainings_
    assert result["params"]["popsize"] == 10 and len(result["history"]) == len(search.history_)
    assert {"genome", "order"}.isdisjoint(result["evaluations"][0])


def test_search_result_to_dict_needs_a_fitted_search():
    with pytest.raises(NotFittedError, match="call search.fit"):
        search_result_to_dict(additive_search())


def test_thread_pool_map_gives_the_builtin_map_result():
    serial = additive_search(max_trainable_params=0.5, seed=2).fit()
    with ThreadPoolExecutor(max_workers=3) as pool:
        parallel = additive_search(max_trainable_params=0.5, seed=2, map_fn=pool.map).fit()
    assert parallel.best_mask_ == serial.best_mask_
    assert parallel.history_ == serial.history_
    assert parallel.num_trainings_ == serial.num_trainings_
    assert [r["key"] for r in parallel.evaluations_] == [r["key"] for r in serial.evaluations_]


def test_map_fn_receives_only_masks_to_train():
    batches = []

    def recording_map(func, masks):
        masks = list(masks)
        batches.append(masks)
        return map(func, masks)

    search = additive_search(max_trainable_params=3000, map_fn=recording_map).fit()
    flat = [mask for batch in batches for mask in batch]
    assert len(flat) == len(set(flat)) == search.num_trainings_
    assert all(count_params(mask) <= 3000 for mask in flat)


def test_bad_evaluator_outputs_raise():
    with pytest.raises(MedtuneError, match="must return an Evaluation"):
        additive_search(lambda mask: 0.5).fit()
    with pytest.raises(MedtuneError, match="fitness must be >= -1"):
        additive_search(lambda mask: Evaluation(-3.0, count_params(mask), 0.0)).fit()
    with pytest.raises(MedtuneError, match="map_fn returned 1 results"):
        additive_search(map_fn=lambda func, masks: [func(next(iter(masks)))]).fit()


def test_param_count_mismatch_warns():
    with pytest.warns(UserWarning, match="reports 1 trainable parameters"):
        additive_search(lambda mask: Evaluation(0.5, 1, 0.0), generations=0).fit()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_units": 0}, "'num_units' parameter of DEFTSearch must be >= 1. Got 0 instead"),
        ({"evaluator": "train"}, "'evaluator' parameter .* must be callable"),
        ({"unit_params": [1, 2]}, "'unit_params' .* sequence of 7 ints"),
        ({"unit_params": [1, 2, 3, 4, 5, 6, -7]}, "'unit_params' .* >= 0. Got -7"),
        ({"head_params": 1.5}, "'head_params' .* of type Integral. Got 1.5"),
        ({"total_params": 100}, "'total_params' .* It must count at least the head"),
        ({"max_trainable_params": 10}, "resolves to 10 parameters, fewer than the head alone"),
        ({"max_trainable_params": 1.5}, r"'max_trainable_params' .* float in \(0, 1\]"),
        ({"max_trainable_params": "half"}, "'max_trainable_params' .* an int \\(absolute\\)"),
        ({"max_seconds": 0}, "'max_seconds' .* > 0.0. Got 0 instead"),
        ({"max_seconds": float("inf")}, "'max_seconds' .* a finite number. Got inf instead"),
        ({"max_seconds": float("nan")}, "'max_seconds' .* a finite number. Got nan instead"),
        ({"infeasible": "penalti"}, "'infeasible' .* one of penalty, repair. Got 'penalti' instead. Did you mean 'penalty'"),
        ({"popsize": 4}, "'popsize' .* int >= 5. Got 4 instead. It is the total number"),
        ({"popsize": 8.0}, "'popsize' .* of type Integral. Got 8.0"),
        ({"mutation": 2.5}, "'mutation' .* < 2.0. Got 2.5"),
        ({"mutation": (0.9, 0.5)}, "'mutation' .* pair with min < max"),
        ({"mutation": (0.1, 0.2, 0.3)}, "'mutation' .* or a \\(min, max\\) pair"),
        ({"recombination": 1.5}, "'recombination' .* <= 1.0. Got 1.5"),
        ({"generations": -1}, "'generations' .* >= 0. Got -1"),
        ({"seed": True}, "'seed' .* of type Integral. Got True"),
        ({"fidelity": ["epochs", 2]}, "'fidelity' .* must be a dict"),
        ({"fidelity": {"epochs": object()}}, "'fidelity' .* JSON-serialisable"),
        ({"context": 3}, "'context' .* must be a str"),
        ({"cache": {}}, "'cache' .* get\\(key\\) and put\\(key, value\\)"),
        ({"map_fn": 4}, "'map_fn' .* map-like callable"),
        ({"callback": "print"}, "'callback' .* must be callable"),
    ],
)
def test_invalid_arguments_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        additive_search(**overrides)


def test_evaluator_errors_propagate_unchanged_and_finished_trainings_stay_cached():
    # scipy rewrites a ValueError raised inside its workers map; the search must not let it
    from medtune.deft import InMemoryGenomeCache

    calls = []

    def failing(mask):
        calls.append(mask)
        if len(calls) == 4:
            raise ValueError("CUDA out of memory (fake)")
        return AdditiveFitness()(mask)

    cache = InMemoryGenomeCache()
    with pytest.raises(ValueError, match="CUDA out of memory"):
        additive_search(failing, cache=cache).fit()
    assert len(cache) == 3


@pytest.mark.parametrize("mask", [(1, 0), (1, 0, 2, 0, 0, 0, 0)])
def test_public_mask_helpers_check_the_mask(mask):
    search = additive_search()
    with pytest.raises(ConfigError, match="must be 7 values of 0 or 1"):
        search.count_trainable(mask)
    with pytest.raises(ConfigError, match="must be 7 values of 0 or 1"):
        search.repair(mask)


def test_numpy_scalars_are_accepted_like_python_numbers():
    import numpy as np

    plain = additive_search(max_trainable_params=0.5, seed=3, generations=2).fit()
    numpy = additive_search(unit_params=[np.int64(p) for p in UNIT_PARAMS], head_params=np.int64(HEAD_PARAMS),
                            total_params=np.int64(TOTAL_PARAMS), max_trainable_params=np.float64(0.5),
                            seed=np.int64(3), generations=np.int64(2), popsize=np.int64(10),
                            mutation=np.float64(0.8), recombination=np.float64(0.7)).fit()
    assert numpy.history_ == plain.history_ and numpy.evaluations_ == plain.evaluations_
    assert numpy.max_trainable_params_ == plain.max_trainable_params_


def test_a_top_k_optimum_is_returned_at_generation_zero():
    # a stand-in fitness whose optimum is the top-4 mask: the seeded population holds it
    target = (0, 0, 0, 0, 1, 1, 1, 1)
    evaluator = TargetFitness(target)
    search = DEFTSearch(num_units=8, evaluator=evaluator, unit_params=[100] * 8, head_params=50,
                        total_params=850, popsize=10, generations=0, seed=0).fit()
    assert search.best_mask_ == target and search.best_fitness_ == 1.0
    assert search.history_[0]["best_mask"] == list(target) and len(search.history_) == 1
    gen0 = [tuple(r["mask"]) for r in search.evaluations_ if r["generation"] == 0]
    top_k = [tuple([0] * (8 - k) + [1] * k) for k in range(9)]
    assert gen0[:9] == top_k and len(gen0) == 10  # every top-k mask (k = 0 is the probe), then LHS rows
    unseeded = DEFTSearch(num_units=8, evaluator=TargetFitness(target), unit_params=[100] * 8, head_params=50,
                          total_params=850, popsize=10, generations=0, seed=0, seed_top_k=False).fit()
    assert unseeded.best_fitness_ < 1.0, "without the seeds a random population misses it"


def test_seeded_population_holds_only_feasible_top_k_masks_and_grows_to_hold_them():
    search = additive_search(max_trainable_params=HEAD_PARAMS + 6400 + 3200, popsize=5, generations=0).fit()
    gen0 = [tuple(r["mask"]) for r in search.evaluations_ if r["generation"] == 0]
    assert gen0[:3] == [(0,) * 7, (0,) * 6 + (1,), (0,) * 5 + (1, 1)]
    assert (0,) * 4 + (1, 1, 1) not in gen0[:3] and len(gen0) == 5  # over budget: not seeded
    wide = additive_search(popsize=5, generations=0).fit()
    assert len([r for r in wide.evaluations_ if r["generation"] == 0]) == 8  # 8 top-k masks > popsize 5
    best_top_k = max(AdditiveFitness.score(tuple([0] * (7 - k) + [1] * k)) for k in range(8))
    assert wide.best_fitness_ >= best_top_k
