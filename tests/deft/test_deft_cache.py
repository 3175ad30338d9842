"""Genome caches: keys, persistence, crash tolerance, and a search that is never trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from deft_fakes import HEAD_PARAMS, TOTAL_PARAMS, UNIT_PARAMS, AdditiveFitness

from medtune.errors import ConfigError, StoreError
from medtune.deft import (
    DEFTSearch,
    Evaluation,
    GenomeCache,
    InMemoryGenomeCache,
    JsonlGenomeCache,
    genome_key,
)

SRC = Path(__file__).resolve().parents[2] / "src"
HERE = Path(__file__).resolve().parent


def additive_search(evaluator=None, **kwargs) -> DEFTSearch:
    params = dict(num_units=7, evaluator=evaluator or AdditiveFitness(), unit_params=UNIT_PARAMS,
                  head_params=HEAD_PARAMS, total_params=TOTAL_PARAMS, popsize=10, generations=12,
                  seed=0)
    params.update(kwargs)
    return DEFTSearch(**params)


def test_genome_key_depends_on_mask_fidelity_and_context_only():
    key = genome_key((1, 0, 1), {"epochs": 2, "subset": 0.5}, "data:abc|resnet18|seed0")
    assert len(key) == 64 and key == genome_key([1, 0, 1], {"subset": 0.5, "epochs": 2},
                                                "data:abc|resnet18|seed0")
    assert key != genome_key((1, 1, 1), {"epochs": 2, "subset": 0.5}, "data:abc|resnet18|seed0")
    assert key != genome_key((1, 0, 1), {"epochs": 3, "subset": 0.5}, "data:abc|resnet18|seed0")
    assert key != genome_key((1, 0, 1), {"epochs": 2, "subset": 0.5}, "data:abc|resnet18|seed1")
    assert genome_key((0, 1), None) == genome_key((0, 1), {})
    with pytest.raises(ConfigError, match="'fidelity' .* JSON-serialisable"):
        genome_key((0, 1), {"epochs": float("nan")})


@pytest.mark.parametrize("make_cache", [lambda tmp: InMemoryGenomeCache(),
                                        lambda tmp: JsonlGenomeCache(tmp / "sub" / "cache.jsonl")])
def test_caches_store_copies_and_reject_non_json(make_cache, tmp_path):
    cache = make_cache(tmp_path)
    assert isinstance(cache, GenomeCache)
    value = {"fitness": 0.5, "info": {"curve": [1, 2]}}
    assert cache.get("k") is None
    cache.put("k", value)
    value["info"]["curve"].append(3)
    got = cache.get("k")
    assert got == {"fitness": 0.5, "info": {"curve": [1, 2]}}
    got["fitness"] = 0.0
    assert cache.get("k")["fitness"] == 0.5
    cache.put("k", {"fitness": 0.7})
    assert cache.get("k") == {"fitness": 0.7} and len(cache) == 1
    with pytest.raises(StoreError, match="not JSON-serialisable.*Evaluation.info"):
        cache.put("bad", {"info": {"model": object()}})


def test_jsonl_cache_persists_and_tolerates_a_cut_short_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = JsonlGenomeCache(path)
    cache.put("a", {"fitness": 0.1})
    cache.put("b", {"fitness": 0.2})
    cache.put("a", {"fitness": 0.3})  # a later line wins
    assert JsonlGenomeCache(path).get("a") == {"fitness": 0.3}
    good_size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b'{"key": "c", "value": {"fitn')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="ends with a cut-short line"):
        reopened = JsonlGenomeCache(path)
    assert reopened.get("c") is None and reopened.get("b") == {"fitness": 0.2}
    assert path.stat().st_size == good_size  # the partial line was truncated away
    reopened.put("c", {"fitness": 0.4})
    assert JsonlGenomeCache(path).keys() == ["a", "b", "c"]


def test_jsonl_cache_rejects_corruption_before_the_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "value": {}}\nnot json\n{"key": "b", "value": {}}\n')
    with pytest.raises(StoreError, match="corrupt at line 2"):
        JsonlGenomeCache(path)


def test_evaluator_calls_equal_distinct_feasible_genomes():
    evaluator = AdditiveFitness()
    search = additive_search(evaluator, max_trainable_params=0.4).fit()
    trained_keys = {r["key"] for r in search.evaluations_ if r["source"] != "not_trained"}
    assert len(evaluator.calls) == len(set(evaluator.calls)) == len(trained_keys)
    assert search.num_trainings_ == len(evaluator.calls)
    # genomes were proposed more than once, so the cache and the dedupe did work
    assert len(search.evaluations_) > len({r["key"] for r in search.evaluations_})
    assert sum(h["num_cache_hits"] + h["num_duplicates"] for h in search.history_) > 0


def test_restart_with_jsonl_cache_retrains_nothing(tmp_path):
    path = tmp_path / "genomes.jsonl"
    first = additive_search(cache=JsonlGenomeCache(path), fidelity={"epochs": 1}).fit()
    evaluator = AdditiveFitness()
    second = additive_search(evaluator, cache=JsonlGenomeCache(path), fidelity={"epochs": 1}).fit()
    assert first.num_trainings_ > 0 and second.num_trainings_ == 0 and evaluator.calls == []
    assert second.best_mask_ == first.best_mask_ and second.history_[-1] == {
        **first.history_[-1], "num_trainings": 0,
        "num_cache_hits": first.history_[-1]["num_cache_hits"]
        + first.history_[-1]["num_trainings"]}
    # a different fidelity is a different genome: trained again
    third = additive_search(cache=JsonlGenomeCache(path), fidelity={"epochs": 2}).fit()
    assert third.num_trainings_ == first.num_trainings_


def test_time_constraint_is_rechecked_on_cached_evaluations():
    cache = InMemoryGenomeCache()
    loose = additive_search(AdditiveFitness(seconds_per_param=0.001), cache=cache).fit()
    strict = additive_search(AdditiveFitness(seconds_per_param=0.001), cache=cache,
                             max_seconds=2.0).fit()
    assert loose.best_evaluation_.seconds > 2.0
    assert strict.best_evaluation_.seconds <= 2.0


KILL_SCRIPT = """
import json, sys
from deft_fakes import HEAD_PARAMS, TOTAL_PARAMS, UNIT_PARAMS, SlowLoggingFitness
from medtune.deft import DEFTSearch, JsonlGenomeCache
cache_path, side_file = sys.argv[1], sys.argv[2]
search = DEFTSearch(num_units=7, evaluator=SlowLoggingFitness(side_file, 0.05),
                    unit_params=UNIT_PARAMS, head_params=HEAD_PARAMS, total_params=TOTAL_PARAMS,
                    max_trainable_params=0.5, popsize=8, generations=5, seed=7,
                    fidelity={"epochs": 1}, context="kill-test",
                    cache=JsonlGenomeCache(cache_path)).fit()
