"""Tensor helpers shared by training, evaluation and the UAP audit: one home for each.

Images travel as uint8 (N, C, H, W) tensors and become float32 in [0, 1] only on the device,
batch by batch; normalisation lives inside the model (``NormalizedModel``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from medtune.errors import ConfigError, short_repr

__all__ = ["resolve_device", "model_device", "to_float", "batches", "eval_mode", "cpu_has_native_bf16",
           "resolve_amp_dtype", "precision_name"]


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: Intel AMX tiles or AVX-512-BF16.

    torch's own queries, ``torch.cpu._is_amx_tile_supported()`` and
    ``torch.cpu._is_avx512_bf16_supported()`` (semi-public, in ``torch.cpu`` since 2.3; what
    inductor uses to pick its bf16 kernels). ``torch.backends.cpu.get_cpu_capability()`` only says
    ``AVX512``, which CPUs without bf16 also report; ``mkldnn._is_mkldnn_bf16_supported`` is true on
    any AVX-512 CPU, where oneDNN emulates bf16 (slower than float32).
    """
    query = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(bool(q()) for q in query if q is not None)


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run's ``amp`` setting means on ``device``; None is float32 (no autocast).

    ``on``: bfloat16 (float16 with a gradient scaler on a CUDA GPU without bf16); on a CPU without
    native bf16 it is emulated and slow, but allowed. ``off``: float32. ``auto``: on for CUDA; float32
    on CPU, even one with native bf16: measured on an AMX CPU (benchmarks/README.md, bench_bf16.py),
    bf16 autocast trains ResNet-18 1.2× faster but EfficientNet-Lite0 0.85–0.95× as fast, so no CPU
    default is faster for every backbone; ``amp: on`` is the choice for the backbones where it pays.
    """
    use = amp == "on" or (amp == "auto" and device.type == "cuda")
    if not use:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the precision a run's forward passes ran in (its record's ``precision``)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


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
