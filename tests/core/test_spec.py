"""The typed strategy spec: parsed once when a config is built, canonical in the store, never re-parsed."""

from __future__ import annotations

import pytest
import torch

import medtune.strategies.spec as spec_module
from medtune.config import RunConfig, SweepConfig
from medtune.errors import ConfigError, StoreError
from medtune.runner import run_id_of
from medtune.strategies import StrategySpec


def test_equivalent_spellings_are_one_spec_one_text_and_one_run_id():
    a, b = StrategySpec.parse("top_k:2"), StrategySpec.parse("top_k:k=2")
    assert a == b and str(a) == str(b) == "top_k:2"
    assert a.param_dict == {"k": 2}  # converted to the default's type
    c1, c2 = RunConfig(strategy="top_k:k=2"), RunConfig(strategy="top_k:2")
    assert c1.to_dict()["strategy"] == "top_k:2"
    assert run_id_of(c1, "fp") == run_id_of(c2, "fp")
    # a parameter at its default is not shown; one that differs is
    assert str(StrategySpec.parse("l2_sp:alpha=0.01")) == "l2_sp"
    assert str(StrategySpec.parse("l2_sp:alpha=0.1")) == "l2_sp:alpha=0.1"


@pytest.mark.parametrize("text,changed", [("full", False), ("top_k:2", False), ("scratch", False), ("surgical:1", False),
                                          ("deft:0110", False), ("lp_ft", True), ("linear", True), ("l2_sp", True),
                                          ("l1_sp:alpha=0.1", True), ("auto_rgn", True)])
def test_run_ids_change_only_for_strategies_whose_defaults_changed(text, changed):
    import hashlib
    import json

    cfg = RunConfig(strategy=text)
    # the id every store had before strategies carried a revision
    before = hashlib.sha256(json.dumps({"config": cfg.semantic_dict(), "data": "fp"}, sort_keys=True).encode())
    assert (run_id_of(cfg, "fp") != before.hexdigest()[:16]) == changed


@pytest.mark.parametrize("text", ["full", "linear", "top_k:3", "layers_k:2", "surgical:stage_2", "lp_ft:ft_lr_scale=0.5",
                                  "l2_sp:alpha=0.1,beta=0.5", "auto_rgn", "deft:0110"])
def test_run_config_holds_a_typed_spec_that_round_trips(text):
    cfg = RunConfig(strategy=text)
    assert isinstance(cfg.strategy, StrategySpec)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.strategy.create().spec == str(cfg.strategy)


def test_the_default_spec_is_the_parsed_one():
    assert RunConfig().strategy == StrategySpec.parse("full") and str(RunConfig().strategy) == "full"


def test_bad_specs_fail_when_the_config_is_built():
    with pytest.raises(ConfigError, match="Did you mean 'lp_ft'"):
        RunConfig(strategy="lpft")
    with pytest.raises(ConfigError, match="unknown parameter"):
        RunConfig(strategy="l2_sp:gamma=1")
    with pytest.raises(ConfigError, match="sweep template"):
        RunConfig(strategy=StrategySpec.parse("top_k:all", allow_all=True)).strategy.create()
    with pytest.raises(ConfigError, match="does not support ':all'"):
        SweepConfig(strategy=("deft:all",))
    with pytest.raises(ConfigError, match="takes no positional parameter"):
        SweepConfig(strategy=("l2_sp:all",))


def test_a_template_expands_to_one_spec_per_depth():
    template = StrategySpec.parse("top_k:all", allow_all=True)
    assert template.expand_all and str(template) == "top_k:all"
    assert [str(s) for s in template.expand(4)] == ["top_k:1", "top_k:2"]
    assert str(StrategySpec.parse("surgical:all", allow_all=True).expand(4)[-1]) == "surgical:2"


def test_sweep_and_search_configs_round_trip():
    from medtune.deft.driver import SearchConfig

    sweep = SweepConfig.from_dict({"strategy": ["linear", "top_k:all"], "seeds": [0, 1], "epochs": 3})
    assert SweepConfig.from_dict(sweep.to_dict()) == sweep
    search = SearchConfig.from_dict({"popsize": 4, "seeds": "0,2", "epochs": 3, "max_trainable_params": 0.3})
    assert SearchConfig.from_dict(search.to_dict()) == search
    assert search.base.epochs == 3 and search.seeds == (0, 2)


def test_the_spec_text_is_parsed_once_on_the_way_from_sweep_to_store(tmp_path, monkeypatch):
    """A sweep parses each strategy entry when its config is built; expansion, the workers and the
    loop receive typed specs and parse nothing."""
    import medtune

    calls = []
    real = spec_module.parse_strategy_spec
    monkeypatch.setattr(spec_module, "parse_strategy_spec", lambda text: (calls.append(text), real(text))[1])
    records = medtune.sweep({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1,
                             "img_size": 16, "batch_size": 32, "device": "cpu", "progress": False,
                             "strategy": ["lp_ft:lp_epochs=1", "top_k:all"]}, store=str(tmp_path / "s"))
    assert sorted(calls) == ["lp_ft:lp_epochs=1", "top_k:all"]
    assert [r["label"] for r in records][:2] == ["lp_ft:lp_epochs=1", "top_k:1"]


def test_a_damaged_checkpoint_is_one_warning_naming_the_file_and_set_aside(tiny_cfg, synthetic_data, tmp_path):
    from medtune.runner import build_run
    from medtune.training.loop import Checkpoint, fit

    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(StoreError, match=str(ckpt)):
        Checkpoint.load(ckpt)
    strategy, model, blocks = build_run(tiny_cfg, synthetic_data, torch.device("cpu"))
    with pytest.warns(UserWarning, match=f"{ckpt}.*renamed run.ckpt.corrupt"):
        fit(model, synthetic_data, strategy, tiny_cfg, blocks=blocks, checkpoint_path=ckpt)
    assert (tmp_path / "run.ckpt.corrupt").read_bytes() == b"not a checkpoint"
