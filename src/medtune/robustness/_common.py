"""Shared machinery of the robustness package: argument checks, norms, batching, prediction.

Private: the public names live in :mod:`medtune.robustness.uap` and friends.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from medtune.errors import ConfigError, DataError

__all__: list[str] = []

NORMS = ("2", "inf")


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
    raise ConfigError(
        f"The 'norm' parameter of {owner} must be 2 or 'inf'. Got {norm!r} instead. "
        "Use norm=2 for an L2 budget or norm='inf' for an L-infinity budget."
    )


def check_fraction(value: object, name: str, owner: str, *, low_open: bool = True) -> float:
    """Validate a float in (0, 1] (or [0, 1] when ``low_open`` is False)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(
            f"The {name!r} parameter of {owner} must be a float in {interval}. Got {value!r} instead."
        )
    return float(value)


def check_positive_int(value: object, name: str, owner: str) -> int:
    """Validate an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"The {name!r} parameter of {owner} must be an int >= 1. Got {value!r} instead."
        )
    return int(value)


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """Validate an image batch: uint8 (N, C, H, W), or floating point in [0, 1].

    Returns the tensor unchanged (no copy); batches are converted to float on the device.
    """
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


def to_float(
    batch: torch.Tensor, device: torch.device, *, channels_last: bool = False
) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] batch -> float32 [0, 1] on ``device``.

    ``channels_last`` returns an NHWC-strided tensor: oneDNN (CPU) and cuDNN (GPU) convolutions run
    about twice as fast on it, and the layers after a conv keep the format.
    """
    batch = batch.to(device, non_blocking=True)
    batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    if channels_last and batch.ndim == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def batches(num: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(num)."""
    for start in range(0, num, batch_size):
        yield slice(start, min(start + batch_size, num))


def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The requested device, or the device of the model's first parameter/buffer, or CPU."""
    if device is not None:
        return torch.device(device)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class eval_mode:
    """Context manager: put ``model`` in eval mode and restore each module's flag on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self._flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, flag in self._flags:
            module.training = flag


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    perturbation: torch.Tensor | None = None,
    batch_size: int = 128,
    device: torch.device,
    channels_last: bool = False,
) -> torch.Tensor:
    """Predicted classes (N,) int64 on CPU for ``clip(images + perturbation, 0, 1)``.

    The model must already be in eval mode and on ``device``.
    """
    v = None if perturbation is None else perturbation.to(device, torch.float32)
    preds = []
    for sl in batches(images.shape[0], batch_size):
        x = to_float(images[sl], device, channels_last=channels_last)
        if v is not None:
            x = (x + v).clamp_(0.0, 1.0)
        preds.append(model(x).argmax(dim=1).cpu())
    return torch.cat(preds)


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
    """Per-image Lp norm (N,) float64 of the flattened [0, 1] images."""
    out = []
    for sl in batches(images.shape[0], batch_size):
        x = to_float(images[sl], torch.device("cpu")).flatten(1).double()
        out.append(x.norm(dim=1) if norm == "2" else x.abs().amax(dim=1))
    return torch.cat(out)
