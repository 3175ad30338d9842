"""The dataset every part of medtune works on.

Images are decoded once, converted to RGB and resized to the model's input size at load time,
and kept as one uint8 tensor, or for large sets as a :class:`~medtune.data.diskcache.DiskImages`
(the same array on disk, read batch by batch); batch-wise float conversion happens on the
training device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from medtune.data.diskcache import DiskImages

__all__ = ["ImageSet", "fingerprint_of", "TASKS", "SPLITS", "SPLIT_ALIASES"]

TASKS = ("binary", "multiclass", "multilabel")
SPLITS = ("train", "val", "test")
#: Other names of a split, as split folders and CSV ``split`` cells may spell them (Kaggle's ``valid``).
SPLIT_ALIASES = {"valid": "val", "validation": "val"}


@dataclass(eq=False)
class ImageSet:
    """A decoded, labelled image set.

    Attributes:
        images: uint8 tensor (N, 3, H, W), RGB, already at the model input size; or a
            :class:`~medtune.data.diskcache.DiskImages` of that shape (indexing it reads tensors).
        labels: int64 tensor (N,) of class indices, or float32 (N, L) of 0/1 for multi-label.
        splits: str array (N,) with values in ``SPLITS``.
        class_names: one name per class (per label for multi-label).
        task: one of ``TASKS``.
        ids: one identifier per sample (a path, or ``"file.npz:train:12"``).
        groups: optional str array (N,) of group (patient) ids; no group spans two splits.
        name: short dataset name recorded with every run.
        sizes: with ``resize: bucket``, int array (N,) of the side each image is fed at; the image
            fills ``images[i, :, :sizes[i], :sizes[i]]`` (the rest is zero). None otherwise.
    """

    images: torch.Tensor | DiskImages
    labels: torch.Tensor
    splits: np.ndarray
    class_names: list[str]
    task: str
    ids: list[str]
    groups: np.ndarray | None = None
    name: str = "data"
    meta: dict = field(default_factory=dict)
    sizes: np.ndarray | None = None
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> np.ndarray:
        """Integer indices of the samples in ``split``."""
        return np.flatnonzero(self.splits == split)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """A new ImageSet holding the samples at ``idx`` (disk-backed images: an index view, no read)."""
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ImageSet(
            images=self.images.view(np.asarray(idx)) if isinstance(self.images, DiskImages) else self.images[idx_t],
            labels=self.labels[idx_t],
            splits=self.splits[idx],
            class_names=list(self.class_names),
            task=self.task,
            ids=[self.ids[i] for i in np.asarray(idx)],
            groups=None if self.groups is None else self.groups[idx],
            name=self.name,
            meta=dict(self.meta),
            sizes=None if self.sizes is None else self.sizes[idx],
        )

    def split(self, split: str) -> ImageSet:
        """The samples of one split."""
        return self.subset(self.indices(split))

    def fingerprint(self) -> str:
        """sha256 over pixels, labels, splits and class names (16 hex chars).

        Computed once per object: an ImageSet's tensors are treated as immutable (``subset`` and
        ``split`` build new objects).
        """
        if self._fingerprint is None:
            pixels = (self.images.chunks() if isinstance(self.images, DiskImages)
                      else [np.ascontiguousarray(self.images.numpy())])
            self._fingerprint = fingerprint_of(pixels, self.labels, self.splits, self.class_names, self.task)
        return self._fingerprint


def fingerprint_of(pixels: Iterable[np.ndarray], labels: torch.Tensor, splits: np.ndarray, class_names: list[str],
                   task: str) -> str:
    """:meth:`ImageSet.fingerprint` of these parts; ``pixels`` the uint8 images in order, in chunks."""
    h = hashlib.sha256()
    for chunk in pixels:
        h.update(np.ascontiguousarray(chunk).data)
    h.update(np.ascontiguousarray(labels.numpy()).tobytes())
    h.update("\x00".join(map(str, splits)).encode())
    h.update("\x00".join(class_names).encode())
    h.update(task.encode())
    return h.hexdigest()[:16]
