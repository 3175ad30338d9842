import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtune.training.metrics import compute_metrics


def test_binary_metrics_match_sklearn_and_definitions():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2])
    prob = np.stack([1 - p1, p1], 1)
    m = compute_metrics(y, prob, task="binary", class_names=["a", "b"], loss=0.5)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["loss"] == 0.5


def test_macro_auc_skips_an_absent_class_with_a_warning():
    y = np.array([0, 1, 0, 1])  # class 2 absent
    prob = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    with pytest.warns(UserWarning, match="AUC skips class\\(es\\) c"):
        m = compute_metrics(y, prob, task="multiclass", class_names=["a", "b", "c"])
    expected = np.mean([roc_auc_score(y == 0, prob[:, 0]), roc_auc_score(y == 1, prob[:, 1])])
    assert m["auc"] == pytest.approx(expected)


def test_multilabel_mean_auc_and_accuracy():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    prob = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.4], [0.2, 0.1]])
    m = compute_metrics(y, prob, task="multilabel", class_names=["x", "y"])
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], prob[:, j]) for j in range(2)]))
    assert m["accuracy"] == pytest.approx(((prob >= 0.5) == y).mean())
