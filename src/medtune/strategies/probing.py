"""The linear probe as Kumar et al. (2022) fit it: logistic regression on frozen features.

Their official code (``unlabeled_extrapolation/log_reg_sk.py`` in AnanyaKumar/transfer_learning)
standardises the features with one scalar mean and standard deviation of the training features,
fits scikit-learn's ``LogisticRegression`` (L-BFGS, L2 penalty, unpenalised intercept) along a
log-spaced grid of 50 values of C from 1e-7 to 1e2 (``num_reg_values=50`` from their experiment
script), each fit warm-started from the previous one and capped at 200 L-BFGS iterations
(``test_log_reg_warm_starting(..., max_iter=200)``, scikit-learn's default ``tol``), keeps the C with
the best validation accuracy, and folds the standardisation back into the weights. :func:`fit_logistic_head` does
the same (by default on validation accuracy too; ties, frequent on small validation splits, go
to the lower validation loss, then the smaller C), and fits one binary problem per label for
multi-label tasks (one-vs-rest).

:func:`fit_logistic_head_reusing` remembers the last few fits of the process by a hash of their
inputs: ``linear`` and LP-FT's probe phase solve the same problem on the same frozen features at
every learning rate of a sweep, and L-BFGS along the C grid can cost minutes on poorly conditioned
features (a random-init backbone's).
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from medtune.training.metrics import compute_metrics, higher_is_better

__all__ = ["LogisticHead", "fit_logistic_head", "fit_logistic_head_reusing", "c_grid"]

#: Bounds of the C grid, as powers of ten (Kumar et al.: ``np.logspace(-7, 2, num_cs)``).
C_EXPONENTS = (-7.0, 2.0)


def c_grid(num_c: int) -> np.ndarray:
    """``num_c`` values of C, log-spaced over 1e-7 … 1e2 (one value: 1.0)."""
    return np.logspace(*C_EXPONENTS, num_c) if num_c > 1 else np.array([1.0])


@dataclass
class LogisticHead:
    """A fitted head: ``logits = X @ weight.T + bias`` on the raw (unstandardised) features.

    Attributes:
        weight: (K, D) float64, one row per output of the model's head.
        bias: (K,) float64.
        c: the chosen C.
        grid: one dict per C tried: ``c``, ``val_accuracy``, ``val_auc``, ``val_loss``, ``converged``.
    """

    weight: np.ndarray
    bias: np.ndarray
    c: float
    grid: list[dict]


def _binary_logits(x: np.ndarray, y: np.ndarray, c: float, clf: LogisticRegression | None, *, max_iter: int,
                   tol: float, class_weight: dict | None = None,
                   ) -> tuple[np.ndarray, float, LogisticRegression | None, bool]:
    """(w (D,), b, the warm-startable classifier, converged) of one binary problem."""
    if y.min() == y.max():  # one class only: a constant logit at the smoothed rate
        rate = (y.sum() + 0.5) / (len(y) + 1.0)
        return np.zeros(x.shape[1]), float(np.log(rate / (1 - rate))), None, True
    clf = clf or LogisticRegression(max_iter=max_iter, tol=tol, warm_start=True, class_weight=class_weight)
    clf.C = c
    clf.fit(x, y)
    return clf.coef_[0].copy(), float(clf.intercept_[0]), clf, bool(clf.n_iter_.max() < max_iter)


class _Path:
    """Warm-started fits along the C grid for one task (the classifiers carry the warm start)."""

    def __init__(self, task: str, num_classes: int, max_iter: int, tol: float,
                 class_weight: list[float] | None = None) -> None:
        self.task, self.num_classes, self.max_iter, self.tol = task, num_classes, max_iter, tol
        self.class_weight = class_weight
        self.clfs: dict[int, LogisticRegression | None] = {}

    def fit(self, x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray, bool]:
        """Weights (K, D) and bias (K,) in the model's output layout, and whether every fit converged."""
        k, d = self.num_classes, x.shape[1]
        if self.task == "multilabel":
            w, b, ok = np.zeros((k, d)), np.zeros(k), True
            for j in range(k):
                # the loss's pos_weight: each positive of label j weighs class_weight[j]
                cw = None if self.class_weight is None else {0: 1.0, 1: self.class_weight[j]}
                w[j], b[j], self.clfs[j], conv = _binary_logits(x, y[:, j], c, self.clfs.get(j),
                                                               max_iter=self.max_iter, tol=self.tol, class_weight=cw)
                ok &= conv
            return w, b, ok
        present = np.unique(y)
        cw = None if self.class_weight is None else {int(k): self.class_weight[int(k)] for k in present}
        if len(present) < 2:
            w, b = np.zeros((k, d)), np.full(k, -10.0)
            b[int(present[0])] = 10.0
            return w, b, True
        if k == 2:  # sklearn's binary model has one logit; the softmax head gets it split symmetrically
            wb, bb, self.clfs[0], ok = _binary_logits(x, y, c, self.clfs.get(0), max_iter=self.max_iter,
                                                      tol=self.tol, class_weight=cw)
            return np.stack([-wb / 2, wb / 2]), np.array([-bb / 2, bb / 2]), ok
        clf = self.clfs.get(0) or LogisticRegression(max_iter=self.max_iter, tol=self.tol, warm_start=True,
                                                     class_weight=cw)
        clf.C = c
        clf.fit(x, y)
        self.clfs[0] = clf
        w, b = np.zeros((k, d)), np.zeros(k)
        w[present], b[present] = clf.coef_, clf.intercept_
        # a class absent from the training split gets a logit well below every present one
        b[np.setdiff1d(np.arange(k), present)] = clf.intercept_.min() - 10.0
        return w, b, bool(clf.n_iter_.max() < self.max_iter)


