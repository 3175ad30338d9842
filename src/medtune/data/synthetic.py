"""A tiny deterministic synthetic image set for tests and docs: each class is a drawn shape."""

from __future__ import annotations

import numpy as np
import torch

from medtune.data.base import ImageSet
from medtune.data.splits import make_splits

__all__ = ["make_synthetic", "make_synthetic_localisation"]

_SHAPES = ("square", "disc", "cross", "ring", "bar")


def _draw(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = rng.uniform(0.18, 0.3) * size
    cy, cx = rng.uniform(r, size - r, 2)
    if shape == "square":
        m = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    elif shape == "disc":
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    elif shape == "cross":
        m = ((abs(yy - cy) < r / 3) & (abs(xx - cx) < r)) | ((abs(xx - cx) < r / 3) & (abs(yy - cy) < r))
    elif shape == "ring":
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        m = (d < r) & (d > r / 2)
    else:
        m = abs(yy - cy) < r / 3
    return m.astype(np.float32)


def make_synthetic(num_samples: int = 64, img_size: int = 16, num_classes: int = 2, seed: int = 0) -> ImageSet:
    """Images whose class is a drawn shape (square, disc, cross, ring, bar) on noise; splits 50/25/25.

    Args:
        num_samples: total images (balanced across classes).
        img_size: side in pixels.
        num_classes: 2 … 5.
        seed: everything (shapes, noise, splits) is drawn from this seed.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples) % num_classes
    images = np.empty((num_samples, 3, img_size, img_size), dtype=np.uint8)
    for i, c in enumerate(labels):
        mask = _draw(_SHAPES[c], img_size, rng)
        img = 0.2 + 0.6 * mask + rng.normal(0, 0.08, (img_size, img_size))
        tint = rng.uniform(0.8, 1.0, 3)[:, None, None]
        images[i] = np.clip(img[None] * tint * 255, 0, 255).astype(np.uint8)
    splits = make_splits(labels, groups=None, seed=seed, val_fraction=0.25, test_fraction=0.25)
    return ImageSet(images=torch.from_numpy(images), labels=torch.from_numpy(labels).long(), splits=splits,
                    class_names=list(_SHAPES[:num_classes]), task="binary" if num_classes == 2 else "multiclass",
                    ids=[f"synthetic:{i}" for i in range(num_samples)], name="synthetic",
                    meta={"source": "synthetic", "img_size": img_size})


def make_synthetic_localisation(num_samples: int = 128, img_size: int = 32, seed: int = 0) -> ImageSet:
    """Images whose class is decided by one object at a known place: a disc (class 0) or a cross
    (class 1), plus a class-independent distractor (a bright bar) elsewhere, on noise; splits 50/25/25.

    The object's box is the localisation ground truth: ``meta["boxes"]`` maps each sample id to
    ``(x0, y0, x1, y1)`` in pixels of the ``img_size`` image (x1, y1 exclusive), as a CSV
    ``bbox`` column gives it. A heat map that looks at the object peaks inside the box far more
    often than the box's share of the image (the pointing game's chance level).

    Args:
        num_samples: total images (balanced across the two classes).
        img_size: side in pixels (>= 24).
        seed: everything (objects, distractors, noise, splits) is drawn from this seed.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples) % 2
    images = np.empty((num_samples, 3, img_size, img_size), dtype=np.uint8)
    yy, xx = np.mgrid[:img_size, :img_size]
    boxes = {}
    ids = [f"synthetic_loc:{i}" for i in range(num_samples)]
    for i, c in enumerate(labels):
        r = rng.uniform(0.14, 0.2) * img_size
        cy, cx = rng.uniform(r, img_size - r, 2)
        if c == 0:
            obj = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        else:
            obj = ((abs(yy - cy) < r / 3) & (abs(xx - cx) < r)) | ((abs(xx - cx) < r / 3) & (abs(yy - cy) < r))
        # the distractor: a bar of the same brightness, away from the object
        for _ in range(100):
            by, bx = rng.uniform(r, img_size - r, 2)
            if max(abs(by - cy), abs(bx - cx)) > 2 * r:
                break
        bar = (abs(yy - by) < r / 4) & (abs(xx - bx) < r)
        img = 0.2 + 0.6 * (obj | bar) + rng.normal(0, 0.08, (img_size, img_size))
        images[i] = np.clip(np.repeat(img[None], 3, 0) * 255, 0, 255).astype(np.uint8)
        rows, cols = np.nonzero(obj)
        boxes[ids[i]] = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    splits = make_splits(labels, groups=None, seed=seed, val_fraction=0.25, test_fraction=0.25)
    return ImageSet(images=torch.from_numpy(images), labels=torch.from_numpy(labels).long(), splits=splits,
                    class_names=["disc", "cross"], task="binary", ids=ids, name="synthetic_loc",
                    meta={"source": "synthetic_loc", "img_size": img_size, "boxes": boxes})
