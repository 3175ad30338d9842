"""A sweep plans each run once: one strategy object and one data fingerprint per run, the run id
computed once, the feature cache's depths handed down as an argument; one strategy-list grammar."""

from __future__ import annotations

import pytest

from medtune.config import RunConfig, SweepConfig
from medtune.errors import ConfigError
from medtune.strategies import StrategySpec
from medtune.strategies.base import Strategy
from medtune.strategies.spec import split_strategy_list

TINY = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "img_size": 16, "epochs": 1,
        "batch_size": 16, "eval_batch_size": 64, "device": "cpu", "progress": False, "feature_cache": "off"}


def test_a_two_run_sweep_builds_one_strategy_and_one_fingerprint_per_run(tmp_path, monkeypatch):
    import medtune.data.base as data_base
    from medtune import runner
    from medtune.sweeps import sweep

    # the boundary: the config parses (and validates) each strategy spec once, before the sweep
    config = SweepConfig.from_dict({**TINY, "strategy": "top_k:1", "seeds": [0], "train_fraction": [0.5, 1.0]})
    runner._load_cached.cache_clear()
    runner._subsample_cached.cache_clear()  # fresh ImageSets: their fingerprints are not computed yet
    built, hashed, ids = [], [], []
    init, fingerprint_of, run_id_of = Strategy.__init__, data_base.fingerprint_of, runner.run_id_of

    def counting_init(self, **params):
        built.append(type(self).__name__)
        init(self, **params)

    monkeypatch.setattr(Strategy, "__init__", counting_init)
    monkeypatch.setattr(data_base, "fingerprint_of", lambda *a, **k: hashed.append(1) or fingerprint_of(*a, **k))
    monkeypatch.setattr(runner, "run_id_of", lambda *a, **k: ids.append(1) or run_id_of(*a, **k))
    records = sweep(config, store=tmp_path / "store")
    assert [r["status"] for r in records] == ["done", "done"]
    assert len({r["run_id"] for r in records}) == 2
    assert built == ["TopK", "TopK"], "one strategy object per run, built when the run is planned"
    assert len(hashed) == 2, "one data fingerprint per run (each train fraction is its own data)"
    assert len(ids) == 2, "one run id per run"


def test_the_plan_carries_what_the_worker_needs(tmp_path):
    from medtune.sweeps import plan_sweep

    config = SweepConfig.from_dict({**TINY, "strategy": "linear,top_k:all,full", "seeds": [0, 1],
                                    "store": str(tmp_path / "store")})
    plans = plan_sweep(config)
    assert [str(p.config.strategy) for p in plans][:2] == ["linear", "linear"]
    assert len({id(p.strategy) for p in plans}) == len(plans), "every run has its own strategy object"
    for plan in plans:
        assert plan.num_blocks == 5 and plan.depth == plan.strategy.depth(5)
        assert plan.strategy.spec == str(plan.config.strategy)
    # the depths a frozen-prefix pass should store: top_k:k freezes the first 4 - k blocks; full and linear too
    assert {p.cache_cuts for p in plans} == {frozenset({0, 1, 2, 3, 4})}


def test_run_and_sweep_parse_a_parameter_list_to_the_same_spec():
    text = "l2_sp:alpha=0.1,beta=0.5"
    run_spec = RunConfig(strategy=text).strategy
    [sweep_spec] = SweepConfig.from_dict({"strategy": text}).strategy
    assert run_spec == sweep_spec == StrategySpec.parse("l2_sp:alpha=0.1;beta=0.5")
    assert run_spec.param_dict["alpha"] == 0.1 and run_spec.param_dict["beta"] == 0.5


def test_a_mixed_list_keeps_each_entry_with_its_parameters():
    text = "linear, l2_sp:alpha=0.1,beta=0.5, top_k:all, lp_ft:lp_epochs=2,ft_lr_scale=0.1|0.01, full"
    assert split_strategy_list(text) == ["linear", "l2_sp:alpha=0.1,beta=0.5", "top_k:all",
                                         "lp_ft:lp_epochs=2,ft_lr_scale=0.1|0.01", "full"]
    specs = [str(s) for s in SweepConfig.from_dict({"strategy": text}).strategy]
    assert specs == ["linear", "l2_sp:alpha=0.1,beta=0.5", "top_k:all", "lp_ft:lp_epochs=2",  # 0.1: the default
                     "lp_ft:ft_lr_scale=0.01,lp_epochs=2", "full"]
    with pytest.raises(ConfigError, match="starts with the parameter 'alpha=0.1'"):
        split_strategy_list("alpha=0.1,linear")
    with pytest.raises(ConfigError, match="a run takes one"):
        RunConfig(strategy="linear,full")


def test_a_mixed_list_runs_every_entry_with_its_parameters(tmp_path):
    from medtune.sweeps import sweep

    records = sweep({**TINY, "strategy": "l2_sp:alpha=0.01,beta=0.5,linear", "seeds": [0]}, store=tmp_path / "s")
    by_name = {r["strategy"]: r for r in records}
    assert set(by_name) == {"l2_sp", "linear"}
    assert by_name["l2_sp"]["strategy_params"]["alpha"] == 0.01
    assert by_name["l2_sp"]["strategy_params"]["beta"] == 0.5
