"""AuditConfig: validated when built, canonical sets, stable attack ids, one flag per field."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

import medtune
from medtune.cli import build_parser, main
from medtune.errors import ConfigError
from medtune.robustness import AuditConfig


@pytest.mark.parametrize("cfg", [AuditConfig(), AuditConfig(sources="natural", zetas=(0.1,), norm="inf",
                                                             targeted="all", natural_folder="photos", transfer=True)])
def test_round_trip(cfg):
    assert AuditConfig.from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())


def test_orders_and_spellings_give_one_config_and_one_attack_id():
    a = AuditConfig(zetas=(0.04, 0.02), sources=("natural", "train"), norm=2, targeted="1")
    b = AuditConfig(zetas="0.02,0.04,0.02", sources="train,natural", norm="l2", targeted=1)
    assert a == b and a.zetas == (0.02, 0.04) and a.sources == ("train", "natural") and a.norm == "2"
    assert a.attack_id("run", key="k") == b.attack_id("run", key="k")
    assert a.attack_id("run", key="k") != a.replace(zetas=(0.02,)).attack_id("run", key="k")
    # device, transfer and store do not change what is computed
    assert a.attack_id("run") == a.replace(device="cpu", transfer=True, store="elsewhere").attack_id("run")


def test_attack_ids_of_sorted_configs_are_those_of_earlier_stores():
    # the id formula before AuditConfig: a hash of the run, the parameter dict and the perturbation key
    params = {"sources": ["train", "natural"], "zetas": [0.02, 0.04, 0.08], "norm": "2", "targeted": None,
              "natural_folder": None, "num_source_images": 256, "max_passes": 10, "goal_rate": 0.8,
              "batch_size": 32, "seed": 0}
    key = "train/zeta=0.04/norm=2/target=none"
    legacy = hashlib.sha256(json.dumps({"run": "r1", **params, "key": key}, sort_keys=True).encode()).hexdigest()[:16]
    assert AuditConfig().semantic_dict() == params
    assert AuditConfig().attack_id("r1", key=key) == legacy


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"zetas": (0.02, 8)}, r"'zetas' parameter of AuditConfig must be a float in \(0, 1\]. Got 8 instead"),
        ({"zetas": "0.02,abc"}, "'zetas' parameter of AuditConfig must be comma-separated numbers"),
        ({"zetas": ()}, "'zetas' parameter of AuditConfig is empty"),
        ({"sources": ("trian",)}, "Unknown UAP source 'trian'. Did you mean 'train'"),
        ({"sources": ""}, "'sources' parameter of AuditConfig is empty"),
        ({"norm": "l1"}, "'norm' parameter of AuditConfig must be 2 or 'inf'"),
        ({"targeted": -1}, "'targeted' parameter of AuditConfig must be None, 'all' or a class index >= 0"),
        ({"targeted": "some"}, "'targeted' parameter of AuditConfig"),
        ({"num_source_images": 0}, "'num_source_images' parameter of AuditConfig must be an int >= 1"),
        ({"goal_rate": 1.5}, "'goal_rate' parameter of AuditConfig"),
        ({"batch_size": 2.5}, "'batch_size' parameter of AuditConfig"),
        ({"seed": -1}, "'seed' parameter of AuditConfig"),
        ({"transfer": "yes"}, "'transfer' parameter of AuditConfig"),
        ({"natural_folder": 3}, "'natural_folder' parameter of AuditConfig"),
    ],
)
def test_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AuditConfig(**kwargs)


def test_unknown_key_suggests_the_field():
    with pytest.raises(ConfigError, match="unknown config key 'zeta'. Did you mean 'zetas'"):
        AuditConfig.from_dict({"zeta": 0.04})


def test_bad_zeta_is_rejected_before_any_run_or_weights_are_read(tmp_path, monkeypatch):
    from medtune.robustness import driver

    def no_loading(*_args, **_kwargs):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr(driver, "load_run_model", no_loading)
    # the store holds no runs: resolving the run id would fail, but the ζ error comes first
    with pytest.raises(ConfigError, match=r"'zetas' parameter of AuditConfig must be a float in \(0, 1\]"):
        medtune.attack(["no-such-run"], store=str(tmp_path), zetas=(0.02, 8))
    with pytest.raises(ConfigError, match="unknown config key 'zetta'. Did you mean 'zetas'"):
        medtune.attack("all", store=str(tmp_path), zetta=(0.02,))


def test_cli_rejects_a_bad_zeta_in_one_line(tmp_path, capsys):
    assert main(["attack", "no-such-run", "--store", str(tmp_path), "--zeta", "0.02,8"]) == 2
    err = capsys.readouterr().err
    assert "'zetas' parameter of AuditConfig must be a float in (0, 1]. Got 8.0 instead" in err
    assert "Traceback" not in err


def test_every_field_is_a_flag_whose_default_is_the_configs():
    args = build_parser().parse_args(["attack"])
    for f in dataclasses.fields(AuditConfig):
        assert getattr(args, f.name) is None, f.name  # the default lives in AuditConfig only


@pytest.fixture
def cli_config(monkeypatch):
    """Run ``medtune attack ARGS`` without a store: return the AuditConfig the CLI passes to the API."""
    seen = []

    def fake_attack(runs, **kwargs):
        seen.append((runs, kwargs["config"]))
        return []

    monkeypatch.setattr(medtune, "attack", fake_attack)

    def run(*argv: str) -> AuditConfig:
        assert main(["attack", *argv, "--format", "csv"]) == 0
        return seen[-1][1]

    return run


def test_cli_flags_build_one_config_whatever_the_order(cli_config, tmp_path):
    a = cli_config("--zeta", "0.04,0.02", "--source", "natural,train", "--targeted", "2")
    b = cli_config("--zetas", "0.02,0.04", "--sources", "train,natural", "--targeted", "2")
    assert a == b == AuditConfig(zetas=(0.02, 0.04), targeted=2)
    folder = cli_config("--source", f"train,{tmp_path}")
    assert folder.sources == ("train", "natural") and folder.natural_folder == str(tmp_path)
    assert cli_config() == AuditConfig()


def test_cli_reads_a_yaml_config_and_flags_override_it(cli_config, tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("zetas: [0.08, 0.04]\nnorm: inf\nmax_passes: 3\n")
    assert cli_config("--config", str(path), "--max-passes", "5") == AuditConfig(zetas=(0.04, 0.08), norm="inf",
                                                                                  max_passes=5)
