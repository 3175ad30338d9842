"""Imbalanced classes: class weights, the balanced sampler, per-class metrics, a threshold for a
target sensitivity — each checked against its formula or the library it follows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.utils.class_weight import compute_class_weight

from medtune.config import RunConfig
from medtune.data.base import ImageSet
from medtune.errors import ConfigError
from medtune.training.imbalance import (
    balanced_order,
    class_weights,
    operating_point,
    per_class_metrics,
    threshold_for_sensitivity,
)
from medtune.training.loop import _loss_fn


def test_class_weights_are_sklearns_balanced_weights():
    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    w = class_weights(y, "multiclass", 3, "balanced")
    np.testing.assert_allclose(w, compute_class_weight("balanced", classes=np.arange(3), y=y), rtol=1e-12)
    np.testing.assert_allclose(w, [100 / (3 * 90), 100 / (3 * 9), 100 / (3 * 1)], rtol=1e-12)
    assert class_weights(y, "multiclass", 3, "none") is None
    assert class_weights(np.array([0, 0, 1]), "multiclass", 3, "balanced")[2] == 0.0  # absent from training


def test_multilabel_pos_weight_is_negatives_over_positives():
    y = np.array([[1, 0], [0, 0], [0, 1], [0, 1]], dtype=np.float32)
    assert class_weights(y, "multilabel", 2, "balanced") == [3.0, 1.0]


def test_weighted_loss_is_torchs_weighted_mean():
    logits, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 0, 1, 1, 2])
    w = [0.5, 1.0, 3.0]
    nll = -torch.log_softmax(logits, 1)[torch.arange(6), y]
    wy = torch.tensor(w)[y]
    expected = (wy * nll).sum() / wy.sum()
    assert torch.allclose(_loss_fn("multiclass", 0.0, weight=w)(logits, y), expected, atol=1e-6)
    logits2, y2 = torch.randn(4, 2), torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1]]).float()
    pos = torch.tensor([3.0, 1.0])
    manual = -(pos * y2 * torch.nn.functional.logsigmoid(logits2) + (1 - y2) * torch.nn.functional.logsigmoid(-logits2))
    assert torch.allclose(_loss_fn("multilabel", 0.0, weight=[3.0, 1.0])(logits2, y2), manual.mean(), atol=1e-6)


def test_balanced_order_is_weighted_random_sampler():
    from torch.utils.data import WeightedRandomSampler

    labels = torch.tensor([0] * 900 + [1] * 100)
    order = balanced_order(labels, "binary", torch.Generator().manual_seed(3))
    reference = list(WeightedRandomSampler((1.0 / torch.tensor([900.0, 100.0], dtype=torch.float64))[labels], 1000,
                                           replacement=True, generator=torch.Generator().manual_seed(3)))
    assert order.tolist() == reference
    share = (labels[order] == 1).float().mean().item()
    assert abs(share - 0.5) < 0.05  # both classes drawn about equally often
    with pytest.raises(ConfigError, match="multi-label"):
        balanced_order(torch.zeros(4, 2), "multilabel", torch.Generator())


def test_per_class_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    prob = rng.dirichlet(np.ones(3), 200)
    out = per_class_metrics(y, prob, task="multiclass", class_names=["a", "b", "c"])
    pred = prob.argmax(1)
    recall = skm.recall_score(y, pred, average=None)
    precision = skm.precision_score(y, pred, average=None)
    for j, name in enumerate("abc"):
        assert out[name]["sensitivity"] == pytest.approx(recall[j], abs=1e-12)
        assert out[name]["ppv"] == pytest.approx(precision[j], abs=1e-12)
        assert out[name]["specificity"] == pytest.approx(skm.recall_score(y != j, pred != j), abs=1e-12)
        assert out[name]["pr_auc"] == pytest.approx(skm.average_precision_score(y == j, prob[:, j]), abs=1e-12)
        assert out[name]["support"] == int((y == j).sum())


def test_threshold_for_target_sensitivity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.35, 0.6, 0.3, 0.5, 0.7, 0.9])
    # sensitivity ≥ 0.75 needs 3 of 4 positives: the highest such threshold is 0.5
    assert threshold_for_sensitivity(y, p, 0.75) == 0.5
    assert threshold_for_sensitivity(y, p, 1.0) == 0.3
    assert threshold_for_sensitivity(y, p, 0.25) == 0.9
    val_prob = np.stack([1 - p, p], 1)
    test_y = np.array([0, 0, 1, 1, 1])
    test_p = np.array([0.4, 0.55, 0.45, 0.6, 0.95])
    op = operating_point(y, val_prob, test_y, np.stack([1 - test_p, test_p], 1), 0.75)
    assert op["threshold"] == 0.5 and op["val_sensitivity"] == 0.75 and op["val_specificity"] == 0.75
    assert op["test_sensitivity"] == pytest.approx(2 / 3) and op["test_specificity"] == 0.5
    assert op["test_ppv"] == pytest.approx(2 / 3) and op["test_npv"] == 0.5
    with pytest.raises(ConfigError, match="no positive"):
        threshold_for_sensitivity(np.zeros(3), np.ones(3), 0.9)


def _imbalanced(seed: int = 0, img_size: int = 16) -> ImageSet:
    """Grey images whose brightness tells the class with overlap; 9:1 in every split."""
    rng = np.random.default_rng(seed)
    counts = {"train": (270, 30), "val": (90, 10), "test": (180, 20)}
    images, labels, splits = [], [], []
    for split, (n0, n1) in counts.items():
        for c, n in ((0, n0), (1, n1)):
            level = 0.45 + 0.1 * c + rng.normal(0, 0.06, n)
            img = level[:, None, None] + rng.normal(0, 0.05, (n, img_size, img_size))
            images.append(np.repeat(np.clip(img * 255, 0, 255).astype(np.uint8)[:, None], 3, 1))
            labels += [c] * n
            splits += [split] * n
    return ImageSet(images=torch.from_numpy(np.concatenate(images)), labels=torch.tensor(labels),
                    splits=np.array(splits), class_names=["common", "rare"], task="binary",
                    ids=[str(i) for i in range(len(labels))], name="imbalanced")


def _train(data: ImageSet, **overrides):
    from medtune.runner import build_run
    from medtune.training.loop import fit

    cfg = RunConfig(data="synthetic", arch="medtune_tiny_cnn", weights="none", strategy="full", epochs=2, img_size=16,
                    batch_size=32, lr=1e-2, device="cpu", progress=False, feature_cache="off", **overrides)
    strategy, model, blocks = build_run(cfg, data, torch.device("cpu"))
    return fit(model, data, strategy, cfg, blocks=blocks)


def test_class_weight_balanced_raises_minority_sensitivity():
    data = _imbalanced()
    plain = _train(data)
    weighted = _train(data, class_weight="balanced")
    sampled = _train(data, sampler="balanced")
    sens = {name: per_class_metrics(r.y_true, r.y_prob, task="binary", class_names=data.class_names)["rare"]
            ["sensitivity"] for name, r in (("plain", plain), ("weighted", weighted), ("sampled", sampled))}
    assert sens["weighted"] >= sens["plain"] + 0.25, sens
    assert sens["sampled"] >= sens["plain"] + 0.25, sens


def test_run_record_has_per_class_metrics_and_operating_point(tmp_path):
    import medtune
    from medtune.store import ResultsStore

    record = medtune.run({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "strategy": "full",
                          "epochs": 1, "img_size": 16, "device": "cpu", "class_weight": "balanced",
                          "target_sensitivity": 0.8, "progress": False}, store=ResultsStore(tmp_path))
    assert set(record["per_class"]) == {"val", "test"}
    assert set(record["per_class"]["test"]) == set(record["predictions"]["class_names"])
    op = record["operating_point"]
    assert op["target_sensitivity"] == 0.8 and op["val_sensitivity"] >= 0.8
    assert record["class_weights"] == [1.0, 1.0]  # synthetic data is balanced
    # the defaults leave the run id of a store written before these fields unchanged
    assert "class_weight" not in RunConfig().semantic_dict() and "sampler" not in RunConfig().semantic_dict()
    assert "class_weight" in RunConfig(class_weight="balanced").semantic_dict()
    assert not math.isnan(record["per_class"]["test"]["disc"]["pr_auc"])


def test_linear_probe_uses_the_class_weights_as_sklearn():
    from sklearn.linear_model import LogisticRegression

    from medtune.strategies.probing import fit_logistic_head

    rng = np.random.default_rng(0)
    y = np.array([0] * 180 + [1] * 20)
    x = rng.normal(0, 1, (200, 5)) + 0.8 * y[:, None]
    xv = rng.normal(0, 1, (60, 5)) + 0.8 * np.array([0] * 54 + [1] * 6)[:, None]
    yv = np.array([0] * 54 + [1] * 6)
    w = class_weights(y, "binary", 2, "balanced")
    head = fit_logistic_head(x, y, xv, yv, task="binary", num_classes=2, select="accuracy", cs=np.array([1.0]),
                             class_weight=w, max_iter=1000, tol=1e-6)  # converged, as the reference
    mean, std = x.mean(), x.std()
    ref = LogisticRegression(C=1.0, class_weight={0: w[0], 1: w[1]}, max_iter=1000, tol=1e-6).fit((x - mean) / std, y)
    logits = xv @ head.weight.T + head.bias
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], ref.decision_function((xv - mean) / std), atol=1e-5)
    plain = fit_logistic_head(x, y, xv, yv, task="binary", num_classes=2, select="accuracy", cs=np.array([1.0]))
    predicted_rare = lambda h: int(((xv @ h.weight.T + h.bias).argmax(1) == 1).sum())  # noqa: E731
    assert predicted_rare(head) > predicted_rare(plain)
