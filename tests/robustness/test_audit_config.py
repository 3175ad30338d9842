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


def test_attack_id_formula_and_audit_keywords():
    # the id: a hash of the run, the semantic fields and the perturbation key. The fields changed with
    # the papers' threat model (budget over the training images, goal 1.0, 15 passes, ...), so audits
    # stored before it are recomputed rather than read back under a different meaning.
    import inspect

    from medtune.robustness import audit

    cfg = AuditConfig()
    key = "train/zeta=0.04/norm=2/target=none"
    expected = hashlib.sha256(json.dumps({"run": "r1", **cfg.semantic_dict(), "key": key},
                                         sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.attack_id("r1", key=key) == expected
    assert cfg.goal_rate == 1.0 and cfg.max_passes == 15  # Hirano et al.'s code: delta=1e-6, max_iter=15
    # audit() takes the config object the driver holds (its fields as keyword overrides), and the
    # config holds the UAP parameter object handed down to the attack
    assert "config" in inspect.signature(audit).parameters
    assert (cfg.uap.norm, cfg.uap.max_passes, cfg.uap.goal_rate, cfg.uap.batch_size) == ("2", 15, 1.0, 16)
    # one default batch for the audit and compute_uap (they differed: 32 and 64)
    from medtune.robustness import UAPParams
    assert cfg.batch_size == UAPParams().batch_size


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
        ({"sources": "train,natural,train"}, "'sources' parameter of AuditConfig lists 'train' twice"),
        ({"algorithm": "art"}, "'algorithm' parameter of AuditConfig must be one of batched, reference"),
        ({"channels": "gray"}, "'channels' parameter of AuditConfig must be one of auto, grey, rgb. Got 'gray'"),
        ({"step_fraction": 0}, "'step_fraction' parameter of AuditConfig"),
        ({"step_decay": 1.5}, "'step_decay' parameter of AuditConfig"),
        ({"step_norm": "l1"}, "'norm' parameter of AuditConfig"),
        ({"norm": "inf", "step_norm": "2"}, "'step_norm' parameter of AuditConfig must be None or 'inf'"),
        ({"num_random": 0}, "'num_random' parameter of AuditConfig must be an int >= 1"),
        ({"random_linf": "corner"}, "'random_linf' parameter of AuditConfig must be one of uniform, corners"),
        ({"mix_fraction": 0.0}, "'mix_fraction' parameter of AuditConfig"),
        ({"chunk_size": 0}, "'chunk_size' parameter of AuditConfig"),
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
    every = cli_config("--algorithm", "reference", "--channels", "grey", "--step-fraction", "0.05", "--step-norm",
                       "inf", "--step-decay", "0.9", "--goal-rate", "0.9", "--max-passes", "3", "--num-random", "4",
                       "--random-linf", "corners", "--source", "mixed", "--mix-fraction", "0.25", "--chunk-size", "64")
    assert every == AuditConfig(algorithm="reference", channels="grey", step_fraction=0.05, step_norm="inf",
                                step_decay=0.9, goal_rate=0.9, max_passes=3, num_random=4, random_linf="corners",
                                sources=("mixed",), mix_fraction=0.25, chunk_size=64)


@pytest.mark.parametrize("sources", ["natural,{dir}", "{dir},{dir}"])
def test_cli_refuses_the_natural_source_twice_in_one_line(tmp_path, capsys, sources):
    assert main(["attack", "--store", str(tmp_path), "--source", sources.format(dir=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--sources names the natural source 2 times" in err and "\n" not in err


def test_cli_reads_a_yaml_config_and_flags_override_it(cli_config, tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("zetas: [0.08, 0.04]\nnorm: inf\nmax_passes: 3\n")
    assert cli_config("--config", str(path), "--max-passes", "5") == AuditConfig(zetas=(0.04, 0.08), norm="inf",
                                                                                  max_passes=5)


def test_the_push_flag_builds_the_config_and_the_record_names_it(cli_config):
    assert cli_config("--push", "away") == AuditConfig(push="away")
    assert cli_config("--push", "away").uap.push == "away" and cli_config().uap.push == "dominant"


def test_step_scale_is_hashed_only_away_from_the_fixed_step():
    # a field added after stores existed: the fixed step (the default then) keeps every stored attack id as
    # it was; the batched default since, sqrt_batch, is hashed under its name
    fixed = AuditConfig(step_scale="fixed")
    assert "step_scale" not in fixed.semantic_dict()
    assert "step_scale" not in AuditConfig(algorithm="reference").semantic_dict()  # the reference's default
    scaled = AuditConfig()
    assert scaled.step_scale == "sqrt_batch" and scaled.semantic_dict()["step_scale"] == "sqrt_batch"
    assert scaled.attack_id("r1", key="k") != fixed.attack_id("r1", key="k")
    with pytest.raises(ConfigError, match="batched algorithm only"):
        AuditConfig(algorithm="reference", step_scale="sqrt_batch")
