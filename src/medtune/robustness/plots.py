"""PNG pictures of perturbations and perturbed examples (matplotlib, Agg backend, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtune._checks import check_positive_int
from medtune.errors import ConfigError, DataError
from medtune.robustness._common import check_images

__all__ = ["perturbation_to_image", "save_perturbation_png", "save_examples_png"]


def perturbation_to_image(
    perturbation: torch.Tensor, *, amplify: float | None = None
) -> np.ndarray:
    """Map v to a viewable float image (H, W, 3) in [0, 1]: 0.5 + amplify · v, clipped.

    Args:
        perturbation: float tensor (3, H, W) in pixel units.
        amplify: gain; None scales the largest |v| to 0.5 (full contrast around grey).

    Raises:
        ConfigError: amplify is not a positive number.
        DataError: perturbation is not (C, H, W).
    """
    if perturbation.ndim != 3:
        raise DataError(
            f"The perturbation must be (C, H, W). Got shape {tuple(perturbation.shape)}."
        )
    if amplify is not None and (
        isinstance(amplify, bool) or not isinstance(amplify, (int, float)) or amplify <= 0
    ):
        raise ConfigError(
            f"The 'amplify' parameter must be a positive number or None. Got {amplify!r}."
        )
    v = perturbation.detach().double().cpu()
    if amplify is None:
        peak = float(v.abs().max())
        amplify = 0.5 / peak if peak > 0 else 1.0
    image = (0.5 + amplify * v).clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    return image if image.shape[2] == 3 else np.repeat(image[:, :, :1], 3, axis=2)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path


def save_perturbation_png(
    perturbation: torch.Tensor,
    path: str | Path,
    *,
    amplify: float | None = None,
    title: str | None = None,
) -> Path:
    """Save v as a PNG, centred at grey and amplified for visibility (see :func:`perturbation_to_image`).

    Args:
        perturbation: float tensor (3, H, W) in pixel units.
        path: output file; parent folders are created.
        amplify: gain; None scales the largest |v| to 0.5.
        title: optional title; default states the gain.

    Returns:
        The path written.

    Raises:
        ConfigError: amplify is not a positive number.
        DataError: perturbation is not (C, H, W).
    """
    peak = float(perturbation.detach().abs().max())
    gain = amplify if amplify is not None else (0.5 / peak if peak > 0 else 1.0)
    image = perturbation_to_image(perturbation, amplify=amplify)
    fig = Figure(figsize=(3, 3.3), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title if title is not None else f"UAP (x{gain:.3g}, grey = 0)", fontsize=9)
    return _save(fig, path)


def save_examples_png(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    path: str | Path,
    *,
    n: int = 4,
    titles: Sequence[str] | None = None,
) -> Path:
    """Save the first ``n`` clean images (top row) above their perturbed versions (bottom row).

    Args:
        clean: uint8 (N, 3, H, W) or float in [0, 1].
        perturbed: same shape, e.g. ``apply_perturbation(clean, v)``.
        path: output file; parent folders are created.
        n: number of columns (at most N).
        titles: optional 2·n titles, clean row first (e.g. predicted class names).

    Returns:
        The path written.

    Raises:
        ConfigError: n is not a positive int, or titles has the wrong length.
        DataError: the two batches differ in shape, or are not image tensors.
    """
    clean, perturbed = check_images(clean, "clean"), check_images(perturbed, "perturbed")
    n = check_positive_int(n, "n", "save_examples_png")
    if clean.shape != perturbed.shape:
        raise DataError(
            f"clean and perturbed must have the same shape. Got {tuple(clean.shape)} and "
            f"{tuple(perturbed.shape)}."
        )
    n = min(n, clean.shape[0])
    if titles is not None and len(titles) != 2 * n:
        raise ConfigError(f"titles must hold 2·n = {2 * n} strings. Got {len(titles)}.")
    fig = Figure(figsize=(2 * n, 4.3), dpi=100)
    for row, batch in enumerate((clean, perturbed)):
        for col in range(n):
            img = batch[col].detach().cpu()
            img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
            ax = fig.add_subplot(2, n, row * n + col + 1)
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_axis_off()
            label = (
                titles[row * n + col] if titles is not None else ("clean" if row == 0 else "x + v")
            )
            ax.set_title(label, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