print(json.dumps({"best_mask": search.best_mask_, "best_fitness": search.best_fitness_,
                  "num_trainings": search.num_trainings_,
                  "keys": sorted({r["key"] for r in search.evaluations_
                                  if r["source"] != "not_trained"})}))
"""


def test_killed_search_resumes_without_retraining(tmp_path):
    cache_path, side_file = tmp_path / "genomes.jsonl", tmp_path / "trainings.txt"
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(cache_path), str(side_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}

    started = Path(str(side_file) + ".started")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    # 8 genomes in generation 0: kill while the 4th training of generation 1 sleeps (0.05 s)
    while time.monotonic() < deadline and proc.poll() is None:
        if started.exists() and len(started.read_text().splitlines()) >= 12:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    killed_trainings = len(side_file.read_text().splitlines())

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    resumed = json.loads(done.stdout)

    trainings = [tuple(json.loads(line)) for line in side_file.read_text().splitlines()]
    assert len(trainings) == len(set(trainings))  # nothing trained twice
    assert resumed["num_trainings"] == len(trainings) - killed_trainings
    assert 0 < resumed["num_trainings"] < len(trainings)
    cached = JsonlGenomeCache(cache_path)
    assert set(resumed["keys"]) == set(cached.keys())
    assert len(cached) == len(trainings)

    uninterrupted = DEFTSearch(
        num_units=7, evaluator=AdditiveFitness(), unit_params=UNIT_PARAMS, head_params=HEAD_PARAMS,
        total_params=TOTAL_PARAMS, max_trainable_params=0.5, popsize=8, generations=5, seed=7,
        fidelity={"epochs": 1}, context="kill-test").fit()
    assert tuple(resumed["best_mask"]) == uninterrupted.best_mask_
    assert resumed["best_fitness"] == uninterrupted.best_fitness_
    assert len(trainings) == uninterrupted.num_trainings_
    assert resumed["keys"] == sorted({r["key"] for r in uninterrupted.evaluations_
                                      if r["source"] != "not_trained"})


def test_process_pool_map_gives_the_builtin_map_result():
    serial = additive_search(max_trainable_params=0.5, seed=5, generations=4).fit()
    with ProcessPoolExecutor(max_workers=2) as pool:
        parallel = additive_search(max_trainable_params=0.5, seed=5, generations=4,
                                   map_fn=pool.map).fit()
    assert parallel.best_mask_ == serial.best_mask_
    assert parallel.history_ == serial.history_
    assert parallel.num_trainings_ == serial.num_trainings_


def test_evaluation_round_trips_through_a_dict():
    evaluation = Evaluation(fitness=0.9, trainable_params=10, seconds=1.5, info={"a": [1]})
    assert Evaluation.from_dict(evaluation.to_dict()) == evaluation
