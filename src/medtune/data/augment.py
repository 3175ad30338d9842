"""Per-sample random augmentation of a training batch, on the batch's device.

torchvision's v2 transforms draw one set of parameters per call, so applied to a batch tensor
they flip, rotate or jitter every image of the batch the same way. Here every image gets its own
draw, the parameters come from the caller's ``torch.Generator`` (the training loop's data RNG,
saved in every checkpoint, so a resumed run repeats the same transforms), and the arithmetic
follows torchvision's functional ops (``hflip``, ``vflip``, ``affine`` with zero fill,
``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation``), batched:

* ``hflip``, ``vflip``: each image flipped with probability 0.5.
* ``affine``: rotation uniform in ±10°, translation uniform in ±5 % of the size per axis,
  scale uniform in [0.9, 1.1]; bilinear resampling, zero fill.
* ``color``: brightness, contrast and saturation factors each uniform in [0.8, 1.2]
  (torchvision ``ColorJitter(0.2, 0.2, 0.2)``, applied in that order); a grey image stays grey.

Whatever order they are named in, the transforms run in the order of :data:`AUGMENTATIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTATIONS", "augment_batch", "canonical_augmentations"]

#: The transform names, in the order they are applied.
AUGMENTATIONS: tuple[str, ...] = ("hflip", "vflip", "affine", "color")

MAX_DEGREES = 10.0
MAX_TRANSLATE = 0.05
SCALE_RANGE = (0.9, 1.1)
JITTER = 0.2


def canonical_augmentations(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` without duplicates, in application order (unknown names are the caller's to reject)."""
    return tuple(n for n in AUGMENTATIONS if n in set(names))


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _flip(x: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(dim), x)


def _affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    angle = _uniform(n, -MAX_DEGREES, MAX_DEGREES, gen) * (math.pi / 180)
    scale = _uniform(n, *SCALE_RANGE, gen)
    shift = _uniform(2 * n, -MAX_TRANSLATE, MAX_TRANSLATE, gen).view(n, 2) * 2  # normalised coords span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # the sampling grid maps output to input coordinates: the inverse of rotate-scale-then-shift
    theta = torch.stack([torch.stack([cos, sin, -(cos * shift[:, 0] + sin * shift[:, 1])], 1),
                         torch.stack([-sin, cos, -(-sin * shift[:, 0] + cos * shift[:, 1])], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # torchvision's rgb_to_grayscale weights


def _color(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    factors = _uniform(3 * n, 1 - JITTER, 1 + JITTER, gen).view(3, n, 1, 1, 1).to(x.device, x.dtype)
    x = (x * factors[0]).clamp(0, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (factors[1] * x + (1 - factors[1]) * mean).clamp(0, 1)
    return (factors[2] * x + (1 - factors[2]) * _grey(x)).clamp(0, 1)


def augment_batch(x: torch.Tensor, names: Sequence[str], gen: torch.Generator) -> torch.Tensor:
    """Apply the named transforms to each image of ``x`` with its own random parameters.

    Args:
        x: float images (N, 3, H, W) in [0, 1], on any device.
        names: transform names from :data:`AUGMENTATIONS`.
        gen: a CPU generator the parameters are drawn from.

    Returns:
        The augmented batch, same shape, device and dtype, values in [0, 1].
    """
    wanted = canonical_augmentations(names)
    if "hflip" in wanted:
        x = _flip(x, 3, gen)
    if "vflip" in wanted:
        x = _flip(x, 2, gen)
    if "affine" in wanted:
        x = _affine(x, gen)
    if "color" in wanted:
        x = _color(x, gen)
    return x
