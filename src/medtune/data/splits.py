"""Stratified (and group-aware) train/val/test splits, and training-set subsampling."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from medtune.data.base import ImageSet
from medtune.errors import ConfigError, DataError

__all__ = ["make_splits", "with_cv_fold", "with_train_fraction", "with_train_per_class"]


def _strata(labels: np.ndarray) -> np.ndarray:
    return labels if labels.ndim == 1 else labels.argmax(1)  # multi-label: stratify on the first positive label


def make_splits(labels: np.ndarray, *, groups: np.ndarray | None, seed: int, val_fraction: float,
                test_fraction: float, class_names: list[str] | None = None) -> np.ndarray:
    """Assign "train"/"val"/"test" per sample, stratified by label and, with groups, group-aware
    (no group in two splits; sklearn's StratifiedGroupKFold picks the folds)."""
    n = len(labels)
    strata = _strata(np.asarray(labels))
    idx = np.arange(n)
    out = np.empty(n, dtype=object)
    if groups is None and np.asarray(labels).ndim == 2:  # multi-label: stratify on the first label where it can
        counts = np.bincount(strata)
        stratify = strata if counts[counts > 0].min() >= 3 else None
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
        stratify_rest = strata[rest] if stratify is not None else None
        train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=seed,
                                      stratify=stratify_rest)
    elif groups is None:
        counts = np.bincount(strata)
        # each split must hold every class (else the class is not learnt, or AUC is undefined): at least 3 images
        # (one per split), and enough that the stratified fractions give each split one
        def too_few(small: list[tuple[int, int]], need: str) -> DataError:
            listed = ", ".join(f"{class_names[c] if class_names else c} ({k})" for c, k in small[:10])
            return DataError(f"class(es) {listed}{' …' if len(small) > 10 else ''} have too few images to split "
                             f"with val_fraction {val_fraction:g} and test_fraction {test_fraction:g}: {need}; add "
                             "images, raise the fractions, or give a 'split' column.")

        small = [(c, int(k)) for c, k in enumerate(counts) if 0 < k < 3]
        if small:
            raise too_few(small, "each class needs at least 3 (one in each split)")
        try:
            rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strata)
            train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=seed,
                                          stratify=strata[rest])
        except ValueError as exc:  # scikit-learn's own size checks, e.g. fewer test images than classes
            raise DataError(f"{n} images in {int((counts > 0).sum())} classes cannot be split with val_fraction "
                            f"{val_fraction:g} and test_fraction {test_fraction:g} ({exc}); add images or raise the "
                            "fractions.") from None
        for part in (train, val, test):
            missing = [(c, int(counts[c])) for c in np.flatnonzero(counts) if not (strata[part] == c).any()]
            if missing:
                need = math.ceil(1 / min(val_fraction, test_fraction) - 1e-9)
                raise too_few(missing, f"a split got none of them; about {need} images per class give each split one")
    else:
        def take(ids: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
            k = max(2, round(1 / fraction))
            if len(np.unique(groups[ids])) < k:
                raise DataError(f"Only {len(np.unique(groups[ids]))} groups (patients): too few for a group-aware "
                                f"split of {fraction:.0%}; give a 'split' column instead.")
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            keep, held = next(cv.split(ids, strata[ids], groups[ids]))
            return ids[keep], ids[held]

        rest, test = take(idx, test_fraction)
        train, val = take(rest, val_fraction / (1 - test_fraction))
    out[train], out[val], out[test] = "train", "val", "test"
    return out.astype(str)


def with_cv_fold(data: ImageSet, num_folds: int, fold: int, seed: int) -> ImageSet:
    """Fold ``fold`` of ``num_folds``-fold cross-validation: the test split as it is, train + val
    pooled and cut into stratified folds (``StratifiedGroupKFold``: no group in two folds when the
    data has groups), fold ``fold`` the validation split, the others training.

    Raises:
        DataError: fewer groups, or images of a class, than folds.
    """
    pool = np.flatnonzero(data.splits != "test")
    strata = _strata(data.labels.numpy()[pool])
    groups = data.groups[pool] if data.groups is not None else pool.astype(str)  # no groups: each image its own
    if len(np.unique(groups)) < num_folds:
        raise DataError(f"{data.name}: {len(np.unique(groups))} groups outside the test split, too few for "
                        f"{num_folds}-fold cross-validation; use fewer folds (cv_folds).")
    if np.bincount(strata).max() < num_folds:
        raise DataError(f"{data.name}: no class has {num_folds} images outside the test split; use fewer folds.")
    cv = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    _, held = list(cv.split(pool, strata, groups))[fold]
    splits = data.splits.copy().astype(object)
    splits[pool] = "train"
    splits[pool[held]] = "val"
    # the same tensors with new split labels (no copy of the pixels); a new fingerprint
    return dataclasses.replace(data, splits=splits.astype(str), meta={**data.meta, "cv": {"folds": num_folds,
                                                                                       "fold": fold}})


def with_train_fraction(data: ImageSet, fraction: float, seed: int) -> ImageSet:
    """Keep a stratified ``fraction`` of the training split (at least one image per class); val/test untouched.

    For one seed the subsets are nested across fractions.

    Raises:
        ConfigError: fraction outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"The 'train_fraction' parameter must be in (0, 1]. Got {fraction!r}.")
    if fraction == 1:
        return data
    rng = np.random.default_rng(seed)
    train = data.indices("train")
    strata = _strata(data.labels.numpy()[train])
    keep = []
    for c in np.unique(strata):
        members = train[strata == c]
        k = max(1, int(round(fraction * len(members))))
        # one seeded order per class, cut at k: the subsets of one seed are nested (0.25 ⊂ 0.5 ⊂ 1),
        # so a learning curve adds images instead of drawing new ones
        keep.append(members[rng.permutation(len(members))[:k]])
    others = np.flatnonzero(data.splits != "train")
    out = data.subset(np.sort(np.concatenate(keep + [others])))
    out.meta["train_fraction"] = fraction
    return out


def with_train_per_class(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """Keep ``per_class`` training images of each class (k-shot); validation and test untouched.

    Each class's training images are put in one order drawn from ``seed`` (the split seed) and cut at
    ``per_class``, so for one seed the sets are nested (the 5-shot set is inside the 20-shot set). A
    class with fewer images keeps them all, with a warning naming it; ``meta["train_per_class_short"]``
    lists such classes with their counts. Multi-label data counts an image under its first positive
    label, as the stratified splits do.

    Raises:
        ConfigError: ``per_class`` below 1.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ConfigError(f"The 'train_per_class' parameter must be an integer >= 1. Got {per_class!r}.")
    rng = np.random.default_rng(seed)
    train = data.indices("train")
    strata = _strata(data.labels.numpy()[train])
    keep, short = [], []
    for c in range(data.num_classes):
        members = train[strata == c]
        # drawn for every class, present or not, so one class's count never shifts another's draw
        order = rng.permutation(len(members))
        if len(members) < per_class:
            short.append((data.class_names[c] if c < len(data.class_names) else str(c), int(len(members))))
        keep.append(members[order[:per_class]])
    if short:
        listed = ", ".join(f"{name} ({n})" for name, n in short)
        warnings.warn(f"train_per_class={per_class}: class(es) {listed} have fewer training images; each keeps all "
                      f"of its images.\nHINT: the record's train_per_class_short lists them.", stacklevel=2)
    others = np.flatnonzero(data.splits != "train")
    out = data.subset(np.sort(np.concatenate(keep + [others])))
    out.meta["train_per_class"] = int(per_class)
    if short:
        out.meta["train_per_class_short"] = dict(short)
    return out
