"""GenomeRecord keeps the stored keys; best_record, history_entry and cache_value."""

from __future__ import annotations

import dataclasses
import json

import pytest
from deft_fakes import HEAD_PARAMS, TOTAL_PARAMS, UNIT_PARAMS, AdditiveFitness

from medtune.deft import DEFTSearch, Evaluation, GenomeRecord, search_result_to_dict
from medtune.deft._records import best_record, cache_value, history_entry

# The keys a search's ``evaluations`` have always been stored with, in this order.
STORED_KEYS = ["generation", "genome_idx", "mask", "repaired_from", "key", "source", "feasible", "reason",
               "trainable_params", "trainable_fraction", "fitness", "score", "seconds", "info"]


def make_record(**changes) -> GenomeRecord:
    record = GenomeRecord(generation=1, genome_idx=2, mask=(1, 0, 1), repaired_from=(1, 1, 1), key="k",
                          source="trained", feasible=True, reason=None, trainable_params=55,
                          trainable_fraction=55 / 155, fitness=0.75, score=0.75, seconds=1.5,
                          info={"run_id": "r"})
    return dataclasses.replace(record, **changes)


def test_genome_record_to_dict_has_the_stored_keys_and_round_trips():
    record = make_record()
    data = record.to_dict()
    assert list(data) == STORED_KEYS
    assert data["mask"] == [1, 0, 1] and data["repaired_from"] == [1, 1, 1]
    assert GenomeRecord.from_dict(data) == record
    assert GenomeRecord.from_dict(json.loads(json.dumps(data))) == record
    assert record.genome == (1, 1, 1) and make_record(repaired_from=None).genome == (1, 0, 1)
    not_trained = make_record(source="not_trained", feasible=False, reason="max_trainable_params",
                              fitness=None, score=-1.5, seconds=None, info={}, repaired_from=None)
    assert not_trained.to_dict()["repaired_from"] is None
    assert GenomeRecord.from_dict(not_trained.to_dict()) == not_trained
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.score = 0.0  # type: ignore[misc]


def test_genome_record_reads_older_in_memory_records():
    old = {**make_record().to_dict(), "genome": [1, 1, 1], "order": 7, "evaluated_params": 55}
    assert GenomeRecord.from_dict(old) == make_record()


def test_a_fitted_search_keeps_the_stored_keys():
    search = DEFTSearch(num_units=7, evaluator=AdditiveFitness(), unit_params=UNIT_PARAMS,
                        head_params=HEAD_PARAMS, total_params=TOTAL_PARAMS, max_trainable_params=0.5,
                        infeasible="repair", popsize=6, generations=2, seed=0).fit()
    assert all(list(r) == STORED_KEYS for r in search.evaluations_)
    stored = json.loads(json.dumps(search_result_to_dict(search)))
    assert [list(r) for r in stored["evaluations"]] == [STORED_KEYS] * len(search.evaluations_)
    assert [GenomeRecord.from_dict(r).to_dict() for r in stored["evaluations"]] == stored["evaluations"]


def test_best_record_prefers_feasible_then_score_then_fewer_params_then_first():
    a = make_record(genome_idx=0, score=0.5, trainable_params=60)
    b = make_record(genome_idx=1, score=0.7, trainable_params=90)
    c = make_record(genome_idx=2, score=0.7, trainable_params=70)
    d = make_record(genome_idx=3, score=0.7, trainable_params=70)
    bad = make_record(genome_idx=4, score=-1.1, feasible=False)
    worse = make_record(genome_idx=5, score=-1.4, feasible=False)
    assert best_record([a, b, c, d, bad], feasible_only=True) is c
    assert best_record([a, b, c, d, bad], feasible_only=False) is c
    assert best_record([worse, bad], feasible_only=False) is bad
    assert best_record([worse, bad], feasible_only=True) is None
    assert best_record([], feasible_only=False) is None


def test_history_entry_counts_a_generation():
    records = [make_record(source="trained"), make_record(source="cache"), make_record(source="duplicate"),
               make_record(source="not_trained", feasible=False), make_record(source="trained", feasible=False)]
    best = make_record(mask=(0, 1, 1), score=0.9, trainable_fraction=0.25)
    assert history_entry(3, records, best=best, mean_fitness=0.4) == {
        "generation": 3, "num_evaluations": 5, "num_trainings": 2, "num_cache_hits": 1, "num_duplicates": 1,
        "num_infeasible": 2, "best_fitness": 0.9, "best_feasible": True, "mean_fitness": 0.4,
        "best_mask": [0, 1, 1], "trainable_fraction": 0.25,
    }
    assert list(history_entry(0, records, best=best, mean_fitness=0.4)) == [
        "generation", "num_evaluations", "num_trainings", "num_cache_hits", "num_duplicates", "num_infeasible",
        "best_fitness", "best_feasible", "mean_fitness", "best_mask", "trainable_fraction"]


def test_cache_value_is_the_genomes_table_value():
    evaluation = Evaluation(fitness=0.8, trainable_params=55, seconds=2.0, info={"val": {"auc": 0.8}})
    value = cache_value((1, 0, 1), {"epochs": 1}, "ctx", evaluation)
    assert value == {"mask": [1, 0, 1], "fidelity": {"epochs": 1}, "context": "ctx", "fitness": 0.8,
                     "trainable_params": 55, "seconds": 2.0, "info": {"val": {"auc": 0.8}}}
    assert Evaluation.from_dict(value) == evaluation
