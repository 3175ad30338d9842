"""Machinery of the robustness package only: norms, targets, image checks, prediction.

Private: the public names live in :mod:`medtune.robustness.uap` and friends. Checks and tensor
helpers shared with the rest of medtune live in :mod:`medtune._checks` and :mod:`medtune._tensors`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from medtune._checks import param_error
from medtune._tensors import batches, to_float
from medtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from medtune.data.diskcache import DiskImages

__all__: list[str] = []

_NORM_BATCH_BYTES = 64 << 20  # lp_norms: the float64 copy of one batch


def resolve_norm(norm: object, *, owner: str = "compute_uap") -> str:
    """Map the accepted spellings of a norm (2, "2", 2.0, "l2", inf, "inf", "linf") to "2" or "inf"."""
    if isinstance(norm, bool):
        pass
    elif isinstance(norm, (int, float)):
        if norm == 2:
            return "2"
        if math.isinf(norm) and norm > 0:
            return "inf"
    elif isinstance(norm, str):
        key = norm.strip().lower()
        if key in ("2", "l2", "2.0"):
            return "2"
        if key in ("inf", "linf", "l_inf", "infinity", "np.inf"):
            return "inf"
    raise param_error("norm", owner, "2 or 'inf'", norm,
                      " Use norm=2 for an L2 budget or norm='inf' for an L-infinity budget.")


def check_target(targeted: object, owner: str, *, num_classes: int | None = None,
                 allow_all: bool = False) -> int | str | None:
    """Return ``targeted`` as None, a class index, or ``"all"`` (only when ``allow_all``).

    Without ``num_classes`` (the model is not known yet) an index only has to be >= 0.
    """
    expected = ("None, 'all' or " if allow_all else "None or ") + (
        "a class index >= 0" if num_classes is None else f"a class index in [0, {num_classes - 1}]")
    is_all = isinstance(targeted, str) and targeted == "all"
    if targeted is None or (allow_all and is_all):
        return targeted
    if is_all:
        raise param_error("targeted", owner, expected, targeted,
                          " Use compute_targeted_uaps(...) for one UAP per class.")
    if (isinstance(targeted, bool) or not isinstance(targeted, int) or targeted < 0
            or (num_classes is not None and targeted >= num_classes)):
        raise param_error("targeted", owner, expected, targeted)
    return int(targeted)


def check_images(images: object, name: str = "images", *, stream: bool = False) -> torch.Tensor | DiskImages:
    """Validate an image batch: uint8 (N, C, H, W), or floating point in [0, 1].

    Returns the tensor unchanged (no copy); batches are converted to float on the device. Images
    in the decode cache (``DiskImages``, always uint8) are returned as they are with ``stream``
    (the caller reads them batch by batch: :func:`predict`, :func:`lp_norms`), else read into memory.
    """
    from medtune.data.diskcache import DiskImages

    if isinstance(images, DiskImages):
        if not stream:
            images = images[:]
        elif images.ndim != 4 or len(images) == 0:
            raise DataError(f"{name!r} must hold at least one image (N, C, H, W). Got shape "
                            f"{tuple(images.shape)} instead.")
        else:
            return images
    if not isinstance(images, torch.Tensor):
        raise DataError(
            f"{name!r} must be a torch.Tensor (N, 3, H, W). Got {type(images).__name__} instead. "
            "Convert with torch.as_tensor(array).permute(0, 3, 1, 2) for (N, H, W, 3) arrays."
        )
    if images.ndim != 4:
        raise DataError(
            f"{name!r} must have 4 dimensions (N, C, H, W). Got shape {tuple(images.shape)} instead."
        )
    if images.shape[0] == 0:
        raise DataError(f"{name!r} is empty (0 images); pass at least one image.")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise DataError(
            f"{name!r} must be uint8 in [0, 255] or float in [0, 1]. Got dtype {images.dtype} instead."
        )
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise DataError(
            f"{name!r} must hold float pixels in [0, 1]. Got values in [{low:.3g}, {high:.3g}] instead. "
            "Pass uint8 images or divide by 255; normalisation belongs inside the model."
        )
    return images


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    perturbation: torch.Tensor | None = None,
    batch_size: int = 128,
    device: torch.device,
    channels_last: bool = False,
    clip: bool = True,
) -> torch.Tensor:
    """Predicted classes (N,) int64 on CPU for ``clip(images + perturbation, 0, 1)`` (unclipped with
    ``clip=False``); ``images`` a tensor or a ``DiskImages`` (read ``batch_size`` rows at a time, ahead
    of the model).

    The model must already be in eval mode and on ``device``.
    """
    from medtune.data.diskcache import DiskImages

    v = None if perturbation is None else perturbation.to(device, torch.float32)
    # one output filled in place: small per-batch results kept between the batches' large temporaries
    # split glibc's freed chunks, and the heap grew by about a batch per batch (0.6 GiB over 4,200 images
    # at 224 px, measured; benchmarks/README.md)
    preds = torch.empty(images.shape[0], dtype=torch.int64)
    if isinstance(images, DiskImages):  # read ahead from the decode cache while the model runs
        images.prefetch([np.arange(sl.start, sl.stop) for sl in batches(images.shape[0], batch_size)])
    for sl in batches(images.shape[0], batch_size):
        x = to_float(images[sl], device, channels_last=channels_last)
        if v is not None:
            x = (x + v).clamp_(0.0, 1.0) if clip else x + v
        preds[sl] = model(x).argmax(dim=1).cpu()
    return preds


def num_outputs(model: nn.Module, images: torch.Tensor, device: torch.device) -> int:
    """Number of logits K the model produces (one forward pass on one image)."""
    with torch.no_grad():
        logits = model(to_float(images[:1], device))
    if logits.ndim != 2:
        raise ConfigError(
            f"The model must map (N, 3, H, W) images to logits (N, K). Got output shape "
            f"{tuple(logits.shape)} instead."
        )
    return int(logits.shape[1])


def lp_norms(images: torch.Tensor, norm: str, *, batch_size: int = 256) -> torch.Tensor:
    """Per-image Lp norm (N,) float64 of the flattened [0, 1] images (a tensor or a ``DiskImages``, read
    ``batch_size`` rows at a time, fewer where their float64 copy would pass 64 MiB)."""
    # 256 images at 224 px are 308 MB in float64; a row's norm does not depend on the batch (tested)
    batch_size = max(1, min(batch_size, _NORM_BATCH_BYTES // (8 * math.prod(images.shape[1:]))))
    out = torch.empty(images.shape[0], dtype=torch.float64)  # filled in place: see predict
    for sl in batches(images.shape[0], batch_size):
        x = to_float(images[sl], torch.device("cpu")).flatten(1).double()
        out[sl] = x.norm(dim=1) if norm == "2" else x.abs().amax(dim=1)
    return out
