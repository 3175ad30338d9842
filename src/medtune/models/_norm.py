"""What medtune counts as a normalisation layer: one definition for the partition, the
strategies, the training loop and the feature cache."""

from __future__ import annotations

from torch import nn

__all__ = ["NORM_LAYERS", "BATCH_STAT_LAYERS", "is_norm_layer", "norm_param_ids"]

#: Layers with running statistics: in train mode they normalise with batch statistics and update
#: their running buffers (BatchNorm*, InstanceNorm* — timm's BatchNormAct2d is a BatchNorm2d).
BATCH_STAT_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,)

#: Every normalisation layer: the batch-statistics ones, GroupNorm, LayerNorm and AlexNet's
#: LocalResponseNorm (which has no parameters).
NORM_LAYERS: tuple[type[nn.Module], ...] = (*BATCH_STAT_LAYERS, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """True for any layer in :data:`NORM_LAYERS`."""
    return isinstance(module, NORM_LAYERS)


def norm_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that belong to normalisation layers."""
    return {id(p) for m in model.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)}
