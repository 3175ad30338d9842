"""The audit loop and its pictures."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from medtune.errors import ConfigError, DataError
from medtune.robustness import (
    apply_perturbation,
    audit,
    budget_xi,
    is_grey,
    natural_images,
    perturbation_norm,
    project_to_grey,
    resolve_channels,
    perturbation_to_image,
    save_examples_png,
    save_perturbation_png,
)

RECORD_KEYS = {
    "source",
    "zeta",
    "xi",
    "norm",
    "targeted",
    "fooling_rate",
    "fooling_ci_low",
    "fooling_ci_high",
    "random_fooling_rate",
    "random_ci_low",
    "random_ci_high",
    "targeted_success",
    "clean_target_share",
    "per_class",
    "confusion",
    "perturbation_key",
    "num_passes",
    "clean_accuracy",
    "perturbed_accuracy",
    "random_confusion",
    "algorithm",
    "channels",
    "budget_source",
    "budget_mean_norm",
    "random_fooling_rate_max",
    "random_fooling_rates",
    "mcnemar_p",
    "mcnemar_discordant",
    "source_curve",
    "source_rate_best",
    "num_photos",
}


def test_audit_records(colour_task):
    result = audit(
        colour_task["model"],
        train_images=colour_task["train_x"],
        test_images=colour_task["test_x"],
        test_labels=colour_task["test_y"],
        class_names=["red", "green", "blue"],
        zetas=(0.04, 0.08),
        norm="inf",
        sources=("train", "natural"),
        num_source_images=48,
        max_passes=2,
        batch_size=16,
        num_random=3,
    )
    records = result.records
    json.dumps(records)
    assert [(r["source"], r["zeta"]) for r in records] == [
        ("train", 0.04),
        ("train", 0.08),
        ("natural", 0.04),
        ("natural", 0.08),
    ]
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert r["norm"] == "inf" and r["targeted"] is None and r["num_source_images"] == 48
        assert r["num_test_images"] == 150 and set(r["per_class"]) == {"red", "green", "blue"}
        v = result.perturbations[r["perturbation_key"]]
        control = result.random_perturbations[r["perturbation_key"]]
        assert v.shape == (3, 16, 16)
        assert perturbation_norm(v, "inf") <= r["xi"] + 1e-6
        assert perturbation_norm(control, "inf") <= perturbation_norm(v, "inf") + 1e-7  # uniform in the cube
        assert r["fooling_ci_low"] <= r["fooling_rate"] <= r["fooling_ci_high"]
        assert r["algorithm"] == "batched" and r["channels"] == "rgb" and r["random_num_draws"] == 3
        assert len(r["random_fooling_rates"]) == 3 and r["random_fooling_rate_max"] == max(r["random_fooling_rates"])
        assert r["random_fooling_rate"] == pytest.approx(sum(r["random_fooling_rates"]) / 3)
        assert 0.0 <= r["mcnemar_p"] <= 1.0 and r["source_curve"][-1] == [48, r["fooling_rate"]]
    train_8 = records[1]
    assert train_8["xi"] > records[0]["xi"]
    assert train_8["fooling_rate"] > train_8["random_fooling_rate_max"]
    assert train_8["mcnemar_p"] < 1e-6 and train_8["mcnemar_discordant"][0] > train_8["mcnemar_discordant"][1]
    # every source has the training images' budget (Minagi et al.)
    assert records[3]["xi"] == pytest.approx(train_8["xi"])
    assert records[0]["num_photos"] is None and records[2]["num_photos"] == 16
    assert records[2]["natural_photos"] == "builtin"


@pytest.mark.parametrize("norm", [2, "inf"])
def test_every_source_gets_zeta_times_the_mean_train_norm(colour_task, norm):
    train_x = colour_task["train_x"]
    result = audit(colour_task["model"], train_images=train_x, test_images=colour_task["test_x"],
                   test_labels=colour_task["test_y"], zetas=(0.02, 0.08), norm=norm,
                   sources=("train", "natural", "mixed"), num_source_images=40, max_passes=1, num_random=1)
    flat = (train_x.double() / 255).flatten(1)
    mean_norm = float((flat.norm(dim=1) if norm == 2 else flat.abs().amax(dim=1)).mean())
    assert len(result.records) == 6
    for r in result.records:
        assert r["xi"] == pytest.approx(r["zeta"] * mean_norm, rel=1e-6)
        assert r["xi"] == pytest.approx(budget_xi(train_x, r["zeta"], norm), rel=1e-9)
        assert r["budget_source"] == "train" and r["budget_num_images"] == 240
        assert r["budget_mean_norm"] == pytest.approx(mean_norm, rel=1e-6)
        v = result.perturbations[r["perturbation_key"]]
        assert perturbation_norm(v, norm) <= r["xi"] * (1 + 1e-6)
    mixed = [r for r in result.records if r["source"] == "mixed"]
    assert all(r["num_natural_images"] == 20 and r["num_source_images"] == 40 for r in mixed)
    natural_mean = float(natural_images(40, 16, seed=0).double().div(255).flatten(1).norm(dim=1).mean())
    assert norm == "inf" or natural_mean != pytest.approx(mean_norm, rel=0.05)  # the old rule differs


@pytest.mark.parametrize("norm", [2, "inf"])
def test_grey_task_perturbations_and_controls_are_grey(grey_task, norm):
    result = audit(grey_task["model"], train_images=grey_task["train_x"], test_images=grey_task["test_x"],
                   test_labels=grey_task["test_y"], zetas=(0.08,), norm=norm, sources=("train", "natural", "mixed"),
                   num_source_images=32, max_passes=2, num_random=3, step_fraction=0.3)
    for r in result.records:
        assert r["channels"] == "grey"  # auto: every training image has R = G = B
        for v in (result.perturbations[r["perturbation_key"]], result.random_perturbations[r["perturbation_key"]]):
            assert float(v.abs().max()) > 0
            assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])  # R = G = B exactly
            assert float((v - project_to_grey(v)).norm()) == 0.0
    forced = audit(grey_task["model"], train_images=grey_task["train_x"], test_images=grey_task["test_x"],
                   test_labels=grey_task["test_y"], zetas=(0.08,), norm=norm, sources=("train",), channels="rgb",
                   num_source_images=32, max_passes=1, num_random=1, step_fraction=0.3)
    assert forced.records[0]["channels"] == "rgb" and not is_grey(next(iter(forced.perturbations.values())))


def test_resolve_channels(colour_task, grey_task):
    assert resolve_channels("auto", grey_task["train_x"]) == "grey"
    assert resolve_channels("auto", colour_task["train_x"]) == "rgb"
    assert resolve_channels("grey", colour_task["train_x"]) == "grey"
    nearly = grey_task["train_x"].clone()
    nearly[0, 0, 0, 0] ^= 1  # one pixel off grey: a colour task
    assert resolve_channels("auto", nearly) == "rgb"


def test_a_streamed_source_carries_v_over_its_chunks(colour_task):
    result = audit(colour_task["model"], train_images=colour_task["train_x"], test_images=colour_task["test_x"],
                   test_labels=colour_task["test_y"], zetas=(0.08,), norm="inf", sources=("natural", "train"),
                   num_source_images=60, chunk_size=25, max_passes=2, num_random=1)
    for r in result.records:
        assert r["num_chunks"] == 3 and [n for n, _ in r["source_curve"]] == [25, 50, 60]
        assert r["source_curve"][-1][1] == r["fooling_rate"]
        assert len(r["fooling_rate_source"]) == r["num_passes"] <= 6
    assert [r["num_photos"] for r in result.records] == [None, 16]  # train, natural (canonical order)


def test_audit_targeted_all(colour_task):
    result = audit(
        colour_task["model"],
        test_images=colour_task["test_x"],
        test_labels=colour_task["test_y"],
        zetas=(0.08,),
        norm=2,
        sources=("natural",),
        targeted="all",
        train_images=colour_task["train_x"],
        num_source_images=32,
        max_passes=1,
        batch_size=16,
        num_random=2,
    )
    assert [r["targeted"] for r in result.records] == [0, 1, 2]
    assert len(set(result.perturbations)) == 3
    for r in result.records:
        assert 0.0 <= r["targeted_success"] <= 1.0
        assert r["clean_target_share"] == pytest.approx(1 / 3, abs=0.05)  # balanced, accurate model
        assert r["random_targeted_success"] is not None and r["mcnemar_outcome"] == "target"
        assert r["random_targeted_success_max"] >= r["random_targeted_success"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sources": ("trian",)}, "Unknown UAP source 'trian'. Did you mean 'train'"),
        ({"sources": ("natural",), "train_images": None}, "audit needs train_images: the budget"),
        ({"sources": ()}, "'sources' parameter of AuditConfig is empty"),
        ({"sources": ("natural", "natural")}, "lists 'natural' twice"),
        ({"zetas": ()}, "'zetas' parameter of AuditConfig is empty"),
        ({"zetas": (8,)}, "'zetas' parameter of AuditConfig must be a float"),
        (
            {"targeted": "some"},
            "'targeted' parameter of AuditConfig must be None, 'all' or a class index",
        ),
        ({"targeted": 5}, r"'targeted' parameter of audit must be None, 'all' or a class index in \[0, 2\]"),
        ({"norm": "l1"}, "'norm' parameter of AuditConfig"),
        ({"num_source_images": 0}, "'num_source_images' parameter of AuditConfig"),
        ({"step_fraction": 2.0}, "'step_fraction' parameter of AuditConfig"),
        ({"algorithm": "fast"}, "'algorithm' parameter of AuditConfig must be one of batched, reference"),
        ({"num_random": 0}, "'num_random' parameter of AuditConfig"),
        ({"sources": ("mixed",), "num_source_images": 600, "mix_fraction": 0.1}, "'mixed' source needs 540"),
    ],
)
def test_audit_rejects_bad_parameters(colour_task, kwargs, match):
    args = {
        "test_images": colour_task["test_x"],
        "test_labels": colour_task["test_y"],
        "train_images": colour_task["train_x"],
    } | kwargs
    with pytest.raises(ConfigError, match=match):
        audit(colour_task["model"], **args)


def test_audit_names_bad_test_images(colour_task):
    with pytest.raises(DataError, match="'test_images' must have 4 dimensions"):
        audit(
            colour_task["model"],
            test_images=colour_task["test_x"][0],
            test_labels=colour_task["test_y"],
            train_images=colour_task["train_x"],
        )


def test_pictures(tmp_path):
    v = torch.zeros(3, 8, 8)
    v[0, :4] = 0.02
    v[2, 4:] = -0.01
    image = perturbation_to_image(v)
    assert image.shape == (8, 8, 3)
    assert image[0, 0, 0] == pytest.approx(1.0) and image[7, 0, 2] == pytest.approx(0.25)
    assert image[7, 0, 0] == pytest.approx(0.5)  # zero maps to grey
    assert perturbation_to_image(v, amplify=10)[0, 0, 0] == pytest.approx(0.7)
    path = save_perturbation_png(v, tmp_path / "out" / "uap.png")
    assert Image.open(path).format == "PNG"
    clean = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    path = save_examples_png(
        clean,
        apply_perturbation(clean, v),
        tmp_path / "ex.png",
        n=3,
        titles=["a", "b", "c", "d", "e", "f"],
    )
    assert Image.open(path).size[0] > Image.open(tmp_path / "out" / "uap.png").size[0]
    with pytest.raises(ConfigError, match="titles must hold 2·n = 6 strings"):
        save_examples_png(clean, clean, tmp_path / "x.png", n=3, titles=["a"])
    with pytest.raises(DataError, match="clean and perturbed must have the same shape"):
        save_examples_png(clean, clean[:2], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="'amplify' parameter must be a positive number"):
        save_perturbation_png(v, tmp_path / "x.png", amplify=0)
    with pytest.raises(DataError, match=r"perturbation must be \(C, H, W\)"):
        perturbation_to_image(v[None])


def test_zeta_is_checked_once_on_its_way_to_the_loop(colour_task, monkeypatch):
    # --zeta -> AuditConfig (checked there, once per value) -> audit() -> attack -> loop (not again)
    from medtune.robustness import AuditConfig, UAPParams, params

    calls = []
    check = params.CHECKS["zeta"]
    monkeypatch.setitem(params.CHECKS, "zeta", lambda *a: calls.append(a[0]) or check(*a))
    cfg = AuditConfig(zetas=(0.04, 0.08), sources="train", num_source_images=16, max_passes=1, num_random=1)
    assert calls == [0.04, 0.08] and isinstance(cfg.uap, UAPParams) and cfg.uap.batch_size == cfg.batch_size
    result = audit(colour_task["model"], cfg, train_images=colour_task["train_x"], test_images=colour_task["test_x"],
                   test_labels=colour_task["test_y"])
    assert calls == [0.04, 0.08] and [r["zeta"] for r in result.records] == [0.04, 0.08]
    with pytest.raises(ConfigError, match=r"'zeta' parameter of UAPParams must be a float in \(0, 1\]"):
        UAPParams(zeta=4)
    with pytest.raises(ConfigError, match="Unknown parameter 'zetta' of compute_uap. Did you mean 'zeta'"):
        UAPParams.create("compute_uap", knobs={"zetta": 0.1})
