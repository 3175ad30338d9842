"""The built-in demo dataset, made offline from the real IHC histology image scikit-image ships.

Task (one sentence): grade an immunohistochemistry patch by its DAB-positive area —
*negative* (< 15% of pixels DAB-stained), *low* (35–65%) or *high* (> 85%) — as in the
area-based scoring of IHC slides; patches between the bands are left out so every label is
unambiguous. DAB is measured by colour deconvolution (Ruifrok & Johnston; ``skimage.color.rgb2hed``).

It is a **demo**, not a clinical dataset: one slide (``skimage.data.immunohistochemistry``,
public domain), 48-px patches resized to the model input. The slide is cut into three vertical
strips (60/20/20% of its width) and each split draws patches only from its own strip, so no two
splits share a pixel.
"""

from __future__ import annotations

import numpy as np
import torch

from medtune.data._decode import resize_image
from medtune.data.base import ImageSet

__all__ = ["make_demo", "DEMO_TASK"]

DEMO_TASK = ("IHC patch grading by DAB-positive area: negative (<15%), low (35-65%) or high (>85%) of pixels "
             "DAB-stained, from the real IHC slide scikit-image ships; a demo, not clinical data.")
_CLASSES = ("negative", "low", "high")
_BANDS = ((0.0, 0.15), (0.35, 0.65), (0.85, 1.01))
_DAB_THRESHOLD = 0.03  # optical density of the DAB channel above which a pixel counts as stained
_PATCH = 48
_QUOTA = {"train": 80, "val": 30, "test": 30}  # per class
_STRIPS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}


def make_demo(img_size: int = 64, seed: int = 0, resize: str = "resize") -> ImageSet:
    """Build the demo set (about 420 patches, 3 classes) deterministically from ``seed``."""
    from skimage import data as skdata
    from skimage.color import rgb2hed

    slide = skdata.immunohistochemistry()
    dab = rgb2hed(slide)[..., 2] > _DAB_THRESHOLD
    rng = np.random.default_rng(seed)
    height, width = dab.shape
    images, labels, splits, ids = [], [], [], []
    for split, (lo, hi) in _STRIPS.items():
        x0, x1 = int(lo * width), int(hi * width)
        counts = [0] * len(_CLASSES)
        for _ in range(20_000):
            if min(counts) >= _QUOTA[split]:
                break
            y = int(rng.integers(0, height - _PATCH + 1))
            x = int(rng.integers(x0, x1 - _PATCH + 1))
            frac = dab[y:y + _PATCH, x:x + _PATCH].mean()
            cls = next((c for c, (a, b) in enumerate(_BANDS) if a <= frac < b), None)
            if cls is None or counts[cls] >= _QUOTA[split]:
                continue
            patch = slide[y:y + _PATCH, x:x + _PATCH]
            k = int(rng.integers(4))
            patch = np.rot90(patch, k)
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            images.append(resize_image(np.ascontiguousarray(patch), img_size, resize))
            labels.append(cls)
            splits.append(split)
            ids.append(f"demo:{split}:y{y}x{x}r{k}")
            counts[cls] += 1
    return ImageSet(images=torch.stack(images), labels=torch.tensor(labels, dtype=torch.long),
                    splits=np.array(splits), class_names=list(_CLASSES), task="multiclass", ids=ids, name="demo",
                    meta={"source": "skimage.data.immunohistochemistry", "task_description": DEMO_TASK,
                          "img_size": img_size, "resize": resize, "strips": _STRIPS})
