import dataclasses

import pytest

from medtune.config import RunConfig, SweepConfig, save_yaml, load_yaml
from medtune.strategies.spec import parse_strategy_spec
from medtune.errors import ConfigError


def test_run_config_round_trips_dict_and_yaml(tmp_path):
    cfg = RunConfig(data="synthetic", arch="resnet18", strategy="top_k:2", epochs=3, lr=3e-4, seed=4)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    save_yaml(cfg.to_dict(), tmp_path / "c.yaml")
    assert RunConfig.from_dict(load_yaml(tmp_path / "c.yaml")) == cfg


def test_sweep_config_round_trips_and_parses_comma_lists():
    cfg = SweepConfig.from_dict({"arch": "resnet18,densenet121", "strategy": "linear,top_k:all", "seeds": "0,1,2",
                                 "epochs": 2, "train_fraction": [0.5, 1.0]})
    assert cfg.arch == ("resnet18", "densenet121")
    assert cfg.seeds == (0, 1, 2)
    assert cfg.train_fraction == (0.5, 1.0)
    assert cfg.base.epochs == 2
    assert SweepConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'img_sise'. Did you mean 'img_size'"):
        RunConfig.from_dict({"img_sise": 64})
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        SweepConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, "'epochs' parameter of RunConfig must be >= 1"),
    ("lr", -1.0, "'lr' parameter of RunConfig must be > 0"),
    ("train_fraction", 1.5, "'train_fraction' parameter of RunConfig must be <= 1"),
    ("optimizer", "adamm", "must be one of adamw, sgd, adam. Got 'adamm' instead. Did you mean 'adam'"),
    ("epochs", "3", "'epochs' parameter of RunConfig must be of type int"),
    ("strategy", "", "must not be empty"),
])
def test_invalid_values_are_named(field, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**{field: value})


def test_strategy_spec_parsing():
    assert parse_strategy_spec("top_k:2") == ("top_k", {"_main": "2"})
    assert parse_strategy_spec("l2_sp:alpha=0.1,beta=0.5") == ("l2_sp", {"alpha": "0.1", "beta": "0.5"})
    assert parse_strategy_spec("full") == ("full", {})
    with pytest.raises(ConfigError, match="two unnamed"):
        parse_strategy_spec("top_k:1,2")


def test_semantic_dict_excludes_store_and_device():
    a = RunConfig(store="/a", device="cpu")
    b = RunConfig(store="/b", device="auto")
    assert a.semantic_dict() == b.semantic_dict()
    assert RunConfig(seed=1).semantic_dict() != RunConfig(seed=2).semantic_dict()


def test_every_run_field_is_a_cli_flag():
    from medtune.cli import build_parser

    parser = build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    flags = {opt for a in run_parser._actions for opt in a.option_strings}
    for f in dataclasses.fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in flags
