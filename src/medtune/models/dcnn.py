"""``dcnn3``: the small three-convolution DCNN of Rama et al., the from-scratch baseline.

Three convolutions, average pooling the size of the final feature maps, K outputs: the network
trained from scratch on ~2,000 chest X-rays (normal / abnormal) that transfer learning is compared
with. The paper's text gives the layout, not every width; medtune uses 3×3 convolutions with
32, 64 and 128 filters, ReLU, a 2×2 max-pool after the first two, global average pooling over the
final maps (the pooling window is the maps' size, whatever the input size) and a linear layer to
K outputs. Random initialisation only (``weights="none"``, the ``scratch`` strategy).

Layout and parameters (K outputs)::

    stages.0  conv 3→32,   3x3 + ReLU + max-pool 2     896           output stride 2
    stages.1  conv 32→64,  3x3 + ReLU + max-pool 2     18,496        output stride 4
    stages.2  conv 64→128, 3x3 + ReLU                  73,856        output stride 4
    head      average pool over the final maps + linear 128→K: 129·K

Blocks: ``stage_1``..``stage_3`` (one per convolution, no separate stem) and the head.
Importing this module registers the model with timm's registry and does nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from medtune.models._pooled_head import PooledHeadMixin

__all__ = ["DCNN3", "dcnn3"]


class _ConvUnit(nn.Sequential):
    """3x3 convolution (padding 1) and ReLU, then a 2x2 max-pool if ``pool``."""

    def __init__(self, in_chs: int, out_chs: int, pool: bool) -> None:
        layers: list[nn.Module] = [nn.Conv2d(in_chs, out_chs, 3, padding=1), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class DCNN3(PooledHeadMixin, nn.Module):
    """Three conv units, global average pooling and a linear classifier (Rama et al.).

    Args:
        num_classes: outputs K; 0 gives a backbone that returns pooled features.
        in_chans: input channels.
        widths: filters of the three convolutions.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 3, widths: Sequence[int] = (32, 64, 128),
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"dcnn3 has three convolutions; got widths {tuple(widths)}.")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        chs = [in_chans, *widths]
        self.stages = nn.Sequential(*[_ConvUnit(chs[i], chs[i + 1], pool=i < 2) for i in range(3)])
        self.feature_info = [dict(num_chs=w, reduction=r, module=f"stages.{i}")
                             for i, (w, r) in enumerate(zip(widths, (2, 4, 4), strict=True))]
        self.num_features = self.head_hidden_size = widths[-1]
        self.head = ClassifierHead(widths[-1], num_classes, pool_type="avg", drop_rate=drop_rate)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """One group per convolution, at either granularity (the convolutions are the layers)."""
        return dict(blocks=r"^stages\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) normalised images -> (N, widths[-1], H/4, W/4) feature maps."""
        return self.stages(x)



default_cfgs = generate_default_cfgs(
    {
        "dcnn3": dict(
            url="", num_classes=2, input_size=(3, 64, 64), pool_size=(16, 16), crop_pct=1.0,
            interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
            first_conv="stages.0.0", classifier="head.fc",
        )
    }
)


@register_model
def dcnn3(pretrained: bool = False, **kwargs) -> DCNN3:
    """Rama et al.'s three-convolution DCNN (random init only: it has no pretrained weights)."""
    return build_model_with_cfg(DCNN3, "dcnn3", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2), flatten_sequential=True), **kwargs)
