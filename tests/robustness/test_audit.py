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
    perturbation_norm,
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
        assert perturbation_norm(control, "inf") == pytest.approx(perturbation_norm(v, "inf"))
        assert r["fooling_ci_low"] <= r["fooling_rate"] <= r["fooling_ci_high"]
    train_8 = records[1]
    assert train_8["xi"] > records[0]["xi"]
    assert train_8["fooling_rate"] > train_8["random_fooling_rate"]
    # the natural-image source has its own budget: ζ times the mean norm of the natural crops
    assert records[3]["xi"] != pytest.approx(train_8["xi"])


def test_audit_targeted_all(colour_task):
    result = audit(
        colour_task["model"],
        test_images=colour_task["test_x"],
        test_labels=colour_task["test_y"],
        zetas=(0.08,),
        norm=2,
        sources=("natural",),
        targeted="all",
        num_source_images=32,
        max_passes=1,
        batch_size=16,
    )
    assert [r["targeted"] for r in result.records] == [0, 1, 2]
    assert len(set(result.perturbations)) == 3
    for r in result.records:
        assert 0.0 <= r["targeted_success"] <= 1.0
        assert r["clean_target_share"] == pytest.approx(1 / 3, abs=0.05)  # balanced, accurate model
        assert r["random_targeted_success"] is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sources": ("trian",)}, "Unknown UAP source 'trian'. Did you mean 'train'"),
        ({"sources": ("train",), "train_images": None}, "'train' UAP source needs train_images"),
        ({"sources": ()}, "'sources' parameter of audit is empty"),
        ({"zetas": ()}, "'zetas' parameter of audit is empty"),
        ({"zetas": (8,)}, "'zetas' parameter of audit must be a float"),
        (
            {"targeted": "some"},
            "'targeted' parameter of audit must be None, 'all' or a class index",
        ),
        ({"norm": "l1"}, "'norm' parameter of audit"),
        ({"num_source_images": 0}, "'num_source_images' parameter of audit"),
        ({"step_size_fraction": 2.0}, "'step_size_fraction' parameter of audit"),
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
