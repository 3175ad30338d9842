"""Tensor helpers shared by training, evaluation and the UAP audit: one home for each.

Images travel as uint8 (N, C, H, W) tensors and become float32 in [0, 1] only on the device,
batch by batch; normalisation lives inside the model (``NormalizedModel``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from medtune.errors import ConfigError, short_repr

__all__ = ["resolve_device", "model_device", "to_float", "batches", "eval_mode"]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None) → CUDA when available, else CPU; any other name as torch spells it.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for where torch sees no CUDA device.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"Unknown device {short_repr(name)} ({exc}); use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {str(name)!r} asked for, but torch sees no CUDA device here (torch "
                          f"{torch.__version__}); use --device cpu or auto, or install a CUDA build of torch.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"Device {str(name)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                          "are visible; use another index.")
    return device


def model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """The requested device, or the device of the model's first parameter/buffer, or CPU."""
    if device is not None:
        return torch.device(device)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_float(batch: torch.Tensor, device: torch.device, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] batch (or float cached features) → float32 on ``device``.

    ``channels_last`` returns an NHWC-strided tensor for 4-d inputs: oneDNN (CPU) and cuDNN (GPU)
    convolutions run about twice as fast on it, and the layers after a conv keep the format.
    """
    batch = batch.to(device, non_blocking=True)
    batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    if channels_last and batch.ndim == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def batches(num: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(num)``."""
    for start in range(0, num, batch_size):
        yield slice(start, min(start + batch_size, num))


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
