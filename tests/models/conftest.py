"""Shared helpers of the model-layer tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="session")
def chelsea_224() -> torch.Tensor:
    """scikit-image's ``chelsea`` (a cat, CC0) as a float tensor (1, 3, 224, 224) in [0, 1]."""
    from skimage import data

    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
