"""The classifier half of timm's CNN interface, shared by medtune's own small CNNs (tiny, dcnn3).

A subclass sets ``self.head`` to a ``timm.layers.ClassifierHead`` and ``self.num_classes``, and
defines ``forward_features``; this mixin gives ``get_classifier``, ``reset_classifier``,
``forward_head`` and ``forward`` as timm models have them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PooledHeadMixin"]


class PooledHeadMixin:
    """``get_classifier`` / ``reset_classifier`` / ``forward_head`` / ``forward`` over ``self.head``."""

    head: nn.Module
    num_classes: int

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one with ``num_classes`` outputs."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature maps -> logits (N, num_classes), or pooled features if ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
