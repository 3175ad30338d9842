"""``medtune_tiny_cnn``: a ~12k-parameter timm backbone for tests, docs and the demo.

It has the interface of a real timm CNN (``pretrained_cfg``, ``feature_info``,
``get_classifier``, ``reset_classifier``, ``forward_features``, ``forward_head``,
``group_matcher``), so every code path that works on it works on ``resnet50``; it trains
an epoch on a few hundred 32 px images in well under a second on one CPU core.

Layout (``depths=(1, 1, 1)``, the default)::

    stem      3x3 conv (stride 1) + BN + ReLU, 8 channels        output stride 1
    stages.0  3x3 conv (stride 2) + BN + ReLU, 16 channels       output stride 2
    stages.1  3x3 conv (stride 2) + BN + ReLU, 24 channels       output stride 4
    stages.2  3x3 conv (stride 2) + BN + ReLU, 32 channels       output stride 8
    head      global average pool + (dropout) + linear

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

__all__ = ["TinyCNN", "medtune_tiny_cnn"]


class ConvBnAct(nn.Module):
    """3x3 convolution, BatchNorm and ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class TinyCNN(PooledHeadMixin, nn.Module):
    """A stem and three stride-2 stages of conv+BN+ReLU units, then pooling and a linear head.

    Args:
        num_classes: outputs of the linear head; 0 gives a backbone that returns pooled features.
        in_chans: input channels.
        stem_width: channels of the stem.
        widths: channels of each stage.
        depths: conv units per stage; the first unit of a stage has stride 2.
        drop_rate: dropout before the classifier.
        global_pool: timm pooling type of the head (``"avg"``, ``"max"``, ...).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_width: int = 8,
        widths: Sequence[int] = (16, 24, 32),
        depths: Sequence[int] = (1, 1, 1),
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths and depths must have the same length; got {widths} and {depths}.")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = ConvBnAct(in_chans, stem_width, stride=1)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module="stem")]
        stages = []
        in_chs, reduction = stem_width, 1
        for stage_idx, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            units = [ConvBnAct(in_chs if i == 0 else width, width, stride=2 if i == 0 else 1) for i in range(depth)]
            stages.append(nn.Sequential(*units))
            in_chs, reduction = width, reduction * 2
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm parameter-group regexes: stem, then one group per stage (coarse) or per unit."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) normalised images -> (N, widths[-1], H/8, W/8) feature maps."""
        return self.stages(self.stem(x))



default_cfgs = generate_default_cfgs(
    {
        "medtune_tiny_cnn": dict(
            url="",
            num_classes=1000,
            input_size=(3, 32, 32),
            pool_size=(4, 4),
            crop_pct=1.0,
            interpolation="bilinear",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv="stem.conv",
            classifier="head.fc",
        )
    }
)


@register_model
def medtune_tiny_cnn(pretrained: bool = False, **kwargs) -> TinyCNN:
    """The medtune test backbone (random init only: it has no pretrained weights)."""
    num_taps = len(kwargs.get("depths", (1, 1, 1))) + 1
    return build_model_with_cfg(
        TinyCNN,
        "medtune_tiny_cnn",
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(num_taps)), flatten_sequential=True),
        **kwargs,
    )
