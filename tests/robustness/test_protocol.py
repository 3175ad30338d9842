"""The papers' audit protocols (--protocol hirano2021|minagi2022): every knob as the official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.robustness import AuditConfig, audit
from medtune.robustness.config import PROTOCOLS

art = pytest.importorskip("art")

MINAGI_EPS = 0.0005 * 128 / 255  # Natural_UAP's README example: fgsm_eps 0.0005 on the [-1, 1] scale


def test_one_minagi2022_step_equals_arts_fgsm_step(colour_task):
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    from medtune.robustness._loop import UAPLoop, fgsm_step

    model, images = colour_task["model"], colour_task["train_x"][:1]
    params = AuditConfig(protocol="minagi2022").uap.derive(xi=1.0, channels="rgb")
    assert (params.algorithm, params.step_norm, params.step_eps, params.clip) == ("reference", "inf", MINAGI_EPS, "none")
    loop = UAPLoop(model, images, params, xi=1.0, target=None, device=torch.device("cpu"), channels_last=False)
    # x + v outside [0, 1] in places: the papers' code never clips it
    v = 0.2 * torch.randn((1, *images.shape[1:]), generator=torch.Generator().manual_seed(0))
    start = images.float() / 255 + v
    assert start.min() < 0 or start.max() > 1
    with torch.no_grad():
        label = int(model(start).argmax(1))
    ours = fgsm_step(model, start, label, loop.stepper)
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                   nb_classes=3, clip_values=None, device_type="cpu")
    theirs = FastGradientMethod(classifier, norm=np.inf, eps=MINAGI_EPS).generate(start.numpy())
    step = ours - start
    assert torch.equal(ours, torch.from_numpy(theirs))  # the same adversarial image, bit for bit
    assert float(step.abs().max()) == pytest.approx(MINAGI_EPS, rel=1e-3) and int((step != 0).sum()) > 0.9 * step.numel()


def test_minagi2022_records_say_how_they_were_computed(colour_task):
    result = audit(colour_task["model"], {"protocol": "minagi2022", "zetas": 0.08, "num_random": 1},
                   train_images=colour_task["train_x"], test_images=colour_task["test_x"],
                   test_labels=colour_task["test_y"])
    train, natural = result.records
    for r in (train, natural):
        assert r["protocol"] == "minagi2022" and r["algorithm"] == "reference"
        assert r["step_norm"] == "inf" and r["step_eps"] == MINAGI_EPS and r["clip"] == "none"
        assert r["step_scale"] == "fixed" and r["push"] == "away"  # ART's one step per image, away from its label
        assert r["passes_per_chunk"] == 1 and r["chunk_size"] == 1000 and r["return_v"] == "last"
    # the whole training split is the train source; every bundled photo once, resized whole
    assert train["num_source_images"] == 240 and train["num_passes"] == 1
    assert natural["natural_resize"] == "whole" and natural["num_photos"] == 16
    assert natural["num_source_images"] == natural["num_distinct_natural_images"] == 16


def test_a_protocol_sets_the_knobs_left_at_their_defaults():
    cfg = AuditConfig(protocol="hirano2021", max_passes=3)
    assert cfg.max_passes == 3 and cfg.algorithm == "reference" and cfg.chunk_size == "all"
    assert cfg.step_eps == pytest.approx(0.0024 * 128 / 255) and cfg.return_v == "last"
    assert AuditConfig.from_dict(cfg.to_dict()) == cfg
    assert set(PROTOCOLS) == {"hirano2021", "minagi2022"}
    assert AuditConfig(num_source_images="256", chunk_size="all").num_source_images == 256