def _probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-logits))
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _loss(logits: np.ndarray, y: np.ndarray, task: str) -> float:
    if task == "multilabel":
        return float(np.mean(np.logaddexp(0, logits) - y * logits))
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_logistic_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                      task: str, num_classes: int, select: str, cs: np.ndarray, max_iter: int = 200,
                      tol: float = 1e-4, class_weight: list[float] | None = None) -> LogisticHead:
    """Logistic regression on frozen features, C chosen on the validation split.

    Args:
        x_train, x_val: float features (N, D), the inputs of the model's classifier.
        y_train, y_val: class indices (N,), or 0/1 labels (N, K) for ``multilabel``.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        num_classes: outputs of the model's head.
        select: the validation metric that selects C (``accuracy`` as Kumar et al., ``auc``, ...,
            or ``loss``).
        cs: the values of C to try, in the order of the warm-started path (ascending).
        max_iter, tol: L-BFGS iteration cap and tolerance of each fit (Kumar et al.: 200 and scikit-learn's
            1e-4; each fit starts from the previous C's solution).
        class_weight: the run's loss weights (per class; multi-label: per label's positives), as
            scikit-learn's ``class_weight``; None for none.

    Returns:
        The fitted head for the raw features (the standardisation folded in).
    """
    x_train = np.asarray(x_train, dtype=np.float64)
    x_val = np.asarray(x_val, dtype=np.float64)
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    xs_train, xs_val = (x_train - mean) / std, (x_val - mean) / std
    path = _Path(task, num_classes, max_iter, tol, class_weight)
    higher = higher_is_better(select)
    best, best_key, grid = None, None, []
    class_names = [str(i) for i in range(num_classes)]
    for c in cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            w, b, converged = path.fit(xs_train, y_train, float(c))
        logits = xs_val @ w.T + b
        loss = _loss(logits, y_val, task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a class absent from val: the AUC warning is the loop's to give
            metrics = compute_metrics(y_val, _probabilities(logits, task), task=task, class_names=class_names,
                                      loss=loss)
        score = metrics.get(select, float("nan"))
        grid.append({"c": float(c), **{f"val_{m}": metrics.get(m, float("nan")) for m in ("accuracy", "auc", select)},
                     "val_loss": loss, "converged": converged})
        score = -loss if np.isnan(score) else (score if higher else -score)
        key = (score, -loss)
        if best_key is None or key > best_key:
            best, best_key = (w.copy(), b.copy(), float(c)), key
    w, b, c = best
    # logits = ((x - mean) / std) @ w.T + b  =  x @ (w / std).T + (b - mean / std * w.sum(1))
    return LogisticHead(weight=w / std, bias=b - mean / std * w.sum(1), c=c, grid=grid)


#: Fits :func:`fit_logistic_head_reusing` keeps (a head is K × D floats and its grid).
_REUSE_SIZE = 8
_REUSED: OrderedDict[str, tuple[LogisticHead, float]] = OrderedDict()


def _inputs_key(arrays: tuple[np.ndarray | None, ...], settings: tuple) -> str:
    digest = hashlib.blake2b(repr(settings).encode(), digest_size=20)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def fit_logistic_head_reusing(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                              task: str, num_classes: int, select: str, cs: np.ndarray, max_iter: int = 200,
                              tol: float = 1e-4, class_weight: list[float] | None = None,
                              ) -> tuple[LogisticHead, float, bool]:
    """:func:`fit_logistic_head`, reused when this process fitted the same inputs recently.

    Returns:
        (the head, the seconds its fit took, whether it was reused). A reused head is a copy of the
        one fitted (L-BFGS is deterministic: a refit would give the same weights).
    """
    arrays = tuple(np.asarray(a) for a in (x_train, y_train, x_val, y_val))
    key = _inputs_key(arrays, (task, num_classes, select, [float(c) for c in cs], max_iter, tol,
                               None if class_weight is None else [float(w) for w in class_weight]))
    if key in _REUSED:
        _REUSED.move_to_end(key)
        head, seconds = _REUSED[key]
        return copy.deepcopy(head), seconds, True
    t0 = time.perf_counter()
    head = fit_logistic_head(*arrays, task=task, num_classes=num_classes, select=select, cs=cs, max_iter=max_iter,
                             tol=tol, class_weight=class_weight)
    seconds = time.perf_counter() - t0
    _REUSED[key] = (copy.deepcopy(head), seconds)
    while len(_REUSED) > _REUSE_SIZE:
        _REUSED.popitem(last=False)
    return head, seconds, False
